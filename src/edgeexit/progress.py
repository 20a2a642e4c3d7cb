"""Progress of long loops: a tqdm bar on a terminal, periodic INFO log lines without one.

tqdm switches its bar off when its stream is not a terminal (`disable=None`), so a long epoch written to a
redirected log said nothing until it ended. `progress(...)` keeps the bar on a TTY and, without one, logs a line
every `interval` seconds (60 by default; `EDGEEXIT_PROGRESS_INTERVAL` or the argument changes it) and a last
line when a loop that was reported ends, each with done/total, the rate and the loop's ETA, formatted by tqdm's
own `format_meter`::

    ee epoch 3/12: 40/63 (63%) [01:00<00:34, 0.67batch/s, loss=0.4213]

A loop shorter than the interval logs nothing: its caller's own summary line (epoch losses, calibration) says
that it finished.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

__all__ = ["progress", "LogProgress", "default_interval", "is_tty", "silence"]


class _MainRankOnly(logging.Filter):
    """Drops records on every rank but 0 of an initialised torch process group (without importing torch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        dist = sys.modules.get("torch.distributed")
        return not (
            dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
        )


log = logging.getLogger(__name__)
log.addFilter(_MainRankOnly())

T = TypeVar("T")
_silenced: list[bool] = []  # non-empty: this process shows no progress at all (see `silence`)
INTERVAL_ENV = "EDGEEXIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 60.0
_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def default_interval() -> float:
    """Seconds between log lines: $EDGEEXIT_PROGRESS_INTERVAL when it is a positive number, else 60."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def is_tty(stream: IO[str] | None) -> bool:
    """Whether `stream` is an interactive terminal (where a tqdm bar is drawn)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


class LogProgress(Generic[T]):
    """Iterates `iterable`, logging a tqdm-formatted progress line every `interval` seconds and at the end."""

    def __init__(
        self,
        iterable: Iterable[T],
        total: int | None,
        desc: str,
        unit: str,
        interval: float,
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval, self.logger, self.clock = interval, logger, clock
        self.n = 0
        self.postfix = ""
        self.start = self.last = clock()
        self.reported = False
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
            self.n += 1
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self._log(now)
        self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def line(self, now: float | None = None) -> str:
        """The progress line now: done/total, percentage, elapsed<ETA, rate and the postfix."""
        elapsed = (self.clock() if now is None else now) - self.start
        return tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            bar_format=_FORMAT if self.total else _FORMAT_NO_TOTAL,
        )

    def _log(self, now: float) -> None:
        self.reported = True
        self.logger.info("%s", self.line(now))

    def set_postfix(self, refresh: bool = False, **kwargs: Any) -> None:
        """Values shown after the rate (tqdm's `set_postfix`: `key=value, ...`)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        """Log the last line of a loop that was reported at least once (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.reported:
            self._log(self.clock())


def silence() -> None:
    """Show no progress in this process from now on: a worker process whose parent reports for it."""
    _silenced.append(True)


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    interval: float | None = None,
    stream: IO[str] | None = None,
    logger: logging.Logger | None = None,
) -> tqdm[T] | LogProgress[T]:
    """A progress wrapper for a loop: tqdm on a terminal, `LogProgress` (INFO lines) otherwise.

    `enabled=False` shows nothing (other DDP ranks); `stream` is the terminal tested (default stderr, where tqdm
    draws); `interval` the seconds between log lines (default `default_interval()`); `logger` where lines go.
    Both results iterate like `iterable` and have `set_postfix(**values)` and `close()`.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _silenced:  # no tqdm at all: a forked worker must not touch the lock tqdm's monitor thread takes
        return LogProgress(iterable, total, desc, unit, math.inf, logger or log)
    out = sys.stderr if stream is None else stream
    if not enabled or is_tty(out):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=out)
    every = default_interval() if interval is None else max(0.0, float(interval))
    return LogProgress(iterable, total, desc, unit, every, logger or log)
