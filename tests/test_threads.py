"""Thread counts on a shared machine (edgeexit.threads): fixed, adaptive to other processes' load, restored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeexit import threads
from edgeexit.errors import UserError


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch at 2 threads (the test session pins 1) on a 2-CPU affinity; everything restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        yield
    finally:
        threads._auto.clear()
        threads._fixed.clear()
        torch.set_num_threads(before)


def _load(monkeypatch: pytest.MonkeyPatch, runnable: int) -> None:
    """The scheduler reports `runnable` tasks, one of them ours."""
    monkeypatch.setattr(threads, "_runnable_now", lambda: runnable)
    monkeypatch.setattr(threads, "_own_running", lambda: 1)


@pytest.mark.parametrize(("runnable", "expected"), [(1, 2), (2, 1), (4, 1), (9, 1)])
def test_adaptive_threads_leave_the_cpus_other_processes_use(
    two_threads: None, monkeypatch: pytest.MonkeyPatch, runnable: int, expected: int
) -> None:
    _load(monkeypatch, runnable)
    assert threads.set_threads(None) == expected == torch.get_num_threads()


def test_adaptive_threads_follow_the_load_and_never_exceed_the_default(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(monkeypatch, 4)  # three other busy processes
    assert threads.set_threads(None) == 1
    _load(monkeypatch, 1)  # they have gone: back to torch's default, not more
    assert threads.adapt() == 2
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads.adapt() == 2


def test_fixed_threads_do_not_adapt(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(monkeypatch, 9)
    assert threads.set_threads(2) == 2
    assert threads.adapt() == 2 == torch.get_num_threads()


def test_without_proc_the_default_stays(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_runnable_now", lambda: None)
    assert threads.set_threads(None) == 2


def test_threads_for_restores_the_count_and_the_mode(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(monkeypatch, 1)
    threads.set_threads(None)
    with threads.threads_for(1) as n:
        assert n == 1 == torch.get_num_threads()
        assert threads.adapt() == 1  # fixed inside the block
    assert torch.get_num_threads() == 2 and threads._auto  # adaptive again


@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="needs Linux's /proc")
def test_the_real_proc_is_read() -> None:
    assert threads._runnable_now() >= 1  # this test's own thread is running
    assert threads._own_running() >= 1
    busy = threads.busy_elsewhere(samples=2, interval=0.0)
    assert busy is not None and busy >= 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad: object) -> None:
    with pytest.raises(UserError, match="threads must be an integer >= 1"):
        threads.set_threads(bad)  # type: ignore[arg-type]


def test_independent_work_gets_one_single_thread_process_per_thread_of_the_budget(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert threads.processes_for(10) == 1  # never configured (the Python API): one process, as before
    _load(monkeypatch, 4)
    threads.set_threads(None)  # adaptive: the budget is torch's default, whatever the load now
    assert threads.processes_for(10) == 2
    assert threads.processes_for(1) == 1  # never more processes than pieces of work
    threads.set_threads(3)
    assert threads.processes_for(10) == 3 and threads.processes_for(2) == 2
    with threads.threads_for(1):
        assert threads.processes_for(10) == 1
    assert threads.processes_for(10) == 3  # the fixed budget is back after the block
