"""How many CPU threads edgeexit computes with, and how its idle threads wait.

Early-exit DNNs run on small machines that other processes share. Two defaults keep a command from
collapsing there (measured in BENCHMARKS.md, "Shared CPU"):

- OpenMP's idle threads sleep at once instead of spinning (`OMP_WAIT_POLICY=PASSIVE`). With the default
  policy, a thread that finished its share of an operator spins for its partner; when the partner has been
  descheduled by another process, the spinner burns the very core the partner needs. libgomp reads the
  variable once, when torch loads it, so `prepare_environment` must run before torch is imported: the CLI
  does it first thing. A value the user exported is kept.
- Servers use one intra-op thread per worker (`SERVER_THREADS`): their batches are small, so a second thread
  buys little and would contend with the other worker or the edge process for the same cores. Training and
  the offline sweep keep torch's default (one thread per physical core) unless `--threads` or
  `[runtime] threads` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "PASSIVE_WAIT",
    "SERVER_THREADS",
    "check_threads",
    "prepare_environment",
    "set_threads",
    "threads_for",
]

PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
SERVER_THREADS = 1


def prepare_environment() -> None:
    """Set the passive OpenMP wait policy for this process and its children, unless the user chose one."""
    for key, value in PASSIVE_WAIT.items():
        os.environ.setdefault(key, value)


def check_threads(n: object, what: str = "threads") -> int:
    """`n` if it is a positive integer; otherwise a one-line UserError."""
    from edgeexit.errors import UserError

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{what} must be an integer >= 1 (CPU threads per process), got {n!r}")
    return n


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads in torch (None: keep torch's default); the number now in use."""
    import torch

    if n is not None:
        torch.set_num_threads(check_threads(n))
    return torch.get_num_threads()


@contextlib.contextmanager
def threads_for(n: int) -> Iterator[int]:
    """Compute with `n` intra-op threads inside the block (e.g. the edge runner of an online run), then go
    back to the number used before."""
    import torch

    before = torch.get_num_threads()
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before)
