"""Fixtures shared by the whole suite: one torch thread, session-scoped tiny runs built once, and, under
pytest-xdist, timing-sensitive test files run alone."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tinyrun import build_tiny_run

from edgeexit.config import RunConfig

# Subprocesses the tests start (the CLI, servers) inherit this: no oversubscribed OpenMP threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny nets at batch 1: on a shared 2-core machine extra OpenMP threads only wait at barriers
    (measured: 0.7 s instead of 14 ms per forward under load). Restored at the end of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def alone_if_timing_sensitive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist, a test file that sets `TIMING_SENSITIVE = True` (the link emulator's bandwidth and RTT
    checks) runs while no other file runs: it takes an exclusive lock that every other file takes shared.

    Two workers share two cores; a file that trains or starts servers beside a throughput measurement starves
    the emulator and the measurement fails for reasons that have nothing to do with the code. The lock file lies
    in this run's pytest temporary directory (the workers' common parent), so separate runs never wait on each
    other; without xdist nothing is locked.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = bool(getattr(request.module, "TIMING_SENSITIVE", False))
    with open(tmp_path_factory.getbasetemp().parent / "timing.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A calibrated tiny run (EE-DNN and conventional DNN, random weights), shared read-only: copy it to change it."""
    root = tmp_path_factory.mktemp("tiny_run")
    return root, build_tiny_run(root)


@pytest.fixture(scope="session")
def tiny_run_onnx(
    tiny_run: tuple[Path, RunConfig], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RunConfig]:
    """A copy of `tiny_run` with its ONNX export in RUN_DIR/onnx (runtime "onnx"), shared read-only."""
    from edgeexit.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("tiny_run_onnx") / "run"
    shutil.copytree(tiny_run[0], root, ignore=shutil.ignore_patterns("cache", "onnx"))
    export_onnx(root)
    return root, tiny_run[1]
