"""A circuit breaker for the edge's offloads: after N consecutive failures the edge stops asking the cloud.

States: ``closed`` (offloads go through; `failures` consecutive failures open it), ``open`` (every offload is
refused at once, for `cooldown` seconds), ``half_open`` (the cool-down is over and ONE probe offload is out;
every other offload is still refused until it ends): the probe's success closes the breaker, its failure opens
it for another cool-down.

A small state machine rather than pybreaker (1.4.1): pybreaker's `CircuitBreaker.call` holds the breaker's
lock for the whole guarded call, so a multi-threaded edge would offload one image at a time, and while the
half-open probe is out other callers would queue behind it instead of answering at the edge. Here the lock is
held only to read and change the state, a few microseconds per offload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgeexit.errors import UserError

__all__ = ["CircuitBreaker", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Thread-safe; `admit` before an offload, `record` its result after (see the module docstring)."""

    def __init__(
        self, failures: int = 5, cooldown: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise UserError(f"breaker failures must be an integer >= 1, got {failures!r}")
        if not cooldown > 0:
            raise UserError(f"breaker cool-down must be > 0 seconds, got {cooldown!r}")
        self.failures = failures
        self.cooldown = float(cooldown)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0

    @property
    def state(self) -> str:
        """ "closed", "open" or "half_open" (an open breaker whose cool-down is over reads "open" until the
        next offload goes out as its probe)."""
        return self._state

    def admit(self) -> bool | None:
        """None: refused (open, or the half-open probe is already out); False: go ahead; True: go ahead as
        the half-open probe (its `record` decides the state)."""
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
                self._state = HALF_OPEN
                return True
            return None

    def record(self, ok: bool, probe: bool) -> None:
        """The result of an admitted offload (`probe`: what `admit` returned)."""
        with self._lock:
            if probe:
                self._consecutive = 0 if ok else self.failures
                self._state = CLOSED if ok else OPEN
                if not ok:
                    self._opened_at = self._clock()
            elif self._state == CLOSED:
                # Offloads admitted before the breaker opened and ending after: ignored, the probe decides.
                self._consecutive = 0 if ok else self._consecutive + 1
                if self._consecutive >= self.failures:
                    self._state = OPEN
                    self._opened_at = self._clock()

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._state}, failures={self.failures}, cooldown={self.cooldown:g} s)"
