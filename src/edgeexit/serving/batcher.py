"""Dynamic batching: concurrent requests that need the same computation run as one forward pass.

One `Batcher` per server process. Requests `submit` an item under a key (the cloud uses ("offload", k) and
("classify",)); one consumer task runs one batch at a time, in a worker thread so the event loop keeps
accepting requests meanwhile. A batch is the oldest waiting item plus every later item with the same key,
up to `max_batch` rows. While a batch computes, new requests queue up, so under load batches form by
themselves and an idle server answers a lone request at once. How long a batch that is not full waits for more:

- `max_wait_ms` None (the default), adaptive: after a batch of several rows (the server is under load, its
  clients will be back), the next batch of that key waits until as many rows are queued as the last one had, for
  at most a fifth of the last batch's compute time (ADAPTIVE_HOLD, capped at ADAPTIVE_HOLD_MAX_MS); after a batch
  of one row it does not wait, so a single client sees no delay;
- `max_wait_ms` 0: never wait;
- `max_wait_ms` T > 0: wait up to T ms after the oldest item arrived, trading latency for larger batches.

A lone request runs at once on the event loop itself, not in the worker thread, when the batcher is idle
(nothing queued, no batch computing, no other request arriving in the same turn of the loop), the last batch of
its key was one request alone, and that batch says it takes at most INLINE_MAX_MS. The hop to a worker thread
and back costs 0.15-0.2 ms, a large share of a small offload's answer; blocking the loop that briefly costs
nothing when no other request is there (one that arrives meanwhile waits in its socket buffer and joins the
next batch). Under load batches hold several requests, so they run in the worker thread as before.

Each request gets its own answer: `run(key, items)` returns one result per item. When `run` raises, every
request of that batch gets `BatchFailed` (the apps answer 5xx with the request's id) and the next batch runs
as usual. A request whose client has gone (its future cancelled) is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Batcher", "BatchFailed", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT_MS", "check_batching"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_MS: float | None = None  # adaptive
ADAPTIVE_HOLD = 0.2  # of the last batch's compute time
ADAPTIVE_HOLD_MAX_MS = 5.0
INLINE_MAX_MS = 2.0  # an idle batcher runs a request this quick on the event loop, not in a worker thread

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchFailed(Exception):
    """The batch this request was part of failed; `str()` says how, in one line."""


def _failed(rows: int, exc: Exception) -> str:
    return f"its batch of {rows} rows failed ({type(exc).__name__}: {str(exc)[:160]})"


@dataclass
class _Job(Generic[Item]):
    key: Hashable
    item: Item
    rows: int
    future: asyncio.Future
    arrived: float  # loop.time()


def check_batching(max_batch: object, max_wait_ms: object) -> tuple[int, float | None]:
    """(max_batch, max_wait_ms) when max_batch is an integer >= 1 and max_wait_ms None (adaptive) or a finite
    number >= 0."""
    from edgeexit.errors import UserError

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max_batch must be an integer >= 1 (1 turns batching off), got {max_batch!r}")
    if max_wait_ms is None:
        return max_batch, None
    ok = isinstance(max_wait_ms, int | float) and not isinstance(max_wait_ms, bool)
    if not ok or not 0 <= float(max_wait_ms) < 60_000:  # also refuses nan and inf
        raise UserError(f"max_wait_ms must be a number of milliseconds in [0, 60000), got {max_wait_ms!r}")
    return max_batch, float(max_wait_ms)


class Batcher(Generic[Item, Result]):
    """Gathers concurrent submissions with the same key into one call of `run(key, items) -> results`.

    `run` is synchronous (a model forward) and runs in a worker thread, one batch at a time.
    """

    def __init__(
        self,
        run: Callable[[Hashable, list[Item]], Sequence[Result]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_ms: float | None = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        self.max_batch, max_wait_ms = check_batching(max_batch, max_wait_ms)
        self.max_wait = None if max_wait_ms is None else max_wait_ms / 1e3
        self._last: dict[Hashable, tuple[int, float]] = {}  # key -> (rows, seconds) of its last batch
        self.run = run
        self._jobs: deque[_Job[Item]] = deque()
        self._wake: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None
        self._computing = False  # a batch is in the worker thread
        self._pondering = False  # a request is looking for company before running on the loop
        self._alone: dict[Hashable, bool] = {}  # key -> whether its last batch was one request

    async def submit(self, key: Hashable, item: Item, rows: int = 1) -> Result:
        """Queue `item` (`rows` rows of the batch, 1..max_batch) and wait for its result; BatchFailed if its
        batch failed."""
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"an item of {rows} rows; this batcher takes 1..{self.max_batch}")
        if self._idle() and not self._pondering and self._alone.get(key) and self._quick(key, rows):
            self._pondering = True  # requests that arrived with this one queue up instead
            try:
                await asyncio.sleep(0)  # let them
            finally:
                self._pondering = False
            if self._idle():
                return self._run_inline(key, item, rows)
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._wake = asyncio.Event()
            self._consumer = loop.create_task(self._consume(), name="edgeexit-batcher")
        job = _Job(key, item, rows, loop.create_future(), loop.time())
        self._jobs.append(job)
        assert self._wake is not None
        self._wake.set()
        return await job.future

    def _idle(self) -> bool:
        return not self._jobs and not self._computing

    def _quick(self, key: Hashable, rows: int) -> bool:
        """Whether `rows` rows of `key` should take at most INLINE_MAX_MS, judged from its last batch (none: no)."""
        last = self._last.get(key)
        return last is not None and last[1] * 1e3 * max(1.0, rows / last[0]) <= INLINE_MAX_MS

    def _run_inline(self, key: Hashable, item: Item, rows: int) -> Result:
        """One request's batch run here, on the event loop (the batcher is idle; see the module docstring)."""
        t0 = time.perf_counter()
        try:
            results = self._compute(key, [item])
        except Exception as exc:
            log.warning("batch of %d rows (1 request, key %s) failed: %r", rows, key, exc)
            raise BatchFailed(_failed(rows, exc)) from None
        self._note(key, rows, 1, time.perf_counter() - t0)
        return results[0]

    def _compute(self, key: Hashable, items: list[Item]) -> Sequence[Result]:
        """`run` on one batch, checked to give one result per item."""
        results = self.run(key, items)
        if len(results) != len(items):
            raise RuntimeError(f"{len(results)} results for {len(items)} requests")
        return results

    def _note(self, key: Hashable, rows: int, requests: int, seconds: float) -> None:
        """Remember a finished batch of `key`: what the adaptive hold and the inline path judge by."""
        self._last[key] = (rows, seconds)
        self._alone[key] = requests == 1
        log.debug("batch of %d rows (%d requests) in %.2f ms", rows, requests, seconds * 1e3)

    def _rows_waiting(self, key: Hashable) -> int:
        return sum(j.rows for j in self._jobs if j.key == key and not j.future.done())

    def _take(self) -> list[_Job[Item]]:
        """The next batch: the oldest live job and the following jobs with its key, up to max_batch rows."""
        while self._jobs and self._jobs[0].future.done():  # cancelled: its client has gone
            self._jobs.popleft()
        if not self._jobs:
            return []
        key = self._jobs[0].key
        batch: list[_Job[Item]] = []
        rows = 0
        rest: deque[_Job[Item]] = deque()
        for job in self._jobs:
            if job.future.done():
                continue
            if job.key == key and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
            else:
                rest.append(job)
        self._jobs = rest
        return batch

    def _target(self, key: Hashable) -> tuple[int, float]:
        """(rows worth waiting for, seconds to wait at most from the oldest job's arrival) for `key`."""
        if self.max_wait is not None:
            return self.max_batch, self.max_wait
        rows, seconds = self._last.get(key, (1, 0.0))
        if rows <= 1:
            return 1, 0.0
        return min(rows, self.max_batch), min(ADAPTIVE_HOLD * seconds, ADAPTIVE_HOLD_MAX_MS / 1e3)

    async def _hold(self) -> None:
        """Wait until the oldest job's batch has the rows worth waiting for, or it has waited long enough."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while self._jobs:
            oldest = self._jobs[0]
            rows, wait = self._target(oldest.key)
            left = oldest.arrived + wait - loop.time()
            if left <= 0 or self._rows_waiting(oldest.key) >= rows or oldest.future.done():
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _consume(self) -> None:
        assert self._wake is not None
        try:
            while True:
                if not self._jobs:
                    self._wake.clear()
                    await self._wake.wait()
                if self.max_wait != 0:
                    await self._hold()
                batch = self._take()
                if batch:
                    await self._run(batch)
        except asyncio.CancelledError:
            self._fail(list(self._jobs), "the server is shutting down")
            raise
        except Exception as exc:  # a bug here must not leave requests waiting forever
            log.exception("batcher stopped")
            self._fail(list(self._jobs), f"the batcher stopped ({type(exc).__name__}: {exc})")
            self._jobs.clear()

    async def _run(self, batch: list[_Job[Item]]) -> None:
        rows = sum(j.rows for j in batch)
        key = batch[0].key
        t0 = time.perf_counter()
        self._computing = True
        try:
            results = await asyncio.to_thread(self._compute, key, [j.item for j in batch])
        except Exception as exc:
            log.warning("batch of %d rows (%d requests, key %s) failed: %r", rows, len(batch), key, exc)
            self._fail(batch, _failed(rows, exc))
            return
        finally:
            self._computing = False
        self._note(key, rows, len(batch), time.perf_counter() - t0)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    @staticmethod
    def _fail(jobs: list[_Job[Any]], why: str) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(BatchFailed(why))

    async def close(self) -> None:
        """Stop the consumer; requests still waiting get BatchFailed."""
        if self._consumer is not None and not self._consumer.done():
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass
