"""How many CPU threads edgeexit computes with, on machines it shares with other processes.

torch's intra-op threads (OpenMP) collapse on a busy machine: a thread that finished its share of an operator
spins for its partner, and when another process has taken the partner's core, the spinner burns the very CPU
the partner needs. Measured on 2 cores beside 3 CPU-burning processes, one training epoch took 10.7x its quiet
time with torch's default two threads, and 2.2x with one thread (BENCHMARKS.md, "Shared CPU").

OpenMP's passive wait policy (idle threads sleep at once) avoids the spinning, but on a quiet machine it cost
10-20% (every operator wakes its threads from sleep; libgomp reads the policy once, when torch loads), and on a
busy one two passive threads did no better than one spinning thread (34.6-37.1 s against 28.7-43.9 s for the
sweep, interleaved). So the commands adapt the thread count instead and leave the wait policy alone:

- `--threads N` (or `[runtime] threads = N`) fixes N threads.
- Without it, training, calibration and the sweep are *adaptive* (`set_threads(None)` turns this on; the CLI
  does, the Python API does not): before each epoch, and each distortion level of the sweep, `adapt()` counts
  the CPUs that other processes keep busy (the scheduler's runnable tasks in /proc/loadavg, our own threads
  left out) and uses one thread per CPU left free, at least one and at most torch's default.
- Servers and the edge runner use one intra-op thread per worker (`SERVER_THREADS`): their batches are small, a
  second thread buys little, and it would compete with the other worker or the edge process for the same cores.

Even one thread gets only its share of a busy machine: beside 3 busy processes on 2 cores, half a core, where a
quiet run uses about 1.6. Work that splits into independent pieces (the sweep's distortion levels,
edgeexit.evaluate.parallel) therefore runs in several single-thread processes, which do not wait on each other
(`processes_for`): as many as the budget, at most one per piece. The budget is N with `--threads N`, torch's
default thread count when adaptive (the cores, or OMP_NUM_THREADS), and 1 (one process, as before) when the
process never called `set_threads` (the Python API, unless it opts in). One thread each, because the workers
are forked and GNU OpenMP cannot start threads in a child forked after its parent used them; with fewer pieces
than the budget the rest of it stays unused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SERVER_THREADS",
    "adapt",
    "busy_elsewhere",
    "check_threads",
    "processes_for",
    "set_threads",
    "threads_for",
]

log = logging.getLogger(__name__)

SERVER_THREADS = 1
_auto: dict[str, int] = {}  # when adaptive: {"most": torch's default thread count}
_fixed: dict[str, int] = {}  # when fixed by set_threads(N): {"n": N}


def check_threads(n: object, what: str = "threads") -> int:
    """`n` if it is a positive integer; otherwise a one-line UserError."""
    from edgeexit.errors import UserError

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{what} must be an integer >= 1 (CPU threads per process), got {n!r}")
    return n


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads in torch; None: adapt to the machine's load (see `adapt`). The number in use."""
    import torch

    if n is not None:
        _auto.clear()
        _fixed["n"] = check_threads(n)
        torch.set_num_threads(n)
        return n
    _fixed.clear()
    _auto.setdefault("most", torch.get_num_threads())
    return adapt()


def processes_for(tasks: int) -> int:
    """How many single-thread processes share `tasks` independent pieces of work; see the module docstring."""
    budget = _fixed.get("n") or _auto.get("most") or 1
    return max(1, min(budget, tasks))


def _runnable_now() -> int | None:
    """Tasks the scheduler has running or ready to run now, system-wide (None where /proc is missing)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _own_running() -> int:
    """This process's threads that are running or runnable now (the sampling one included)."""
    n = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        n += state == "R"
    return max(n, 1)


def busy_elsewhere(samples: int = 5, interval: float = 0.005) -> float | None:
    """CPUs other processes keep busy now: the median over `samples` of the runnable tasks, less our own."""
    counts = []
    for i in range(samples):
        total = _runnable_now()
        if total is None:
            return None
        counts.append(max(total - _own_running(), 0))
        if i + 1 < samples:
            time.sleep(interval)
    counts.sort()
    return float(counts[len(counts) // 2])


def adapt() -> int:
    """When adaptive: one thread per CPU that other processes leave free (at least 1, at most torch's default);
    otherwise nothing changes. The number of threads in use."""
    import torch

    if not _auto:
        return torch.get_num_threads()
    most = _auto["most"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_elsewhere()
    n = most if busy is None else max(1, min(most, cpus - int(round(busy))))
    if n != torch.get_num_threads():
        log.info("%s CPU(s) busy with other processes: computing with %d thread(s)", busy, n)
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def threads_for(n: int) -> Iterator[int]:
    """Compute with `n` intra-op threads inside the block (e.g. the edge runner of an online run), then go
    back to the number, and the adaptive mode, used before."""
    import torch

    before, auto, fixed = torch.get_num_threads(), dict(_auto), dict(_fixed)
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before)
        _auto.clear()
        _auto.update(auto)
        _fixed.clear()
        _fixed.update(fixed)
