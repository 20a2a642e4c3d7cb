"""The sweep's distortion levels computed side by side: the main process and worker processes fill the cache.

One process gets only its share of a busy CPU, and its OpenMP threads collapse when a partner is descheduled
(edgeexit.threads); separate single-thread processes do not wait on each other, so beside other work the sweep
keeps about one share per process. Levels are independent, so they are the unit of work:

- `LevelPool` forks its workers once the main process holds the models and the images: a forked worker starts
  in milliseconds with both already in memory (shared copy-on-write), where a spawned one spends about 3.5 s of
  CPU importing torch and torchvision and loading the models, half of the default sweep's whole CPU time.
  Each process then computes with ONE intra-op thread: GNU OpenMP cannot start a thread team in a child forked
  after its parent used one (measured: it hangs), and single-thread processes are the point anyway.
- `LevelPool.fill` hands out the levels missing from the cache one at a time, from a counter in shared memory,
  to the workers and to the main process itself: whoever is free takes the next level.
- Every result goes through the cache (`cached_probabilities`); the sweep then reads it as any resumed run
  does, so its records are those of the in-process path at one thread. A level is written atomically when
  done: after a failure (a worker killed, an exception) the levels finished stay cached, and the next run
  computes only the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeexit import threads
from edgeexit.data.distortions import distort
from edgeexit.errors import EdgeExitError
from edgeexit.evaluate.cache import cached_probabilities, load_cached
from edgeexit.model.spec import ModelSpec
from edgeexit.progress import progress, silence
from edgeexit.rundir import RunDir

__all__ = [
    "LevelInputs",
    "LevelPool",
    "SweepModels",
    "WorkerFailed",
    "level_probabilities",
    "sweep_processes",
]

log = logging.getLogger(__name__)


class WorkerFailed(EdgeExitError):
    """A sweep worker process died or raised; the levels finished before it are cached."""


@dataclass
class SweepModels:
    """The calibrated EE-DNN and (None when unused) the conventional DNN of a run."""

    net: nn.Module
    spec: ModelSpec
    conv_net: nn.Module | None = None
    conv_spec: ModelSpec | None = None


@dataclass(frozen=True)
class LevelInputs:
    """Everything one level's probabilities need besides the models: the undistorted uint8 test images."""

    distortion: str
    ids: np.ndarray
    images: torch.Tensor
    conv_images: torch.Tensor | None  # the conventional DNN's images; None: the same as `images`
    batch_size: int


def level_probabilities(
    run: RunDir, models: SweepModels, inputs: LevelInputs, level: float
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Every exit's probabilities (final last) of the EE-DNN and of the conventional DNN (None without one)
    at one level, from the cache when it holds them (nothing distorted then), else computed and cached."""
    key = {"distortion": inputs.distortion, "level": level, "sample_ids": inputs.ids}
    seeds = inputs.ids.tolist()  # distortion noise seeded by sample id: the online run draws the same noise
    x: torch.Tensor | None = None
    ee = load_cached(run, "ee", models.spec, key)
    if ee is None:
        x = distort(inputs.images, inputs.distortion, level, seeds=seeds)
        ee = cached_probabilities(run, "ee", models.net, models.spec, x, key, inputs.batch_size)
    if models.conv_net is None or models.conv_spec is None:
        return ee, None
    conv = load_cached(run, "conventional", models.conv_spec, key)
    if conv is None:
        if inputs.conv_images is not None:
            cx = distort(inputs.conv_images, inputs.distortion, level, seeds=seeds)
        else:
            cx = x if x is not None else distort(inputs.images, inputs.distortion, level, seeds=seeds)
        conv = cached_probabilities(
            run, "conventional", models.conv_net, models.conv_spec, cx, key, inputs.batch_size
        )
    return ee, conv


def sweep_processes(levels: int, device: torch.device) -> int:
    """How many processes compute `levels` missing levels: `threads.processes_for` on Linux's CPU, else 1 (CUDA:
    one process owns the device; elsewhere fork is not safe to use with torch)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return 1
    return threads.processes_for(levels)


def _claim(counter: Any, n: int) -> int | None:
    """The next unclaimed level's index, or None when every level is taken."""
    with counter.get_lock():
        i = counter.value
        if i >= n:
            return None
        counter.value = i + 1
        return i


def _compute(job: _Job, counter: Any) -> Iterator[float]:
    """Claims and computes levels until none is left; yields each level done."""
    while (i := _claim(counter, len(job.levels))) is not None:
        level_probabilities(job.run, job.models, job.inputs, job.levels[i])
        with job.done.get_lock():
            job.done.value += 1
        yield job.levels[i]


@dataclass
class _Job:
    """What every process of a pool works on (a forked worker inherits it, nothing is pickled)."""

    run: RunDir
    models: SweepModels
    inputs: LevelInputs
    levels: list[float]
    next: Any  # shared counter: index of the next level to claim
    done: Any  # shared counter: levels finished


# ---- the worker side ------------------------------------------------------------------------------------

_worker: dict[str, _Job] = {}


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when its parent is gone (killed): an orphan would go on claiming levels for nobody."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(job: _Job, parent: int) -> None:
    """Runs once in each forked worker: one thread (see the module docstring), no progress display."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    threads.set_threads(1)
    silence()  # the main process reports progress for every process
    _worker["job"] = job


def _fill() -> list[float]:
    """In a worker: compute levels into the cache until none is left unclaimed; the levels done here."""
    job = _worker["job"]
    return list(_compute(job, job.next))


# ---- the main side --------------------------------------------------------------------------------------


class LevelPool:
    """`workers` forked processes that, with this one, compute `levels` of a sweep into the run's cache."""

    def __init__(
        self, run: RunDir, models: SweepModels, inputs: LevelInputs, levels: Sequence[float], workers: int
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        self.workers = workers
        self.job = _Job(run, models, inputs, list(levels), ctx.Value("i", 0), ctx.Value("i", 0))
        self._closed = False
        self._executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(self.job, os.getpid())
        )
        for stream in (sys.stdout, sys.stderr):  # else a child would write what is buffered once more
            stream.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns on any fork of a multi-threaded process (torch's idle OpenMP threads count);
            # the workers compute with one thread and touch no lock those threads could hold.
            warnings.filterwarnings(
                "ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning
            )
            self._futures: list[Future] = [self._executor.submit(_fill) for _ in range(workers)]
        log.info(
            "computing %d levels in %d processes: this one and %d forked", len(levels), workers + 1, workers
        )

    def fill(self, desc: str) -> None:
        """Compute the levels, in the workers and in this process; raises `WorkerFailed` (after ending the
        others) when a worker dies or raises. Closes the pool."""
        ok = False
        try:
            with threads.threads_for(1):
                for _ in progress(self._work(), total=len(self.job.levels), desc=desc, unit="level"):
                    pass
            ok = True
        finally:
            self.close(kill=not ok)

    def _work(self) -> Iterator[None]:
        """Computes levels here while any is unclaimed, then waits for the workers' last ones; yields once per
        level finished by any process."""
        shown = 0
        mine = _compute(self.job, self.job.next)
        while True:
            failure = self._failure()
            if failure is not None:
                raise WorkerFailed(
                    f"a sweep worker process failed ({type(failure).__name__}: {failure}); the levels already "
                    f"computed are cached in {self.job.run.cache}: run the command again to resume"
                ) from failure
            if next(mine, None) is None:
                if all(f.done() for f in self._futures):
                    done = [f.result() for f in self._futures]
                    log.debug("levels computed by the worker processes: %s", done)
                    break
                wait(self._futures, timeout=0.5, return_when=FIRST_EXCEPTION)
            while shown < self.job.done.value:
                shown += 1
                yield
        while shown < self.job.done.value:
            shown += 1
            yield

    def _failure(self) -> BaseException | None:
        """The first exception of a finished worker task, if any."""
        for f in self._futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                return f.exception()
        return None

    def close(self, kill: bool = False) -> None:
        """Stop handing out levels and let the workers exit when idle; `kill`: end them now, mid-level."""
        if self._closed:
            return
        self._closed = True
        with self.job.next.get_lock():
            self.job.next.value = 1 << 30  # no level left to claim
        # The executor has no public way to end its processes before Python 3.14 (terminate_workers).
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        if kill:  # safe: a worker writes a level atomically or not at all
            for p in processes:
                p.kill()
