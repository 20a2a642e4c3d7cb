"""Export a run to ONNX for the onnx runtime (`edgeexit.onnx_runtime`): one graph per deployable piece.

Per edge stage i a graph of stage i and exit head i (x -> h, logits), per split point k a graph of the cloud
part (h -> logits), and the conventional DNN when the run has one. Per stage, not one whole graph: the edge runner
asks the policy between exits and may stop after any of them, and the cloud starts at whichever k the edge
chose. Every graph has a dynamic batch dimension and carries its checkpoint's content hash in its metadata;
`manifest.json` (written last, so a crash never leaves an export that looks whole) names the files and holds the
EE-DNN's cost table, so that serving needs no torch model to know its MACs.

The graphs come from the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): it is fast
(about 0.1 s a graph), needs no onnxscript and writes the same bytes for the same weights. Adaptive average
pools whose output size does not divide their input (the `pool` exit head on an odd map) are replaced, for the
export only, by the same average written as two small matrix products, which the exporter supports.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeexit.atomic import atomic_write_bytes
from edgeexit.errors import UserError
from edgeexit.model.checkpoint import load_checkpoint
from edgeexit.model.costs import cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.onnx_runtime import (
    CONVENTIONAL_FILE,
    FORMAT,
    GRAPH_KEY,
    HASH_KEY,
    MANIFEST,
    cloud_part_file,
    edge_stage_file,
    export_dir,
)
from edgeexit.runtime import check_ee_spec, run_specs

__all__ = ["export_onnx", "ensure_onnx_export", "export_is_current", "OPSET"]

log = logging.getLogger(__name__)

OPSET = 17


class _EdgeStage(nn.Module):
    """Stage i and exit head i: x -> (h, logits)."""

    def __init__(self, net: EarlyExitNet, i: int) -> None:
        super().__init__()
        self.stage, self.exit = net.stages[i - 1], net.exits[i - 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stage(x)
        return h, self.exit(h)


class _CloudPart(nn.Module):
    """Stages k+1..N+1 and the final head: h -> logits (k = 0 with a conventional net: the whole network)."""

    def __init__(self, net: EarlyExitNet, k: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(net.stages[k:])
        self.head = net.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


class _FixedAdaptiveAvgPool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d` for one input size, as P_h @ x @ P_w^T with torch's bins (start floor(i*H/o),
    end ceil((i+1)*H/o)): the exporter refuses adaptive pools whose output size does not divide the input."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("ph", _pool_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("pwt", _pool_matrix(in_hw[1], out_hw[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.ph, x), self.pwt)


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _exportable(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """`module`, or a copy of it whose non-dividing adaptive average pools are `_FixedAdaptiveAvgPool2d`."""
    found: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    names = {m: n for n, m in module.named_modules()}

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        in_hw = tuple(args[0].shape[-2:])
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        out_hw = tuple(in_hw[j] if size[j] is None else int(size[j]) for j in range(2))
        if in_hw[0] % out_hw[0] or in_hw[1] % out_hw[1]:
            found[names[m]] = (in_hw, out_hw)

    pools = [m for m in module.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    handles = [m.register_forward_hook(hook) for m in pools]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    if not found:
        return module
    import copy

    module = copy.deepcopy(module)
    for name, (in_hw, out_hw) in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _FixedAdaptiveAvgPool2d(in_hw, out_hw))
    return module


def _graph_bytes(module: nn.Module, in_shape: list[int], outputs: list[str], meta: dict[str, str]) -> bytes:
    """The ONNX model of `module` on [batch, *in_shape] float32, batch dynamic, with `meta` in metadata_props."""
    import onnx

    module.eval()
    example = torch.zeros(2, *in_shape)  # batch 2: the exporter must not specialise the batch to 1
    module = _exportable(module, example)
    axes = {name: {0: "batch"} for name in ["x", *outputs]}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "edgeexit"
    return model.SerializeToString(deterministic=True)


def export_onnx(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's ONNX graphs and manifest into `out` (default RUN_DIR/onnx); returns the folder."""
    specs = run_specs(run_dir)
    run = specs.run
    out = Path(out) if out is not None else export_dir(run.root)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a folder (or a path that does not exist yet)")
    net, spec = load_checkpoint(run.ee)
    check_ee_spec(spec, run.ee)
    costs = cost_table(net, spec.input_size)
    n = spec.num_branches
    ins = [[3, spec.input_size, spec.input_size], *costs.split_shapes]  # the input of stage i is ins[i-1]

    def write(
        name: str, module: nn.Module, in_shape: list[int], outputs: list[str], h: str, what: str
    ) -> None:
        data = _graph_bytes(
            module, in_shape, outputs, {HASH_KEY: h, GRAPH_KEY: what, "edgeexit.format": FORMAT}
        )
        atomic_write_bytes(out / name, data)

    with torch.inference_mode(False):
        for i in range(1, n + 1):
            write(
                edge_stage_file(i),
                _EdgeStage(net, i),
                ins[i - 1],
                ["h", "logits"],
                spec.content_hash,
                f"edge_stage {i}",
            )
        for k in range(1, n + 1):
            write(
                cloud_part_file(k),
                _CloudPart(net, k),
                ins[k],
                ["logits"],
                spec.content_hash,
                f"cloud_part {k}",
            )
        conv_hash = None
        if specs.conventional is not None:
            conv_net, conv_spec = load_checkpoint(run.conventional)
            conv_hash = conv_spec.content_hash
            s = conv_spec.input_size
            write(
                CONVENTIONAL_FILE, _CloudPart(conv_net, 0), [3, s, s], ["logits"], conv_hash, "conventional"
            )
    manifest = {
        "format": FORMAT,
        "opset": OPSET,
        "model_hash": spec.content_hash,
        "conventional_hash": conv_hash,
        "num_branches": n,
        "input_size": spec.input_size,
        "edge_stages": [edge_stage_file(i) for i in range(1, n + 1)],
        "cloud_parts": [cloud_part_file(k) for k in range(1, n + 1)],
        "conventional": None if conv_hash is None else CONVENTIONAL_FILE,
        "costs": costs.to_dict(),
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    log.debug("exported %d ONNX graphs of %s to %s", 2 * n + (conv_hash is not None), run.root, out)
    return out


def export_is_current(run_dir: Path) -> bool:
    """Whether RUN_DIR/onnx holds a whole export of the run's current checkpoints (hashes and files)."""
    specs = run_specs(run_dir)
    directory = export_dir(specs.run.root)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    conv_hash = None if specs.conventional is None else specs.conventional.content_hash
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("model_hash")) != (
        FORMAT,
        specs.ee.content_hash,
    ):
        return False
    if manifest.get("conventional_hash") != conv_hash:
        return False
    n = specs.ee.num_branches
    files = [edge_stage_file(i) for i in range(1, n + 1)] + [cloud_part_file(k) for k in range(1, n + 1)]
    files += [CONVENTIONAL_FILE] if conv_hash is not None else []
    return all((directory / f).is_file() for f in files)


def ensure_onnx_export(run_dir: Path) -> Path:
    """RUN_DIR/onnx, exported first when it is missing, incomplete or made from other checkpoints."""
    if not export_is_current(run_dir):
        log.info("exporting %s to ONNX (missing or stale export)", run_dir)
        export_onnx(run_dir)
    return export_dir(Path(run_dir))
