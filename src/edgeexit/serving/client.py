"""HTTP client of the cloud server: a keep-alive connection pool, timeouts, retries with exponential backoff.

Connect errors, timeouts, broken connections and 5xx answers are retried (`retries` times, waiting
`backoff * 2**attempt` seconds before each retry): finishing an inference is idempotent, so sending a body
twice is harmless. A 4xx answer (409 model mismatch, 422 wrong tensor, 401 token...) is something a retry
cannot fix: it raises `OffloadFailed` at once with the server's detail. An answer longer than
`max_answer_bytes` is not read past that limit.

It is built on the standard library's http.client, one keep-alive connection per thread: a quarter of
httpx's CPU per request, and 40% less than urllib3's pool on top of the same http.client (BENCHMARKS.md,
request path). On a 2-core edge device that CPU is the inference's.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edgeexit.errors import EdgeExitError, UserError
from edgeexit.serving.http import resolve_token

__all__ = ["CloudAnswer", "CloudClient", "OffloadFailed", "Reply"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ANSWER = 1 << 20  # an answer is a few hundred bytes; batched ones grow by ~40 B per row


class OffloadFailed(EdgeExitError):
    """The cloud gave no answer: retries exhausted, or a 4xx the edge cannot fix; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the last answer, None when none came


@dataclass
class CloudAnswer:
    """The cloud's classification of one offloaded tensor or image."""

    label: int
    class_name: str
    confidence: float
    server_ms: float
    request_id: str


@dataclass
class Reply:
    """An HTTP answer, read whole (up to the client's limit)."""

    status_code: int
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        """The body as text."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (ValueError when it is not)."""
        return json.loads(self.content)


def _detail(r: Reply) -> str:
    """The server's one-line {"detail": ...}, or the start of whatever it sent."""
    try:
        body = r.json()
    except (ValueError, RecursionError):
        return r.text[:200].strip() or r.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return str(body)[:200]


def _answer(r: Reply) -> CloudAnswer:
    try:
        body = r.json()
        return CloudAnswer(
            label=int(body["label"]),
            class_name=str(body["class_name"]),
            confidence=float(body["confidence"]),
            server_ms=float(body["server_ms"]),
            request_id=str(body["request_id"]),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise OffloadFailed(
            f"cloud answered HTTP {r.status_code} with an unexpected body ({type(exc).__name__}: {str(exc)[:80]}); "
            "expected a single-sample answer {label, class_name, confidence, server_ms, request_id}",
            r.status_code,
        ) from None


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
    """Client of one cloud server; safe to share between threads (one keep-alive connection per thread)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.05,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be an integer >= 0, got {retries!r}")
        if not (timeout > 0 and backoff >= 0):
            raise UserError(f"timeout must be > 0 and backoff >= 0 seconds, got {timeout!r} and {backoff!r}")
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

    def _connection(self) -> tuple[_HTTP | _HTTPS, bool]:
        """This thread's connection, and whether it is reused (a kept-alive one the server may have closed)."""
        conn = self._local.conn
        if conn is not None and conn.sock is not None:
            # A kept-alive socket that reads as ready holds EOF (the server closed it) or junk: start afresh.
            if not select.select([conn.sock], [], [], 0)[0]:
                return conn, True
            self._drop(conn)
        conn: _HTTP | _HTTPS = (_HTTPS if self._https else _HTTP)(
            self._host, self._port, timeout=self.timeout
        )
        conn.connect()
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

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        """One HTTP exchange on this thread's connection; the answer read up to max_answer_bytes (a longer one:
        OffloadFailed). OSError or http.client.HTTPException when the exchange broke."""
        conn, reused = self._connection()
        try:
            conn.request_at_once(method, self._prefix + path, body, {**self._headers, **headers})
            r = conn.getresponse()
        except (OSError, http.client.HTTPException):
            self._drop(conn)
            if not reused:
                raise
            return self._send(method, path, body, headers)  # the server closed it meanwhile: once more, fresh
        try:
            content = r.read(self.max_answer_bytes + 1)
            if len(content) > self.max_answer_bytes:
                raise OffloadFailed(
                    f"cloud answer to {method} {path} is over {self.max_answer_bytes} bytes; expected a small "
                    "JSON answer",
                    r.status,
                )
            if not r.isclosed():
                r.read()  # the end of a chunked answer, so the connection can carry the next request
        except BaseException:
            self._drop(conn)  # the rest is never read: drop the connection rather than reuse it
            raise
        if r.will_close:
            self._drop(conn)
        return Reply(r.status, content, r.reason or "")

    def _request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """One request with retries; a 2xx answer, or OffloadFailed."""
        if self.is_closed:
            raise OffloadFailed(f"the client of {self.base_url} is closed")
        last = ""
        status: int | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._send(method, path, body, headers)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, broken answers
                last, status = f"{type(exc).__name__}: {str(exc)[:120] or 'no detail'}", None
                log.debug("%s %s attempt %d failed: %s", method, path, attempt + 1, last)
                continue
            if r.status_code < 400:
                return r
            status = r.status_code
            if r.status_code < 500:
                raise OffloadFailed(f"cloud answered HTTP {r.status_code}: {_detail(r)}", r.status_code)
            last = f"HTTP {r.status_code}: {_detail(r)}"
            log.debug("%s %s attempt %d answered %s", method, path, attempt + 1, last)
        raise OffloadFailed(
            f"no answer from {self.base_url}{path} after {self.retries + 1} attempts (last: {last})", status
        )

    def offload(self, body: bytes, request_id: str) -> CloudAnswer:
        """POST a `wire.encode_payload` body to /v1/offload; the cloud's answer for its one sample."""
        r = self._request(
            "POST",
            "/v1/offload",
            body,
            **{"Content-Type": "application/octet-stream", "X-Request-ID": request_id},
        )
        return _answer(r)

    def classify(self, image: bytes, content_type: str) -> CloudAnswer:
        """POST image bytes (image/png or image/jpeg) to /v1/classify: the conventional DNN's answer."""
        return _answer(self._request("POST", "/v1/classify", image, **{"Content-Type": content_type}))

    def model_info(self) -> dict:
        """GET /v1/model: the cloud's specs, hashes, accepted k and tensor shapes."""
        r = self._request("GET", "/v1/model")
        try:
            return r.json()
        except (ValueError, RecursionError):
            raise OffloadFailed(
                f"cloud /v1/model answered non-JSON: {r.text[:80]!r}", r.status_code
            ) from None

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
        return f"CloudClient({self.base_url!r}, retries={self.retries}, backoff={self.backoff})"
