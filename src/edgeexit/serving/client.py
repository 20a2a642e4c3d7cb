"""HTTP client of the cloud server: a keep-alive connection pool, one deadline per request, retries with
exponential backoff, a circuit breaker, and answers checked before they are believed.

The cloud is not trusted. Every request has ONE total deadline (`deadline`, default DEFAULT_DEADLINE) covering
connecting, sending, retries, backoff and reading: every read of the socket waits at most for the time left (and
at most `timeout`, per operation), so a cloud that drips its answer a byte at a time cannot hold the edge past it.
Connect errors, timeouts, broken connections and 5xx answers are retried while time is left (`retries` times,
waiting `backoff * 2**attempt` seconds before each retry, or the Retry-After of a busy server's 503 when longer;
one past the deadline ends the tries at once): finishing an inference is idempotent, so sending a body
twice is harmless. A 4xx answer (409 model mismatch, 422 wrong tensor, 401 token...) is something a retry
cannot fix: it raises `OffloadFailed` at once with the server's detail. An answer longer than
`max_answer_bytes` is not read past that limit. A 2xx answer is checked (`Expect`): JSON of the documented
shape, a label among the model's classes, a finite confidence in [0, 1], the model's hash, the request's id and
split point; anything else is an `OffloadFailed`, never another exception.

Every `OffloadFailed` carries a machine-readable `reason` (REASONS). After `breaker_failures` consecutive failed
offloads a circuit breaker (serving.breaker) refuses offloads at once (reason "breaker_open") for
`breaker_cooldown` seconds, then lets one probe through.

It is built on the standard library's http.client, one keep-alive connection per thread: a quarter of
httpx's CPU per request, and 40% less than urllib3's pool on top of the same http.client (BENCHMARKS.md,
request path). On a 2-core edge device that CPU is the inference's.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edgeexit.errors import EdgeExitError, UserError
from edgeexit.serving.breaker import CircuitBreaker
from edgeexit.serving.http import resolve_token

__all__ = [
    "CloudAnswer",
    "CloudClient",
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_DEADLINE",
    "Expect",
    "OffloadFailed",
    "REASONS",
    "Reply",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_ANSWER = 1 << 20  # an answer is a few hundred bytes; batched ones grow by ~40 B per row
# One offload's whole time budget, in seconds. A real offload at 224 px over the paper's link (RTT 11.91 ms,
# 93.9 Mbit/s) takes tens of ms: the largest MobileNetV2 split tensor, [1, 24, 56, 56] fp32 (301 KB), is 26 ms
# on the wire, plus the RTT and the cloud's compute (BENCHMARKS.md). The slowest of 12,909 offloads in the
# online runs kept on this loaded 2-core machine took 1.36 s (99.9th percentile 1.28 s). 5 s is 3.7x that and
# 50-100x a real offload: a healthy cloud never meets it; a dead one costs an image at most 5 s, and after
# DEFAULT_BREAKER_FAILURES such images, nothing while the breaker is open.
DEFAULT_DEADLINE = 5.0
DEFAULT_BREAKER_FAILURES = 5  # consecutive failed offloads that open the breaker
DEFAULT_BREAKER_COOLDOWN = 10.0  # seconds the open breaker answers at the edge before it lets a probe through

# Why an offload failed (OffloadFailed.reason); the edge runner adds "no_cloud" and "encode".
REASONS = (
    "deadline",  # the total deadline passed (connecting, retries, backoff and reading included)
    "connect",  # no connection: refused, unreachable, timed out while connecting
    "timeout",  # one socket operation waited `timeout` seconds (before the deadline)
    "network",  # the exchange broke: reset, closed early, not HTTP
    "http_5xx",  # a 5xx answer, after the retries
    "http_4xx",  # a 4xx answer other than 409 (not retried)
    "hash_mismatch",  # a 409 (the cloud runs another model) or an answer naming another model
    "answer_too_large",  # more than max_answer_bytes
    "bad_answer",  # not JSON of the documented shape, or a label, confidence, request id or k that cannot be
    "breaker_open",  # refused at once: the circuit breaker is open
    "closed",  # the client was closed
)


class OffloadFailed(EdgeExitError):
    """The cloud gave no usable answer: the message says why, `reason` (one of REASONS) says it for machines."""

    def __init__(self, message: str, status: int | None = None, *, reason: str) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the last answer, None when none came
        self.reason = reason


@dataclass
class CloudAnswer:
    """The cloud's classification of one offloaded tensor or image."""

    label: int
    class_name: str
    confidence: float
    server_ms: float
    request_id: str
    model_hash: str | None = None
    k: int | None = None


@dataclass(frozen=True)
class Expect:
    """What a usable answer must say besides its shape: the model that answers (content hash), the split point k
    (0 for the conventional DNN) and the model's class names (the label indexes them)."""

    model_hash: str
    k: int
    class_names: Sequence[str]


@dataclass
class Reply:
    """An HTTP answer, read whole (up to the client's limit)."""

    status_code: int
    content: bytes
    reason_phrase: str = ""
    retry_after: float | None = None  # a 503's Retry-After, in seconds (the delta-seconds form only)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (ValueError or RecursionError when it is not)."""
        return json.loads(self.content)


def _detail(r: Reply) -> str:
    """The server's one-line {"detail": ...}, or the start of whatever it sent; never raises."""
    try:
        body = r.json()
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            return body["detail"][:300]
    except (ValueError, RecursionError):
        pass
    return r.text[:200].strip() or r.reason_phrase


def _show(value: Any) -> str:
    """A JSON value for an error message: scalars shortened, containers by type (repr of a deep one recurses)."""
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
        return text[:60]
    return f"a JSON {type(value).__name__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _answer(r: Reply, request_id: str | None, expect: Expect | None) -> CloudAnswer:
    """The answer's fields, checked: OffloadFailed ("bad_answer", "hash_mismatch") for anything unusable."""

    def bad(why: str, reason: str = "bad_answer") -> OffloadFailed:
        return OffloadFailed(
            f"cloud answered HTTP {r.status_code} with an unusable answer: {why}; expected a single-sample "
            "answer {label, class_name, confidence, server_ms, request_id, model_hash, k}",
            r.status_code,
            reason=reason,
        )

    try:
        body = r.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise bad(f"not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise bad(f"{_show(body)}, not an object")
    label, conf, name = body.get("label"), body.get("confidence"), body.get("class_name")
    server_ms, rid = body.get("server_ms"), body.get("request_id")
    if not _is_int(label) or label < 0:
        raise bad(f"label {_show(label)}")
    # NaN fails both comparisons; a huge integer compares fine
    if not _is_number(conf) or not 0.0 <= conf <= 1.0:
        raise bad(f"confidence {_show(conf)} (a finite number in [0, 1] expected)")
    if not isinstance(name, str) or not isinstance(rid, str):
        raise bad(f"class_name {_show(name)}, request_id {_show(rid)}")
    if not _is_number(server_ms) or not 0 <= server_ms < 1e9:  # NaN fails; math.isfinite(10**400) raises
        raise bad(f"server_ms {_show(server_ms)}")
    model_hash, k = body.get("model_hash"), body.get("k")
    if expect is not None:
        if not isinstance(model_hash, str):
            raise bad(f"model_hash {_show(model_hash)}")
        if model_hash != expect.model_hash:
            raise bad(
                f"model hash {model_hash[:40]!r}, this edge runs {expect.model_hash!r}", "hash_mismatch"
            )
        if not _is_int(k) or k != expect.k:
            raise bad(f"split point k {_show(k)} for a request at k={expect.k}")
        if label >= len(expect.class_names):
            raise bad(f"label {label}; the model has {len(expect.class_names)} classes")
        if name != expect.class_names[label]:
            raise bad(f"class_name {_show(name)} for label {label} ({expect.class_names[label]!r})")
        if request_id is not None and rid != request_id:
            raise bad(f"request id {_show(rid)} for request {request_id!r}")
    return CloudAnswer(
        label=label,
        class_name=name,
        confidence=float(conf),
        server_ms=float(server_ms),
        request_id=rid,
        model_hash=model_hash if isinstance(model_hash, str) else None,
        k=k if _is_int(k) else None,
    )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds when it is a small non-negative integer (its delta-seconds form); else None."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 6:
        return None
    return float(value.strip())


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _time_left(deadline: float, cap: float) -> float:
    """Seconds a socket operation may wait: the time left to `deadline` (a time.monotonic() value), at most
    `cap`; TimeoutError when none is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the offload deadline passed")
    return min(left, cap)


class _BoundedReads(io.RawIOBase):
    """A socket's reads, each waiting at most for the time left to the deadline (and `timeout`).

    A socket timeout bounds one read; a cloud that sends a byte just before each timeout would hold a reader
    forever. Re-arming the timeout to the time left before every read bounds them all together. `makefile` is
    what http.client.HTTPResponse asks of its socket.
    """

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        # A SocketIO holds the socket open for the answer after http.client lets go of it (Connection: close).
        self._io = sock.makefile("rb", buffering=0)
        self._deadline = deadline
        self._timeout = timeout

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self._sock.settimeout(_time_left(self._deadline, self._timeout))
        return self._io.readinto(b)  # type: ignore[return-value]

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    """An HTTP answer read through `_BoundedReads` (the connection's `response_class`, http.client's hook)."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
        *,
        deadline: float,
        timeout: float,
    ) -> None:
        super().__init__(_BoundedReads(sock, deadline, timeout), debuglevel, method, url)  # type: ignore[arg-type]


class _ConnectFailed(OSError):
    """No connection could be made (its cause is the socket's error)."""


class _OneWrite:
    """An http.client connection that sends each request (line, headers and body) in one write.

    http.client writes the headers and the body separately; with TCP_NODELAY that is two packets, and the
    receiver wakes twice (measured: 0.24 ms of the sender's time per extra write on loopback). `send` is
    http.client's documented hook for the bytes of a request.
    """

    _pending: list[bytes] | None = None

    def request_at_once(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> None:
        """`request(...)`, written to the socket as one buffer."""
        self._pending = []
        try:
            self.request(method, url, body=body, headers=headers)  # type: ignore[attr-defined]
            data = b"".join(self._pending)
        finally:
            self._pending = None
        super().send(data)  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if self._pending is not None:
            self._pending.append(bytes(data))
        else:
            super().send(data)  # type: ignore[misc]


class _HTTP(_OneWrite, http.client.HTTPConnection):
    pass


class _HTTPS(_OneWrite, http.client.HTTPSConnection):
    pass


class _Connections(threading.local):
    """One keep-alive connection per thread (http.client connections are not thread-safe)."""

    conn: _HTTP | _HTTPS | None = None


class CloudClient:
    """Client of one cloud server; safe to share between threads (one keep-alive connection per thread).

    `timeout` bounds each socket operation, `deadline` each request as a whole (seconds; None: no total bound);
    `breaker_failures` consecutive failed offloads open the circuit breaker for `breaker_cooldown` seconds
    (0: no breaker).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.05,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER,
        deadline: float | None = DEFAULT_DEADLINE,
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be an integer >= 0, got {retries!r}")
        if not (timeout > 0 and backoff >= 0):
            raise UserError(f"timeout must be > 0 and backoff >= 0 seconds, got {timeout!r} and {backoff!r}")
        if deadline is not None and not deadline > 0:
            raise UserError(f"offload deadline must be > 0 seconds (or None: none), got {deadline!r}")
        if (
            isinstance(breaker_failures, bool)
            or not isinstance(breaker_failures, int)
            or breaker_failures < 0
        ):
            raise UserError(
                f"breaker failures must be an integer >= 0 (0: no breaker), got {breaker_failures!r}"
            )
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise UserError(f"cloud URL {base_url!r}; expected http://host:port or https://host:port")
        self.base_url = base_url.rstrip("/")
        try:
            url = urlsplit(self.base_url)
            self._host, self._port = url.hostname, url.port
        except ValueError as exc:
            raise UserError(
                f"cloud URL {base_url!r} is not valid ({exc}); expected http://host:port"
            ) from None
        if not self._host:
            raise UserError(f"cloud URL {base_url!r} has no host; expected http://host:port")
        self._https = url.scheme == "https"
        self._prefix = url.path
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_answer_bytes = max_answer_bytes
        self.deadline = deadline
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown) if breaker_failures else None
        token = resolve_token(token)  # None: $EDGEEXIT_TOKEN, the variable the cloud server reads too
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = _Connections()
        self._all: set[http.client.HTTPConnection] = set()  # every thread's, to close them all
        self._lock = threading.Lock()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    @property
    def breaker_state(self) -> str:
        """The circuit breaker's state: "closed", "open", "half_open", or "disabled" (breaker_failures 0)."""
        return "disabled" if self.breaker is None else self.breaker.state

    def _connection(self, deadline: float) -> tuple[_HTTP | _HTTPS, bool]:
        """This thread's connection, and whether it is reused (a kept-alive one the server may have closed)."""
        conn = self._local.conn
        if conn is not None and conn.sock is not None:
            # A kept-alive socket that reads as ready holds EOF (the server closed it) or junk: start afresh.
            if not select.select([conn.sock], [], [], 0)[0]:
                return conn, True
            self._drop(conn)
        conn: _HTTP | _HTTPS = (_HTTPS if self._https else _HTTP)(
            self._host, self._port, timeout=_time_left(deadline, self.timeout)
        )
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise _ConnectFailed(str(exc)) from exc
        # Small requests and answers: send each at once rather than wait for the peer's delayed ACK.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.conn = conn
        with self._lock:
            self._all.add(conn)
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if self._local.conn is conn:
            self._local.conn = None
        with self._lock:
            self._all.discard(conn)

    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], deadline: float
    ) -> Reply:
        """One HTTP exchange on this thread's connection, over by `deadline`; the answer read up to
        max_answer_bytes (a longer one: OffloadFailed). OSError or http.client.HTTPException when it broke."""
        conn, reused = self._connection(deadline)
        # Every read of the answer waits at most for the time left (http.client's hook for the answer's class).
        conn.response_class = functools.partial(_BoundedResponse, deadline=deadline, timeout=self.timeout)
        try:
            conn.sock.settimeout(
                _time_left(deadline, self.timeout)
            )  # bounds the request's sendall as a whole
            conn.request_at_once(method, self._prefix + path, body, {**self._headers, **headers})
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._drop(conn)
            if not reused or isinstance(exc, TimeoutError):
                raise
            return self._send(method, path, body, headers, deadline)  # the server closed it meanwhile: afresh
        try:
            content = r.read(self.max_answer_bytes + 1)
            if len(content) > self.max_answer_bytes:
                raise OffloadFailed(
                    f"cloud answer to {method} {path} is over {self.max_answer_bytes} bytes; expected a small "
                    "JSON answer",
                    r.status,
                    reason="answer_too_large",
                )
            if not r.isclosed():
                r.read()  # the end of a chunked answer, so the connection can carry the next request
        except BaseException:
            self._drop(conn)  # the rest is never read: drop the connection rather than reuse it
            raise
        if r.will_close:
            self._drop(conn)
        return Reply(r.status, content, r.reason or "", _retry_after(r.getheader("retry-after")))

    def _request(
        self, method: str, path: str, body: bytes | None = None, *, spent: float = 0.0, **headers: str
    ) -> Reply:
        """One request with retries, all within the deadline less `spent` (seconds the caller already spent on
        this image); a 2xx answer, or OffloadFailed."""
        if self.is_closed:
            raise OffloadFailed(f"the client of {self.base_url} is closed", reason="closed")
        deadline = time.monotonic() + (math.inf if self.deadline is None else self.deadline - spent)
        last, reason = "", "network"
        status: int | None = None
        attempts = 0
        wait = 0.0  # a busy server's Retry-After: the least pause before the next try
        for attempt in range(self.retries + 1):
            if attempt:
                pause = max(self.backoff * 2 ** (attempt - 1), wait)
                if time.monotonic() + pause >= deadline:
                    break  # no time left for another try
                time.sleep(pause)
            attempts += 1
            try:
                r = self._send(method, path, body, headers, deadline)
            # refused, reset, timed out, broken answers (some of http.client's parsing raises ValueError)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                cause = exc.__cause__ if isinstance(exc, _ConnectFailed) and exc.__cause__ else exc
                last, status = f"{type(cause).__name__}: {str(cause)[:120] or 'no detail'}", None
                if isinstance(exc, _ConnectFailed):
                    reason = "connect"
                else:
                    reason = "timeout" if isinstance(exc, TimeoutError) else "network"
                log.debug("%s %s attempt %d failed: %s", method, path, attempt + 1, last)
                if time.monotonic() >= deadline:
                    break
                continue
            if r.status_code < 400:
                return r
            status = r.status_code
            if r.status_code < 500:
                raise OffloadFailed(
                    f"cloud answered HTTP {r.status_code}: {_detail(r)}",
                    r.status_code,
                    reason="hash_mismatch" if r.status_code == 409 else "http_4xx",
                )
            last, reason = f"HTTP {r.status_code}: {_detail(r)}", "http_5xx"
            wait = r.retry_after or 0.0  # a 503 over the server's concurrency cap says when to come back
            log.debug("%s %s attempt %d answered %s", method, path, attempt + 1, last)
        if time.monotonic() >= deadline:
            raise OffloadFailed(
                f"no answer from {self.base_url}{path} within the offload deadline of "
                f"{self.deadline * 1e3:.0f} ms ({_attempts(attempts)}; last: {last})",  # type: ignore[operator]
                status,
                reason="deadline",
            )
        raise OffloadFailed(
            f"no answer from {self.base_url}{path} after {_attempts(attempts)} (last: {last})",
            status,
            reason=reason,
        )

    def _guarded(self, call: Callable[[], CloudAnswer]) -> CloudAnswer:
        """`call()` through the circuit breaker: refused at once while it is open, its result recorded."""
        if self.breaker is None:
            return call()
        probe = self.breaker.admit()
        if probe is None:
            raise OffloadFailed(
                f"circuit breaker open: {self.breaker.failures} consecutive offloads to {self.base_url} failed; "
                f"answering at the edge, one probe after a {self.breaker.cooldown:g} s cool-down",
                reason="breaker_open",
            )
        ok = False
        try:
            answer = call()
            ok = True
            return answer
        finally:
            self.breaker.record(ok, probe)

    def offload(
        self, body: bytes, request_id: str, *, expect: Expect | None = None, spent: float = 0.0
    ) -> CloudAnswer:
        """POST a `wire.encode_payload` body to /v1/offload; the cloud's answer for its one sample.

        With `expect`, the answer must also name that model and k, a label among its classes, and `request_id`.
        `spent`: seconds already spent on this image (the edge's own compute), taken off the deadline, so that
        the image is answered within about the deadline of its arrival.
        """
        headers = {"Content-Type": "application/octet-stream", "X-Request-ID": request_id}
        return self._guarded(
            lambda: _answer(
                self._request("POST", "/v1/offload", body, spent=spent, **headers), request_id, expect
            )
        )

    def classify(
        self,
        image: bytes,
        content_type: str,
        request_id: str | None = None,
        *,
        expect: Expect | None = None,
        spent: float = 0.0,
    ) -> CloudAnswer:
        """POST image bytes (image/png or image/jpeg) to /v1/classify: the conventional DNN's answer (checked
        against `expect` and `request_id`, sent as X-Request-ID, and `spent` taken off the deadline, like
        `offload`)."""
        headers = {"Content-Type": content_type}
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        return self._guarded(
            lambda: _answer(
                self._request("POST", "/v1/classify", image, spent=spent, **headers), request_id, expect
            )
        )

    def model_info(self) -> dict:
        """GET /v1/model: the cloud's specs, hashes, accepted k and tensor shapes."""
        r = self._request("GET", "/v1/model")
        try:
            info = r.json()
        except (ValueError, RecursionError):
            info = None
        if not isinstance(info, dict):
            raise OffloadFailed(
                f"cloud /v1/model answered {r.text[:80]!r}; expected a JSON object",
                r.status_code,
                reason="bad_answer",
            )
        return info

    def close(self) -> None:
        """Close every thread's connection; later requests raise OffloadFailed."""
        self._closed = True
        with self._lock:
            conns, self._all = list(self._all), set()
        for conn in conns:
            conn.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CloudClient({self.base_url!r}, retries={self.retries}, backoff={self.backoff}, "
            f"deadline={self.deadline}, breaker={self.breaker_state})"
        )
