"""The sweep's levels in several processes (edgeexit.evaluate.parallel) on a real tiny run: the same records and
cache as the in-process path, resumption from cached levels, a killed worker as a clear error."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from edgeexit import threads
from edgeexit.config import RunConfig
from edgeexit.evaluate.parallel import WorkerFailed
from edgeexit.evaluate.sweep import evaluate_run
from edgeexit.rundir import RunDir

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parallel sweep forks (Linux)"
)

LEVELS = [0.0, 0.8, 1.5, 2.5]
GRID = {"levels": LEVELS, "alphas": [0.5, 0.9], "edge_branches": [1, 3], "limit": 160}


@dataclass
class Result:
    root: Path
    records: pd.DataFrame
    summary: pd.DataFrame


def _copy(tiny_run: tuple[Path, RunConfig], dest: Path) -> Path:
    shutil.copytree(tiny_run[0], dest, ignore=shutil.ignore_patterns("cache", "onnx"))
    return dest


def _cache(root: Path) -> dict[str, Path]:
    base = RunDir(root).cache
    return {str(f.relative_to(base)): f for f in sorted(base.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def in_process(tiny_run: tuple[Path, RunConfig], tmp_path_factory: pytest.TempPathFactory) -> Result:
    """The reference: the whole grid in this process (the test session's one thread, no `set_threads`)."""
    assert threads.processes_for(len(LEVELS)) == 1  # the Python API stays in one process unless it opts in
    root = _copy(tiny_run, tmp_path_factory.mktemp("in_process") / "run")
    records, summary = evaluate_run(root, tiny_run[1], **GRID)
    return Result(root, records, summary)


def _parallel(
    root: Path, cfg: RunConfig, caplog: pytest.LogCaptureFixture
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep with a budget of 2 threads: two single-thread processes, this one and a forked worker."""
    with threads.threads_for(2), caplog.at_level(logging.INFO, logger="edgeexit.evaluate.parallel"):
        return evaluate_run(root, cfg, **GRID)


def _same(a: Result | tuple[pd.DataFrame, pd.DataFrame], b: Result) -> None:
    records, summary = (a.records, a.summary) if isinstance(a, Result) else a
    pd.testing.assert_frame_equal(records, b.records, check_exact=True)
    pd.testing.assert_frame_equal(summary, b.summary, check_exact=True)


def test_parallel_sweep_gives_the_in_process_records_and_cache(
    tiny_run: tuple[Path, RunConfig], in_process: Result, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(tiny_run, tmp_path / "run")
    _same(_parallel(root, tiny_run[1], caplog), in_process)
    assert "computing 4 levels in 2 processes: this one and 1 forked" in caplog.text
    ours, theirs = _cache(root), _cache(in_process.root)
    assert list(ours) == list(theirs) and len(ours) == 2 * len(LEVELS)  # EE-DNN and conventional per level
    for name, path in ours.items():
        a, b = load_file(path), load_file(theirs[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.get_num_threads() == 1  # the session's thread count is back


def test_a_resumed_sweep_computes_only_the_missing_levels(
    tiny_run: tuple[Path, RunConfig], in_process: Result, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(tiny_run, tmp_path / "run")
    evaluate_run(root, tiny_run[1], **{**GRID, "levels": LEVELS[:1]})
    first = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in _cache(root).items()}
    assert len(first) == 2
    _same(_parallel(root, tiny_run[1], caplog), in_process)
    assert "computing 3 levels in 2 processes" in caplog.text
    cache = _cache(root)
    assert {n: (cache[n].stat().st_ino, cache[n].stat().st_mtime_ns) for n in first} == first  # not rewritten
    assert len(cache) == 2 * len(LEVELS)


def _forked_children() -> list[int]:
    """Our child processes that run our own command line: the forked sweep workers."""
    me, found = os.getpid(), []
    mine = Path(f"/proc/{me}/cmdline").read_bytes()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and (proc / "cmdline").read_bytes() == mine:
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_killed_worker_is_a_clear_error_and_the_next_run_resumes(
    tiny_run: tuple[Path, RunConfig], in_process: Result, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(tiny_run, tmp_path / "run")
    killed: list[int] = []
    stop = threading.Event()

    def kill_the_worker() -> None:  # as the kernel's OOM killer would, as soon as the worker exists
        while not stop.is_set() and not killed:
            for pid in _forked_children():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.002)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    try:
        with pytest.raises(
            WorkerFailed, match=r"sweep worker process failed .*run the command again to resume"
        ):
            _parallel(root, tiny_run[1], caplog)
    finally:
        stop.set()
        killer.join()
    assert killed
    done = {name: p.stat().st_mtime_ns for name, p in _cache(root).items()}  # what finished before the error
    assert not (RunDir(root).records).exists()
    _same(_parallel(root, tiny_run[1], caplog), in_process)
    assert {n: p.stat().st_mtime_ns for n, p in _cache(root).items() if n in done} == done
