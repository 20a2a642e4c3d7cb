"""The ONNX Runtime backend: `edgeexit export --format onnx` and runtime "onnx".

- The export writes one graph per edge stage, per cloud split point and the conventional DNN, each stamped with
  its checkpoint's content hash, with a dynamic batch, the same bytes every time.
- Equivalence with torch on the tiny run's whole test split at every blur level of its config: the real
  EdgeRunner takes the same exit with the same label for >= 99.9% of images, confidences within 1e-4; the cloud
  part for every k and the conventional DNN give the same labels and confidences within 1e-4.
- Refusals, one line each naming the fix: no export, a stale export (the run was retrained or recalibrated), a
  graph from another run, a missing graph, onnxruntime not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from reference import edge_probs, policy_scores
from tinyrun import tiny_images

from edgeexit.cli import main
from edgeexit.config import RunConfig
from edgeexit.data import distort
from edgeexit.errors import UserError
from edgeexit.inference import calibrate
from edgeexit.model import load_checkpoint, save_checkpoint
from edgeexit.onnx_export import ensure_onnx_export, export_is_current, export_onnx
from edgeexit.onnx_runtime import HASH_KEY, MANIFEST, OnnxRuntime, cloud_part_file, edge_stage_file
from edgeexit.runtime import TorchRuntime, load_runtime
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.edge_runner import load_runner

TOL = 1e-4  # confidences
AGREE = 0.999  # share of images with the same exit and label


@pytest.fixture
def run_copy(tiny_run_onnx: tuple[Path, RunConfig], tmp_path: Path) -> Path:
    """A private copy of the exported tiny run, free to break."""
    root = tmp_path / "run"
    shutil.copytree(tiny_run_onnx[0], root, ignore=shutil.ignore_patterns("cache"))
    return root


def _graphs(root: Path) -> list[str]:
    return [
        *(edge_stage_file(i) for i in (1, 2, 3)),
        *(cloud_part_file(k) for k in (1, 2, 3)),
        "conventional.onnx",
    ]


# --- the export ---------------------------------------------------------------------------------------------


def test_export_writes_every_piece_stamped_with_its_hash(
    tiny_run_onnx: tuple[Path, RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tiny_run_onnx
    ee_hash = json.loads((root / "ee" / "spec.json").read_text())["content_hash"]
    conv_hash = json.loads((root / "conventional" / "spec.json").read_text())["content_hash"]
    manifest = json.loads((root / "onnx" / MANIFEST).read_text())
    assert (manifest["model_hash"], manifest["conventional_hash"]) == (ee_hash, conv_hash)
    for name in _graphs(root):
        model = onnx.load(str(root / "onnx" / name))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta[HASH_KEY] == (conv_hash if name == "conventional.onnx" else ee_hash), name
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch" and not batch.HasField("dim_value"), name  # dynamic batch
    # Through the CLI into another folder: the same bytes (deterministic), the files listed.
    assert main(["export", str(root), "--format", "onnx", "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "exported 7 ONNX graphs" in out and str(tmp_path / "again") in out
    for name in [*_graphs(root), MANIFEST]:
        assert (tmp_path / "again" / name).read_bytes() == (root / "onnx" / name).read_bytes(), name


def test_export_of_a_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeexit: error: no checkpoint in") and "\n" not in err


def test_a_dynamic_batch_runs_at_any_size(tiny_run_onnx: tuple[Path, RunConfig]) -> None:
    root, _ = tiny_run_onnx
    rt = load_runtime(root, "onnx")
    assert isinstance(rt, OnnxRuntime) and rt.has_conventional
    for b in (1, 5):
        h, logits = rt.edge_stage(1, torch.randn(b, 3, 32, 32))
        assert logits.shape == (b, 10) and h.shape[0] == b and logits.dtype == torch.float32
        assert rt.cloud_part(h, 1).shape == (b, 10)
    with pytest.raises(ValueError, match="1..3"):
        rt.cloud_part(h, 0)


# --- equivalence with torch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def levels_images(tiny_run_onnx: tuple[Path, RunConfig]) -> dict[float, torch.Tensor]:
    """The whole test split of the tiny run at every blur level of its config (the sweep's images)."""
    root, cfg = tiny_run_onnx
    ids, clean = tiny_images(root, cfg, 10**9)
    exp = cfg.experiment
    return {
        float(level): distort(clean, exp.distortion, level, seeds=[int(i) for i in ids])
        for level in exp.levels
    }


def test_the_edge_runner_on_onnx_answers_as_on_torch(
    tiny_run_onnx: tuple[Path, RunConfig], levels_images: dict[float, torch.Tensor]
) -> None:
    root, cfg = tiny_run_onnx
    alpha = cfg.experiment.alphas[0]
    on_torch = load_runner(root, strategy="ee", alpha=alpha, runtime="torch")
    on_onnx = load_runner(root, strategy="ee", alpha=alpha, runtime="onnx")
    assert (
        on_onnx.config()["runtime"] == "onnx" and on_onnx.config()["model_hash"] == on_torch.spec.content_hash
    )
    total = same = near_alpha = 0
    exits: set[int] = set()
    for images in levels_images.values():
        for x in images:
            a, b = on_torch.classify_uint8(x), on_onnx.classify_uint8(x)
            total += 1
            exits.add(a.exit)
            if (a.exit, a.label) == (b.exit, b.label):
                same += 1
                assert abs(a.confidence - b.confidence) <= TOL and a.macs == b.macs
            elif any(
                abs(s - alpha) <= TOL
                for s in policy_scores("ee", edge_probs(on_torch.runtime, x, 3), 3, None)
            ):
                near_alpha += 1
    print(
        f"onnx vs torch, ee alpha={alpha}: {same}/{total} same exit and label, {near_alpha} within {TOL} of alpha"
    )
    assert total == len(levels_images) * 180 and exits == {1, 2, 3}
    assert same / total >= AGREE, f"{total - same} of {total} differ ({near_alpha} within {TOL} of alpha)"


def test_cloud_parts_and_conventional_on_onnx_equal_torch(
    tiny_run_onnx: tuple[Path, RunConfig], levels_images: dict[float, torch.Tensor]
) -> None:
    root, _ = tiny_run_onnx
    t, o = TorchRuntime.from_run(root), load_runtime(root, "onnx")
    spec, cspec = t.spec, t.conventional_spec
    assert cspec is not None
    agree = {k: [0, 0] for k in ("1", "2", "3", "conventional")}

    def compare(key: str, want: torch.Tensor, got: torch.Tensor, temperature: float | None) -> None:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)  # raw logits
        pw, pg = calibrate(want, temperature), calibrate(got, temperature)
        same = pw.argmax(1) == pg.argmax(1)
        agree[key][0] += int(same.sum())
        agree[key][1] += len(same)
        assert (pw.max(1).values - pg.max(1).values).abs().max() <= TOL, key

    with torch.inference_mode():
        for images in levels_images.values():
            x = spec.preprocessing.normalize(images)
            h = x
            for k in (1, 2, 3):
                h, _ = t.edge_stage(k, h)
                compare(str(k), t.cloud_part(h, k), o.cloud_part(h, k), spec.temperature(spec.num_exits))
            xc = cspec.preprocessing.normalize(images)
            compare("conventional", t.conventional(xc), o.conventional(xc), cspec.temperature(1))
    for key, (same, n) in agree.items():
        assert same / n >= AGREE, f"{key}: {n - same} of {n} labels differ"


# --- serving on onnx ----------------------------------------------------------------------------------------


def test_the_cloud_runner_on_onnx(tiny_run_onnx: tuple[Path, RunConfig]) -> None:
    root, cfg = tiny_run_onnx
    _, images = tiny_images(root, cfg, 4)
    cloud = CloudRunner.load(root, runtime="onnx")
    assert cloud.info(8, 1 << 20)["runtime"] == "onnx" and cloud.has_conventional
    net, spec = load_checkpoint(root / "ee")
    with torch.inference_mode():
        h = net.edge_part(spec.preprocessing.normalize(images), 2)[1]
        want = calibrate(net.cloud_part(h, 2), spec.temperature(4)).max(1)
    labels, confs = cloud.finish(h, 2)
    assert labels == want.indices.tolist()
    np.testing.assert_allclose(confs, want.values.numpy(), rtol=0, atol=TOL)
    label, conf = cloud.classify(images[0])
    assert 0 <= label < 10 and 0 < conf <= 1


def test_threads_are_set_per_session(tiny_run_onnx: tuple[Path, RunConfig]) -> None:
    root, _ = tiny_run_onnx
    assert OnnxRuntime.from_run(root, threads=2, load_conventional=False).threads == 2
    assert not OnnxRuntime.from_run(root, load_conventional=False).has_conventional
    with pytest.raises(UserError, match="threads must be a positive integer"):
        OnnxRuntime.from_run(root, threads=0)


# --- refusals -----------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_no_export_is_refused_with_the_command_to_run(run_copy: Path) -> None:
    shutil.rmtree(run_copy / "onnx")
    with pytest.raises(UserError) as exc:
        load_runtime(run_copy, "onnx")
    assert f"run `edgeexit export {run_copy} --format onnx`" in _one_line(exc)


def test_a_stale_export_is_refused_and_ensure_reexports(run_copy: Path) -> None:
    assert export_is_current(run_copy)
    before = (run_copy / "onnx" / MANIFEST).stat().st_mtime_ns
    assert ensure_onnx_export(run_copy) == run_copy / "onnx"
    assert (run_copy / "onnx" / MANIFEST).stat().st_mtime_ns == before  # current: left alone
    net, spec = load_checkpoint(run_copy / "ee")
    spec.temperatures = [1.0, 1.0, 1.0, 1.0]  # recalibrated after the export: a new content hash
    save_checkpoint(run_copy / "ee", net, spec)
    with pytest.raises(UserError, match="retrained or recalibrated since") as exc:
        load_runtime(run_copy, "onnx")
    assert "--format onnx` again" in _one_line(exc)
    assert not export_is_current(run_copy)
    ensure_onnx_export(run_copy)
    assert load_runtime(run_copy, "onnx").spec.content_hash == spec.content_hash


def test_a_graph_from_another_run_is_refused(run_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(run_copy, other, ignore=shutil.ignore_patterns("onnx"))
    net, spec = load_checkpoint(other / "ee")
    with torch.no_grad():
        net.exits[1][-1].bias.add_(1.0)  # "retrained"
    save_checkpoint(other / "ee", net, spec)
    export_onnx(other)
    shutil.copy(other / "onnx" / edge_stage_file(2), run_copy / "onnx" / edge_stage_file(2))
    with pytest.raises(UserError) as exc:
        load_runtime(run_copy, "onnx")
    msg = _one_line(exc)
    assert f"{edge_stage_file(2)} was exported from model {spec.content_hash}" in msg
    assert "--format onnx` again" in msg


def test_a_missing_or_corrupt_graph_is_refused(run_copy: Path) -> None:
    (run_copy / "onnx" / cloud_part_file(2)).unlink()
    with pytest.raises(UserError, match=f"{cloud_part_file(2)} is missing; run `edgeexit export") as exc:
        load_runtime(run_copy, "onnx")
    _one_line(exc)
    (run_copy / "onnx" / cloud_part_file(2)).write_bytes(b"not a graph")
    with pytest.raises(UserError, match=f"cannot load ONNX graph .*{cloud_part_file(2)}") as exc:
        load_runtime(run_copy, "onnx")
    _one_line(exc)


def test_without_onnxruntime_the_error_names_the_package(
    tiny_run_onnx: tuple[Path, RunConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(UserError, match="needs the onnxruntime package: `pip install onnxruntime`") as exc:
        load_runtime(tiny_run_onnx[0], "onnx")
    _one_line(exc)


def test_the_online_experiment_runs_on_onnx(run_copy: Path, tiny_run_onnx: tuple[Path, RunConfig]) -> None:
    from edgeexit.experiment.online import run_online
    from edgeexit.serving.cloud_app import create_cloud_app
    from edgeexit.serving.server import start_server

    cfg = tiny_run_onnx[1]
    with start_server(create_cloud_app(run_copy, runtime="onnx")) as srv:
        records = run_online(
            run_copy,
            cfg,
            srv.url,
            levels=[0.0],
            alphas=[0.5],
            strategies=["ee", "conventional"],
            n_images=6,
            runtime="onnx",
        )
    assert len(records) == 12 and (records.outcome == "ok").all()
    assert set(records.strategy) == {"ee", "conventional"} and (records.exit == 0).any()
