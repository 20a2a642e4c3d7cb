"""The Python API: `edgeexit.wrap` on a torchvision model that is not a built-in backbone, carried through fit,
calibrate, evaluate, save and an offload to a real cloud server; TensorBoard scalars; progress lines in a log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import edgeexit
from edgeexit.config import RunConfig
from edgeexit.errors import UserError
from edgeexit.inference import exit_probabilities
from edgeexit.model import new_model
from edgeexit.onnx_export import export_onnx
from edgeexit.train.tensorboard import open_writer

EXITS = ["features.2", "features.4", "features.6"]
SOURCE = "torchvision:efficientnet_b0"


def _efficientnet(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(num_classes=classes)


def _loader(n: int, classes: int = 3, seed: int = 0, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=batch)


def _scalar_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_public_names_are_listed() -> None:
    assert set(edgeexit.__all__) <= set(dir(edgeexit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgeexit.nope  # noqa: B018


def test_wrap_with_exits_ignored_equals_the_model() -> None:
    model = _efficientnet()
    net, spec = edgeexit.wrap(model, EXITS, input_size=32, source=SOURCE, model_kwargs={"num_classes": 3})
    assert isinstance(net, edgeexit.EarlyExitNet) and spec.num_branches == 3
    assert spec.branch_blocks == [2, 4, 6] and spec.backbone == SOURCE
    model.eval(), net.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outs = net(x)
        assert torch.equal(outs[-1], model(x))
        for k in range(1, 4):  # the edge and cloud parts compose to the whole at every split point
            _, h_k = net.edge_part(x, k)
            assert torch.equal(net.cloud_part(h_k, k), outs[-1])
    assert [o.shape for o in outs] == [torch.Size([4, 3])] * 4


def test_wrap_explains_what_it_needs() -> None:
    # mobilenet_v2 pools functionally in forward: at 64 px its children in order do not compute the model
    with pytest.raises(UserError, match="forward runs its named children in order"):
        edgeexit.wrap(torchvision.models.mobilenet_v2(num_classes=3), ["features.3"], input_size=64)
    with pytest.raises(UserError, match="not an nn.Sequential"):
        edgeexit.wrap(_efficientnet(), ["features.2.0.block"], input_size=32)
    with pytest.raises(UserError, match="blocks that can take an exit: .*features.1"):
        edgeexit.wrap(_efficientnet(), ["features.99"], input_size=32)
    with pytest.raises(UserError, match="in the classifier head"):
        edgeexit.wrap(_efficientnet(), ["classifier"], input_size=32)
    with pytest.raises(UserError, match="forward order"):
        edgeexit.wrap(_efficientnet(), ["features.4", "features.2"], input_size=32)
    with pytest.raises(UserError, match="source must be"):
        edgeexit.wrap(_efficientnet(), EXITS, input_size=32, source="efficientnet_b0")


def test_wrap_without_source_trains_but_cannot_be_reloaded(tmp_path: Path) -> None:
    net, spec = edgeexit.wrap(_efficientnet(), EXITS, input_size=32)
    edgeexit.save_run(tmp_path, net, spec)
    with pytest.raises(UserError, match="without `source`.*cannot be rebuilt"):
        edgeexit.load_run(tmp_path)


def test_specs_of_builtin_backbones_hash_as_before() -> None:
    # `wrapped` (None for the built-in backbones) stays out of the hashed identity: old run directories load
    _, spec = new_model("mobilenet_v2", num_classes=3, input_size=32, branches=1)
    assert spec.wrapped is None and "wrapped" not in spec.identity()
    spec.wrapped = {"source": SOURCE, "model_kwargs": {}, "exits": EXITS}
    assert spec.identity()["wrapped"]["exits"] == EXITS


@pytest.mark.slow
def test_wrapped_model_trains_calibrates_evaluates_and_offloads(tmp_path: Path) -> None:
    net, spec = edgeexit.wrap(
        _efficientnet(5), EXITS, input_size=32, num_classes=3, source=SOURCE, model_kwargs={"num_classes": 5}
    )
    assert spec.num_classes == 3
    train, val = _loader(24), _loader(16, seed=1)
    cfg = edgeexit.TrainConfig(device="cpu")
    history = edgeexit.fit(net, spec, train, val, epochs=1, config=cfg, tensorboard=tmp_path / "tb")
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"]) and len(history[0]["val_acc"]) == 4
    rows = edgeexit.calibrate_model(net, spec, val, tensorboard=tmp_path / "tb")
    assert spec.calibrated and len(rows) == 4 and len(spec.ensemble_weights) == 3
    tags = _scalar_tags(tmp_path / "tb")
    for tag in ("loss/train/exit_1", "accuracy/val/exit_final", "loss/val/exit_2", "lr"):
        assert tag in tags
    assert {"calibration/ece_before/exit_1", "calibration/ece_after/exit_final"} <= tags

    summary = edgeexit.evaluate_model(net, spec, val, strategies=["ee", "ensemble"], alphas=[0.5, 1.0])
    assert len(summary) == 2 * 2 * 3 and (summary["n"] == 16).all()
    at_one = summary[(summary["strategy"] == "ee") & (summary["alpha"] == 1.0)]
    assert (at_one["early_exit_prob"] <= summary["early_exit_prob"].max()).all()

    run = tmp_path / "run"
    saved = edgeexit.save_run(run, net, spec)
    net2, spec2 = edgeexit.load_run(run)  # rebuilt from torchvision, content hash checked
    assert spec2.content_hash == saved.content_hash and spec2.wrapped["exits"] == EXITS
    x = next(iter(val))[0]
    local = exit_probabilities(net2, spec2, x, batch_size=8)
    assert torch.allclose(local[-1], exit_probabilities(net.cpu(), spec, x, batch_size=8)[-1], atol=1e-6)

    with edgeexit.start_cloud(run) as cloud:
        with edgeexit.load_runner(run, strategy="ee", alpha=1.0, cloud_url=cloud.url) as edge:
            answers = [edge.classify_uint8(img) for img in x[:4]]
    offloaded = [(a, j) for j, a in enumerate(answers) if a.answered_at == "cloud"]
    assert offloaded, "alpha = 1 should send some image to the cloud"
    for a, j in offloaded:
        assert a.outcome == "ok" and a.bytes_sent > 0
        assert a.label == int(local[-1][j].argmax())
        assert a.confidence == pytest.approx(float(local[-1][j].max()), abs=1e-5)

    # Exported like any run: the onnx runtime gives the same edge exits and labels.
    export_onnx(run)
    with edgeexit.load_runner(run, strategy="ee", alpha=0.6, runtime="onnx") as on_onnx:
        with edgeexit.load_runner(run, strategy="ee", alpha=0.6) as on_torch:
            for img in x[:8]:
                a, b = on_onnx.classify_uint8(img), on_torch.classify_uint8(img)
                assert (a.exit, a.label) == (b.exit, b.label)
                assert a.confidence == pytest.approx(b.confidence, abs=1e-4)


def _folder(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.mark.slow
def test_train_config_tensorboard_writes_scalars(tmp_path: Path) -> None:
    from edgeexit.train import calibrate_run, train_model

    _folder(tmp_path / "images", per_class=12)
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "imagefolder", "root": str(tmp_path / "images"), "input_size": 32},
            "model": {"branches": 2, "head": "pool"},
            "experiment": {"edge_branches": [1, 2], "online_k": 2},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "tensorboard": True},
        }
    )
    run = tmp_path / "run"
    train_model(run, cfg, "ee")
    calibrate_run(run, cfg)
    tags = _scalar_tags(run / "tensorboard" / "ee")
    expected = {
        "loss/train/exit_1",
        "accuracy/train/exit_final",
        "loss/val/exit_2",
        "accuracy/val/exit_1",
        "lr",
        "calibration/ece_before/exit_1",
        "calibration/ece_after/exit_final",
    }
    assert expected <= tags


def test_tensorboard_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"tensorboard package is not installed: pip install"):
        open_writer(tmp_path)


def test_exit_probabilities_logs_progress_without_a_tty(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EDGEEXIT_PROGRESS_INTERVAL", "1e-9")  # a line after every batch
    torch.manual_seed(0)
    net, spec = new_model("mobilenet_v2", num_classes=3, input_size=32, branches=1)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with caplog.at_level(logging.INFO, logger="edgeexit.progress"):
        exit_probabilities(net, spec, x, batch_size=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeexit.progress"]
    assert lines and lines[-1].startswith("forward: 3/3 (100%)")
