"""Joint training: resumable bit-identical state (tested by killing a real process), best-weights checkpoint,
conventional baselines, bad input, augmentation, and DDP with 2 CPU processes through the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edgeexit.config import RunConfig
from edgeexit.data import Split
from edgeexit.errors import UserError
from edgeexit.model import load_checkpoint, load_spec
from edgeexit.rundir import RunDir
from edgeexit.train import collect_logits, load_split_data, prepare_data, train_model
from edgeexit.train.data import _shift
from edgeexit.train.distributed import DistInfo, shard

REPO = Path(__file__).resolve().parents[1]


def tiny_config(epochs: int = 4) -> RunConfig:
    """sklearn digits at 16 px: a real training that takes about a second per epoch on 2 cores."""
    cfg = RunConfig()
    cfg.dataset.name = "digits"
    cfg.dataset.input_size = 16
    cfg.train.epochs = epochs
    cfg.train.batch_size = 128
    cfg.train.lr = 5e-3
    cfg.train.patience = 2
    cfg.train.seed = 3
    return cfg


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train_state(run: Path, which: str = "ee") -> tuple[dict, dict[str, torch.Tensor]]:
    sdir = run / which / "train_state"
    doc = json.loads((sdir / "state.json").read_text())
    return doc, _state(sdir / doc["weights_file"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained to completion in one go (resume=True on an empty directory: a logged fresh start)."""
    run = tmp_path_factory.mktemp("full") / "run"
    logger = logging.getLogger("edgeexit.train.loop")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        train_model(run, tiny_config(), "ee", resume=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any("nothing to resume" in m for m in records)
    return run


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    from edgeexit.config import RunConfig
    from edgeexit.train import train_model
    torch.set_num_threads(int(sys.argv[3]))  # the parent's thread count: same float reduction order
    cfg = RunConfig.from_dict(json.loads(sys.argv[2]))
    def hold(epoch):
        if epoch == 2:
            print("EPOCH2", flush=True)
            time.sleep(120)  # killed here by the test
    train_model(sys.argv[1], cfg, "ee", epoch_callback=hold)
    print("FINISHED", flush=True)
    """
)


def test_killed_run_resumes_bit_identically(full_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config()
    argv = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        str(run),
        json.dumps(cfg.to_dict()),
        str(torch.get_num_threads()),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "EPOCH2", line
        proc.send_signal(signal.SIGKILL)  # a real, abrupt interruption: no cleanup runs
    finally:
        proc.kill()
        proc.wait(timeout=30)
    doc, _ = _train_state(run)
    assert doc["epoch"] == 2 and not doc["finished"]

    spec = train_model(run, cfg, "ee", resume=True)
    assert spec.metrics["epochs_run"] == load_spec(full_run / "ee").metrics["epochs_run"] > 2

    # final (best) weights, current weights and the per-epoch log equal those of the uninterrupted run
    _assert_same_tensors(
        _state(full_run / "ee" / "weights.safetensors"), _state(run / "ee" / "weights.safetensors")
    )
    _assert_same_tensors(_train_state(full_run)[1], _train_state(run)[1])
    assert load_spec(full_run / "ee").content_hash == spec.content_hash

    def losses(r: Path) -> list[tuple]:
        rows = [json.loads(x) for x in (r / "ee" / "metrics.jsonl").read_text().splitlines()]
        return [(x["epoch"], x["train_loss"], x["val_loss"], x["val_acc"], x["lr"]) for x in rows]

    assert losses(full_run) == losses(run)

    # resuming a finished run does nothing; resuming with another config is refused
    assert train_model(run, cfg, "ee", resume=True).content_hash == spec.content_hash
    other = tiny_config()
    other.train.lr = 1e-3
    with pytest.raises(UserError, match="train.lr"):
        train_model(run, other, "ee", resume=True)


def test_checkpoint_holds_best_validation_weights(full_run: Path) -> None:
    cfg = tiny_config()
    rows = [json.loads(x) for x in (full_run / "ee" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"}
    val_losses = [r["val_loss"] for r in rows]
    best = int(np.argmin(val_losses)) + 1
    # early stopping rule: ran all epochs, or stopped after `patience` epochs without a better val loss
    assert len(rows) == cfg.train.epochs or len(rows) - best == cfg.train.patience
    assert rows[0]["lr"] == cfg.train.lr and rows[-1]["lr"] < cfg.train.lr  # cosine schedule

    net, spec = load_checkpoint(full_run / "ee")
    assert spec.metrics["best_epoch"] == best
    assert len(spec.metrics["test_accuracy"]) == spec.num_exits == 4
    assert spec.dataset == "digits" and spec.input_size == 16 and spec.split_seed == 0
    assert spec.training["seed"] == 3
    # the checkpoint's weights reproduce the best epoch's validation loss and accuracies
    ds, split, prep = prepare_data(cfg, RunDir(full_run))
    logits, y = collect_logits(net, load_split_data(ds, split.val, prep), prep, torch.device("cpu"))
    loss = sum(torch.nn.functional.cross_entropy(z, y).item() for z in logits)
    assert loss == pytest.approx(rows[best - 1]["val_loss"], rel=1e-4)
    assert [(z.argmax(1) == y).float().mean().item() for z in logits] == pytest.approx(
        rows[best - 1]["val_acc"]
    )
    # test accuracy in the spec is measured on the test split with those weights
    logits, y = collect_logits(net, load_split_data(ds, split.test, prep), prep, torch.device("cpu"))
    acc = [(z.argmax(1) == y).float().mean().item() for z in logits]
    assert acc == pytest.approx(spec.metrics["test_accuracy"])


def test_conventional_final_exit_equals_ee_final_exit(full_run: Path) -> None:
    cfg = tiny_config()
    cfg.train.conventional = "final_exit"
    spec = train_model(full_run, cfg, "conventional")
    conv, conv_spec = load_checkpoint(full_run / "conventional")
    ee, _ = load_checkpoint(full_run / "ee")
    assert conv_spec.kind == "conventional" and conv_spec.num_branches == 0
    assert spec.content_hash == conv_spec.content_hash
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(conv(x)[-1], ee(x)[-1])


def test_conventional_separate_training(tmp_path: Path) -> None:
    cfg = tiny_config(epochs=1)
    spec = train_model(tmp_path / "run", cfg, "conventional")
    net, loaded = load_checkpoint(tmp_path / "run" / "conventional")
    assert loaded.kind == "conventional" and loaded.num_exits == 1 and net.num_branches == 0
    assert len(spec.metrics["test_accuracy"]) == 1
    assert not (tmp_path / "run" / "ee").exists()


def test_conventional_final_exit_needs_ee_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(epochs=1)
    cfg.train.conventional = "final_exit"
    with pytest.raises(UserError, match="train --model ee first"):
        train_model(tmp_path / "run", cfg, "conventional")


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("train", "exit_weights", [1.0, 1.0], "train.exit_weights: .* one weight per exit"),
        ("train", "optimizer", "rmsprop", "train.optimizer: must be one of adam, sgd"),
        ("train", "schedule", "step", "cosine, constant"),
        ("train", "epochs", 0, "train.epochs: must be >= 1, got 0"),
        ("train", "distortion", "fog", "in train.distortion; known: gaussian_blur"),
        ("dataset", "name", "mnist60k", "mnist5k"),
    ],
)
def test_bad_training_config(tmp_path: Path, section: str, key: str, value: object, match: str) -> None:
    """A bad value is refused when assigned; one that breaks a rule across fields when training starts."""
    cfg = tiny_config(epochs=1)
    with pytest.raises(UserError, match=match):
        setattr(getattr(cfg, section), key, value)
        train_model(tmp_path / "run", cfg, "ee")
    assert not (tmp_path / "run" / "ee").exists()


def test_unknown_model_kind(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ee, conventional"):
        train_model(tmp_path / "run", tiny_config(), "both")


def test_split_is_persisted_and_seed_checked(tmp_path: Path) -> None:
    cfg = tiny_config()
    run = RunDir(tmp_path / "run")
    _, split, prep = prepare_data(cfg, run)
    assert Split.load(run.split) == split and prep.input_size == 16
    cfg.dataset.split_seed = 1
    with pytest.raises(UserError, match="split seed"):
        prepare_data(cfg, run)


def _write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_resume_with_another_class_count_is_refused(tmp_path: Path) -> None:
    """A file-backed dataset (DataLoader path, crop+flip augmentation); a class added before resuming."""
    root = tmp_path / "images"
    for c in ("a", "b"):
        _write_images(root / c, 10, seed=ord(c))
    cfg = RunConfig()
    cfg.dataset.name = "imagefolder"
    cfg.dataset.root = str(root)
    cfg.dataset.input_size = 16
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    run = tmp_path / "run"
    spec = train_model(run, cfg, "ee")
    assert spec.num_classes == 2 and spec.class_names == ["a", "b"] and spec.resize_size == 18
    _write_images(root / "c", 10, seed=3)
    with pytest.raises(UserError, match="2 classes but dataset 'imagefolder' has 3"):
        train_model(run, cfg, "ee", resume=True)


def test_shift_augmentation_translates_without_flipping() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 12, 12), dtype=torch.uint8)
    out = _shift(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    p = 2  # 12 px images: pad clamps to 2
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    moved = 0
    for i in range(x.shape[0]):
        offsets = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 12, dx : dx + 12])
        ]
        assert len(offsets) == 1  # exactly one translation of the original (never a flip)
        moved += offsets[0] != (p, p)
    assert moved > 8  # most images really moved


def test_shard_covers_every_index_once_per_rank_share() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shares = [shard(order, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert {s.numel() for s in shares} == {4}  # padded to equal shares
    assert set(torch.cat(shares).tolist()) == set(range(11))
    unpadded = [shard(order, DistInfo(rank=r, world_size=3), pad=False) for r in range(3)]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(11))
    assert torch.equal(shard(order, DistInfo()), order)


def test_ddp_two_cpu_processes_through_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "edgeexit",
        "train",
        "--out",
        str(run),
        "--model",
        "ee",
        "--dataset",
        "digits",
        "--input-size",
        "32",
        "--epochs",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    net, spec = load_checkpoint(run / "ee")
    assert spec.training["world_size"] == 2 and spec.input_size == 32 and spec.num_exits == 4
    assert len((run / "ee" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(spec.metrics["test_accuracy"]) == 4
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32))[-1].shape == (2, 10)
