"""The ONNX Runtime backend (`RUNTIMES["onnx"]`): one `onnxruntime.InferenceSession` per deployable piece.

`edgeexit export RUN_DIR --format onnx` (`edgeexit.onnx_export`) writes RUN_DIR/onnx/:

    edge_stage_<i>.onnx    stage i + exit head i: x -> (h, logits), i = 1..N
    cloud_part_<k>.onnx    stages k+1..N+1 + the final head: h -> logits, k = 1..N
    conventional.onnx      the conventional DNN: x -> logits (when the run has one)
    manifest.json          the format, the models' content hashes, the files, the EE-DNN's cost table

Every graph carries the content hash of the checkpoint it was exported from in its metadata
(`edgeexit.model_hash`); loading refuses a graph whose hash is not the run's (a run retrained or recalibrated
after its export), so the hash the wire and the cloud check always names the weights that really compute.
Inputs and outputs stay torch tensors at the seam (numpy views both ways); outputs are raw logits. The edge
runner's steps (`edge_input`, `edge_probs`) stay in numpy from the uint8 image to the probabilities.

onnxruntime is imported only in `OnnxRuntime.from_run`: importing this module (which `edgeexit.runtime`
does, to register the name) costs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.errors import UserError
from edgeexit.inference import calibrate_numpy
from edgeexit.model.costs import CostTable
from edgeexit.model.spec import ModelSpec
from edgeexit.rundir import RunDir
from edgeexit.runtime import RUNTIMES, Runtime, measure_conventional_macs, run_specs

__all__ = [
    "OnnxRuntime",
    "FORMAT",
    "MANIFEST",
    "HASH_KEY",
    "export_dir",
    "edge_stage_file",
    "cloud_part_file",
    "CONVENTIONAL_FILE",
    "read_manifest",
    "session_options",
]

log = logging.getLogger(__name__)

FORMAT = "edgeexit-onnx-v1"
MANIFEST = "manifest.json"
HASH_KEY = "edgeexit.model_hash"  # graph metadata: the content hash of the checkpoint it came from
GRAPH_KEY = "edgeexit.graph"  # graph metadata: which piece it is ("edge_stage 2", "cloud_part 1", ...)
CONVENTIONAL_FILE = "conventional.onnx"


def export_dir(run_dir: Path) -> Path:
    """Where `edgeexit export RUN_DIR --format onnx` writes by default and the onnx runtime reads: RUN_DIR/onnx."""
    return RunDir(Path(run_dir)).onnx


def edge_stage_file(i: int) -> str:
    """The graph of stage i and exit head i."""
    return f"edge_stage_{i}.onnx"


def cloud_part_file(k: int) -> str:
    """The graph of the stages after k and the final head."""
    return f"cloud_part_{k}.onnx"


def _export_hint(run_root: Path) -> str:
    return f"run `edgeexit export {run_root} --format onnx`"


def read_manifest(directory: Path, run_root: Path) -> dict[str, Any]:
    """DIR/manifest.json, or a UserError that says how to make it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"no ONNX export in {directory} (no {MANIFEST}); {_export_hint(run_root)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt {path}: {exc}; {_export_hint(run_root)} again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} has format {got!r}, expected {FORMAT!r}; {_export_hint(run_root)} again")
    return manifest


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "runtime 'onnx' needs the onnxruntime package: `pip install onnxruntime` (or use runtime 'torch')"
        ) from None
    return onnxruntime


class _Graph:
    """One InferenceSession with a single input: torch tensor in, torch tensors out (numpy views both ways)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.outputs = [o.name for o in session.get_outputs()]
        # `InferenceSession.run` checks the feed's names, its OrtValues and graph capture on every call before
        # calling the binding `_sess.run`; the feed here is always our one named array, so call the binding
        # directly (about 12 us a call, 10% of a 32 px stage), or the public method where it is missing.
        inner = getattr(session, "_sess", None)
        self._run = inner.run if inner is not None and hasattr(inner, "run") else session.run

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        arr = (x.detach() if x.requires_grad else x).numpy()
        return [torch.from_numpy(a) for a in self.run_numpy(arr)]

    def run_numpy(self, arr: np.ndarray) -> list[np.ndarray]:
        """The graph on a numpy array: its outputs as numpy arrays."""
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        return self._run(self.outputs, {self.input: arr}, None)


def session_options(ort: Any, threads: int) -> Any:
    """The `onnxruntime.SessionOptions` every session of this runtime gets (`ort` is the imported module)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads block instead of spinning: on a shared CPU spinning threads steal other work's time.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only
    return so


def _load_graph(ort: Any, path: Path, options: Any, want_hash: str, what: str, run_root: Path) -> _Graph:
    """One graph, checked to come from the model with content hash `want_hash`."""
    if not path.is_file():
        raise UserError(f"ONNX graph {path} is missing; {_export_hint(run_root)} again")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ONNX graph {path}: {first}; {_export_hint(run_root)} again") from None
    got = session.get_modelmeta().custom_metadata_map.get(HASH_KEY)
    if got != want_hash:
        raise UserError(
            f"ONNX graph {path} was exported from model {got or '(no hash)'} but the run's {what} is "
            f"{want_hash or '(no hash)'} (retrained or recalibrated since the export); "
            f"{_export_hint(run_root)} again"
        )
    return _Graph(session)


@RUNTIMES.register("onnx")
class OnnxRuntime(Runtime):
    """The run's pieces as ONNX graphs in ONNX Runtime on the CPU, one session each, sequential execution."""

    name = "onnx"

    def __init__(
        self,
        spec: ModelSpec,
        costs: CostTable,
        edge: Sequence[_Graph],
        cloud: Sequence[_Graph],
        *,
        conventional: _Graph | None = None,
        conventional_spec: ModelSpec | None = None,
        conventional_macs: int | None = None,
        threads: int = 1,
    ) -> None:
        if len(edge) != spec.num_branches or len(cloud) != spec.num_branches:
            raise ValueError(
                f"need {spec.num_branches} edge and cloud graphs, got {len(edge)} and {len(cloud)}"
            )
        self.spec = spec
        self.costs = costs
        self._edge = list(edge)
        self._cloud = list(cloud)
        self._conventional = conventional
        self.conventional_spec = conventional_spec
        self.conventional_macs = conventional_macs
        self.threads = threads
        self._temperatures = [spec.temperature(i) for i in range(1, spec.num_branches + 1)]

    @classmethod
    def from_run(
        cls,
        run_dir: Path,
        *,
        load_conventional: bool = True,
        threads: int | None = None,
        onnx_dir: Path | None = None,
    ) -> OnnxRuntime:
        """The graphs in RUN_DIR/onnx (or `onnx_dir`), checked against the run's checkpoints; `threads` intra-op
        threads per session (default: `torch.get_num_threads()`); the conventional DNN's graph only with
        `load_conventional` (its spec and MACs always, when the run has one)."""
        specs = run_specs(run_dir)
        root = specs.run.root
        directory = Path(onnx_dir) if onnx_dir is not None else export_dir(root)
        manifest = read_manifest(directory, root)
        spec, conv_spec = specs.ee, specs.conventional
        conv_hash = None if conv_spec is None else conv_spec.content_hash
        if manifest.get("model_hash") != spec.content_hash or manifest.get("conventional_hash") != conv_hash:
            raise UserError(
                f"the ONNX export in {directory} was made from other models (EE-DNN {manifest.get('model_hash')}, "
                f"conventional {manifest.get('conventional_hash')}) than the run's (EE-DNN {spec.content_hash}, "
                f"conventional {conv_hash}): retrained or recalibrated since; {_export_hint(root)} again"
            )
        threads = torch.get_num_threads() if threads is None else int(threads)
        if threads < 1:
            raise UserError(f"threads must be a positive integer, got {threads}")
        ort = _import_onnxruntime()
        options = session_options(ort, threads)
        n = spec.num_branches

        def graph(name: str, want: str, what: str) -> _Graph:
            return _load_graph(ort, directory / name, options, want, what, root)

        edge = [graph(edge_stage_file(i), spec.content_hash, "EE-DNN") for i in range(1, n + 1)]
        cloud = [graph(cloud_part_file(k), spec.content_hash, "EE-DNN") for k in range(1, n + 1)]
        try:
            costs = CostTable(**manifest["costs"])
        except (KeyError, TypeError) as exc:
            raise UserError(
                f"{directory / MANIFEST} has no valid cost table ({exc}); {_export_hint(root)} again"
            ) from None
        conv = conv_macs = None
        if conv_spec is not None:
            conv_macs = measure_conventional_macs(spec, costs, conv_spec)
            if load_conventional:
                conv = graph(CONVENTIONAL_FILE, conv_spec.content_hash, "conventional DNN")
        return cls(
            spec,
            costs,
            edge,
            cloud,
            conventional=conv,
            conventional_spec=conv_spec,
            conventional_macs=conv_macs,
            threads=threads,
        )

    @property
    def has_conventional(self) -> bool:
        """Whether the conventional DNN's graph is loaded."""
        return self._conventional is not None

    def edge_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph `edge_stage_<i>`: stage i, then exit head i."""
        if not 1 <= i <= len(self._edge):
            raise ValueError(f"edge stage i must be in 1..{len(self._edge)}, got {i}")
        h, logits = self._edge[i - 1](x)
        return h, logits

    def edge_input(self, x: torch.Tensor) -> np.ndarray:
        """`Runtime.edge_input` in numpy: the same float32 values, without torch's per-operation cost."""
        return self.preprocessing.normalize_numpy(x.numpy())[None]

    def edge_probs(self, i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`Runtime.edge_probs` in numpy: graph `edge_stage_<i>`, then `inference.calibrate_numpy`."""
        if not 1 <= i <= len(self._edge):
            raise ValueError(f"edge stage i must be in 1..{len(self._edge)}, got {i}")
        h, logits = self._edge[i - 1].run_numpy(h)
        return h, calibrate_numpy(logits, self._temperatures[i - 1])

    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Graph `cloud_part_<k>`: the stages after k and the final head."""
        if not 1 <= k <= len(self._cloud):
            raise ValueError(f"split point k must be in 1..{len(self._cloud)}, got {k}")
        return self._cloud[k - 1](h)[0]

    def conventional(self, x: torch.Tensor) -> torch.Tensor:
        """Graph `conventional`: the conventional DNN's logits."""
        if self._conventional is None:
            raise UserError(
                "this runtime has no conventional DNN (RUN_DIR/conventional was absent or not loaded)"
            )
        return self._conventional(x)[0]
