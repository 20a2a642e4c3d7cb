"""Rough edges a newcomer hits: a last training batch of one, warnings for a model at chance or a wild
temperature, progress lines in a redirected log, and the time estimate of `edgeexit reproduce`."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

from edgeexit.config import RunConfig
from edgeexit.data import Split, make_split
from edgeexit.errors import UserError
from edgeexit.experiment.pipeline import estimate_stages, log_estimate
from edgeexit.model import load_checkpoint
from edgeexit.progress import LogProgress, default_interval, progress
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.train import calibrate_run, train_model
from edgeexit.train.data import drop_lone_last
from edgeexit.train.distributed import DistInfo, shard
from edgeexit.train.loop import warn_chance_accuracy

# ---- a last training batch of one sample -----------------------------------------------------------------


def _image_folder(root: Path, per_class: int) -> None:
    """3 classes of small random PNGs (the newcomer's own folder)."""
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def _messages(caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


@pytest.mark.slow
def test_imagefolder_with_a_last_batch_of_one_trains_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    _image_folder(root, per_class=27)
    cfg = RunConfig()
    cfg.dataset.name = "imagefolder"
    cfg.dataset.root = str(root)
    cfg.dataset.input_size = 32
    cfg.train.epochs = 1
    cfg.train.device = "cpu"
    run = tmp_path / "run"
    # the split is persisted before training: pick the batch size that leaves a last batch of exactly one
    _, split, _ = prepare_data(cfg, RunDir(run))
    n = split.train.size
    batch = next(b for b in range(8, n) if n % b == 1)
    cfg.train.batch_size = batch
    assert n % cfg.train.batch_size == 1 and n > cfg.train.batch_size

    with caplog.at_level(logging.INFO):
        spec = train_model(run, cfg, "ee")
    assert any("drops its last training batch" in m for m in _messages(caplog, "edgeexit.train.loop", 20))
    rows = (run / "ee" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and np.isfinite(json.loads(rows[0])["train_loss"])

    # the case is real: this model's BatchNorm refuses a training batch of one at 32 px
    net, _ = load_checkpoint(run / "ee")
    net.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(torch.zeros(1, 3, 32, 32))

    # random pixels: an exit warns exactly when its test accuracy is at or near chance (<= 1.5 / 3)
    acc = spec.metrics["test_accuracy"]
    warned = _messages(caplog, "edgeexit.train.loop")
    for i, a in enumerate(acc, start=1):
        name = "final" if i == len(acc) else str(i)
        hits = [m for m in warned if f"exit {name} is {a:.4f}" in m]
        assert len(hits) == (1 if a <= 0.5 else 0), (name, a, warned)
        assert all("more epochs" in m for m in hits)
    assert any(a <= 0.5 for a in acc)  # one epoch on noise: at least one exit is at chance

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = calibrate_run(run, cfg)
    temps = [e["temperature"] for e in report["models"]["ee"]["exits"]]
    warned = _messages(caplog, "edgeexit.train.calibrate")
    wild = [t for t in temps if not 0.01 <= t <= 100]
    assert len(warned) == len(wild)
    for t in wild:
        assert any(f"temperature {t:.4g}" in m for m in warned)


def test_drop_lone_last_only_changes_a_last_batch_of_one() -> None:
    order = torch.randperm(65, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_lone_last(order, 8), order[:64])
    for n, b in ((64, 8), (66, 8), (4000, 64), (7, 1), (1, 1)):
        same = torch.arange(n)
        assert drop_lone_last(same, b) is same  # untouched: same batches, same draws
    with pytest.raises(UserError, match="holds 1 image"):
        drop_lone_last(torch.arange(1), 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_no_rank_trains_on_a_batch_of_one(world: int) -> None:
    for n in range(2 * world, 80):
        per_rank = max(1, 16 // world)
        counts = set()
        for rank in range(world):
            order = drop_lone_last(shard(torch.arange(n), DistInfo(rank=rank, world_size=world)), per_rank)
            sizes = [len(order[s : s + per_rank]) for s in range(0, order.numel(), per_rank)]
            assert 1 not in sizes, (n, world, rank, sizes)
            counts.add(len(sizes))
        assert len(counts) == 1  # every rank takes the same number of optimizer steps (DDP)


# ---- chance-level accuracy -------------------------------------------------------------------------------


def test_chance_accuracy_warning_names_exit_and_number(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_chance_accuracy([0.11, 0.42, 0.15], 10, "ee test accuracy")
    warned = _messages(caplog, "edgeexit.train.loop")
    assert len(warned) == 2
    assert "exit 1 is 0.1100" in warned[0] and "exit final is 0.1500" in warned[1]
    assert all("chance (1/10 = 0.1000)" in m and "more epochs" in m for m in warned)


def test_no_warning_for_a_model_that_learned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert warn_chance_accuracy([0.55, 0.9, 0.97], 10) == []
        assert warn_chance_accuracy([0.8, 0.95], 2) == []
    assert _messages(caplog, "edgeexit.train.loop") == []


# ---- progress without a terminal -------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow(n: int):
    for i in range(n):
        time.sleep(0.002)
        yield i


def test_progress_logs_done_total_and_eta_without_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()  # a redirected log: not a terminal
    with caplog.at_level(logging.INFO, logger="edgeexit.progress"):
        bar = progress(_slow(5), total=5, desc="demo epoch", unit="batch", stream=stream, interval=0.001)
        assert isinstance(bar, LogProgress)
        bar.set_postfix(loss="0.5000")
        assert list(bar) == [0, 1, 2, 3, 4]
        bar.close()  # idempotent: the last line is logged once
    lines = _messages(caplog, "edgeexit.progress", logging.INFO)
    pattern = re.compile(r"^demo epoch: (\d)/5 \(\d+%\) \[\d\d:\d\d<\d\d:\d\d, .*batch/s, loss=0.5000\]$")
    assert len(lines) == 6 and all(pattern.match(m) for m in lines), lines
    assert [pattern.match(m).group(1) for m in lines] == ["1", "2", "3", "4", "5", "5"]  # type: ignore[union-attr]
    assert stream.getvalue() == ""  # no bar drawn


def test_progress_is_quiet_for_a_short_loop_and_a_bar_on_a_terminal(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with caplog.at_level(logging.INFO, logger="edgeexit.progress"):
        assert list(progress(range(3), desc="short", stream=io.StringIO(), interval=3600)) == [0, 1, 2]
        assert list(progress(range(3), desc="rank 1", stream=io.StringIO(), enabled=False)) == [0, 1, 2]
        term = _Terminal()
        bar = progress(range(3), desc="tty", stream=term, interval=0.0)
        assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    assert _messages(caplog, "edgeexit.progress", logging.INFO) == []
    assert "tty:" in term.getvalue()  # a bar was drawn on the terminal
    monkeypatch.setenv("EDGEEXIT_PROGRESS_INTERVAL", "5")
    assert default_interval() == 5.0
    monkeypatch.setenv("EDGEEXIT_PROGRESS_INTERVAL", "soon")
    assert default_interval() == 60.0


# ---- the time estimate of `edgeexit reproduce` -----------------------------------------------------------


def test_reproduce_estimate_from_the_first_ee_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDir(tmp_path / "run")
    cfg = RunConfig()
    cfg.train.epochs, cfg.train.batch_size = 10, 100
    cfg.train.conventional = "separate"
    cfg.experiment.levels = [0.0, 1.0]
    names = ["train_ee", "train_conventional", "calibrate", "evaluate", "ablation", "online"]
    assert estimate_stages(run, cfg, names) == dict.fromkeys(names)  # nothing before the first epoch
    split = make_split(np.repeat(np.arange(2), 500), 0)  # 800 train, 100 val, 100 test
    split.save(run.split)
    assert isinstance(Split.load(run.split), Split)
    (run.ee).mkdir(parents=True)
    (run.ee / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 16.0}) + "\n")
    est = estimate_stages(run, cfg, names)
    s = 16.0 / 8  # seconds per training batch
    assert est["train_ee"] == pytest.approx(9 * 8 * s)
    assert est["train_conventional"] == pytest.approx(10 * 8 * s)
    assert est["calibrate"] == pytest.approx(2 * 100 * s / 300)
    assert est["evaluate"] == pytest.approx(2 * 2 * 100 * s / 300)
    assert est["ablation"] == pytest.approx(10 * 8 * s + 100 * s / 300 + 2 * 100 * s / 300)
    assert est["online"] is None
    cfg.train.conventional = "final_exit"
    assert estimate_stages(run, cfg, ["train_conventional"]) == {"train_conventional": 0.0}
    with caplog.at_level(logging.INFO, logger="edgeexit.experiment.pipeline"):
        log_estimate(run, cfg, "calibrate", 75.0)
    (line,) = _messages(caplog, "edgeexit.experiment.pipeline", logging.INFO)
    assert line.startswith("reproduce: 01:15 elapsed; the stages from calibrate on should take about 02:4")
    assert "calibrate 00:01" in line and "online, plan not estimated" in line
