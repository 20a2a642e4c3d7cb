"""The servers' connection limits, in one place (a light module: the CLI imports it for its defaults).

How they are enforced: `server.LimitedHttpProtocol` (idle timeout, head size, quiet disconnects),
`server.prepare_process` (file descriptors, accept errors), `http.ConcurrencyLimit` (requests in progress).
"""

from __future__ import annotations

import math

from edgeexit.errors import UserError

__all__ = [
    "ACCEPT_LOG_PERIOD_S",
    "BODY_STALL_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONCURRENCY",
    "MAX_HEADER_BYTES",
    "RETRY_AFTER_S",
    "check_idle_timeout",
    "check_max_concurrency",
]

# A connection that has not sent a whole request head this many seconds after it opened or after its last
# answer is closed. uvicorn's keep-alive default; clients' pools should expire idle connections sooner
# (CloudClient retries once on a kept-alive connection the server has just closed).
DEFAULT_IDLE_TIMEOUT_S = 5.0
MAX_HEADER_BYTES = 16 << 10  # request line and headers; h11's and Node's default
# Requests a server works on at once, per process; beyond it: 503 with Retry-After. Requests wait in the
# batcher or the thread pool meanwhile, and each holds its body (up to --max-body-mb).
DEFAULT_MAX_CONCURRENCY = 256
RETRY_AFTER_S = 1
# A request body that makes no progress for this long is answered 408 and its connection closed (nginx's
# client_body_timeout, 60 s there): otherwise a client sending a body a byte at a time holds a request slot
# (--max-concurrency) for as long as it likes. The idle timeout covers only the request head.
BODY_STALL_TIMEOUT_S = 10.0
ACCEPT_LOG_PERIOD_S = 10.0  # at most one log line per period about failed accepts (out of descriptors)


def check_idle_timeout(seconds: object) -> float:
    """`seconds` as a float when it is a finite number > 0; else a UserError."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise UserError(f"idle timeout must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


def check_max_concurrency(n: object) -> int:
    """`n` when it is an integer >= 1; else a UserError."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"max concurrency must be an integer >= 1, got {n!r}")
    return n
