"""Running an ASGI app: a uvicorn server in a thread on an ephemeral port (tests, the experiment pipeline) or
in the foreground (`run_server`, the serve commands), with the connection limits every edgeexit server has; an
early, readable check that a port can be bound; and handing memory freed while loading back to the OS.

Connection limits (all start paths take them from `uvicorn_options`, so they hold in every worker too):

- a connection must deliver a whole request head within `idle_timeout` seconds (default 5) of being opened or
  of its last answer, else it is closed: silent sockets, idle keep-alive ones and slowly sent headers alike
  (uvicorn's own `timeout_keep_alive` covers only the wait after an answer);
- a request head (request line and headers) over MAX_HEADER_BYTES is answered 431 and the connection closed,
  having buffered at most that plus one read;
- a client that goes away before its answer is complete is one info line, no traceback;
- the process raises its file-descriptor soft limit to the hard limit, and a loop that runs out of descriptors
  anyway logs its failed accepts at most once per ACCEPT_LOG_PERIOD_S with a count (asyncio's loop logs a
  traceback per failed accept, megabytes a second; uvloop's accepts and closes the excess without a word).

The cap on concurrent requests (503 with Retry-After) is an ASGI middleware of the app: `http.ConcurrencyLimit`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import resource
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeexit.errors import UserError
from edgeexit.serving.http import trim_heap
from edgeexit.serving.limits import (
    ACCEPT_LOG_PERIOD_S,
    DEFAULT_IDLE_TIMEOUT_S,
    MAX_HEADER_BYTES,
    check_idle_timeout,
)

__all__ = [
    "LimitedHttpProtocol",
    "ServerHandle",
    "check_port_free",
    "prepare_process",
    "raise_fd_limit",
    "release_freed_memory",
    "run_server",
    "start_server",
    "uvicorn_options",
]

log = logging.getLogger(__name__)

JOIN_MAX_BYTES = 64 << 10  # an answer's writes gathered into one, up to this much (_OneWritePerTurn)

_PROTOCOL = "edgeexit.serving.server:LimitedHttpProtocol"  # a string: uvicorn's workers import it themselves


class _OneWritePerTurn:
    """A transport that joins the small writes of one event-loop turn into one write.

    uvicorn writes an answer's status line and headers, then its body, as two writes: two segments, and on
    loopback a client woken twice for one small answer (the edge's client joins its request's writes for the
    same reason; serving.client._OneWrite). Here the writes an answer makes without waiting are gathered and
    written together just after, at the end of the turn. A write that would gather more than JOIN_MAX_BYTES goes
    out at once (after what was gathered), so a large or streamed answer keeps the transport's flow control, and
    a complete answer goes out as soon as it is complete (`flush`, from the protocol).
    Everything but writing and closing is the transport's.
    """

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._size + len(data) > JOIN_MAX_BYTES:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)

    def flush(self) -> None:
        """Write what was gathered, now (at the end of the turn, or when the answer is complete)."""
        pending, self._pending, self._size = self._pending, [], 0
        if not pending or self._transport.is_closing():
            return
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request heads, and quiet disconnects.

    The deadline is the config's `timeout_keep_alive` (our idle timeout), counted from the connection's opening
    and from each answer until the next request's headers are complete. The bound is the config's
    `h11_max_incomplete_event_size` (uvicorn's own setting for its other parser): a head still incomplete
    after that many bytes is answered 431. Only reads that hold nothing but head bytes count (not the read
    where a request began, nor the one where the last one's body ended), so a body is never counted as head;
    a head buffers at most the bound plus two reads. An answer's head and body go out in one write
    (`_OneWritePerTurn`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = float(self.config.timeout_keep_alive)
        self._max_head = self.config.h11_max_incomplete_event_size or MAX_HEADER_BYTES
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._head_bytes = 0
        self._boundary = False  # a request began or ended in the read being parsed
        self._peer_gone = False
        self._answer_lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _OneWritePerTurn(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._boundary = False
        super().data_received(data)
        if self._in_head and not self._boundary and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse_head()

    def _refuse_head(self) -> None:
        detail = f"request head over {self._max_head} bytes; expected a request line and headers under that"
        body = json.dumps({"detail": detail}).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        log.debug("refused a request head over %d bytes from %s", self._max_head, self.client)

    def on_message_begin(self) -> None:
        self._boundary = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._boundary = True

    def on_response_complete(self) -> None:
        # The answer is whole: write it now, not after the app's middlewares have unwound (_OneWritePerTurn).
        self.transport.flush()  # type: ignore[attr-defined]
        if self.transport.is_closing() and self.cycle is not None and self.cycle.keep_alive:
            # The transport failed while the answer was being written (the peer reset the connection) and
            # uvicorn went through the rest of it writing nothing.
            self._answer_lost = True
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now, waiting for the next request
            self._arm_head_timer()

    def eof_received(self) -> None:
        self._peer_gone = True
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        cycle = self.cycle
        in_progress = cycle is not None and not cycle.response_complete
        if (in_progress and (self._peer_gone or exc is not None)) or self._answer_lost:
            scope = self.scope or {}
            log.info(
                "client %s went away before its answer to %s %r was sent",
                ":".join(map(str, self.client or ("?",))),
                scope.get("method", "?"),
                str(scope.get("path", "?"))[:100],
            )
        super().connection_lost(exc)


class _AcceptErrorLimit(logging.Filter):
    """Passes asyncio's "socket.accept() out of system resource" records at most once per `period` seconds,
    as one line with the number held back since the last; other records pass untouched."""

    PREFIX = "socket.accept() out of system resource"

    def __init__(self, period: float = ACCEPT_LOG_PERIOD_S) -> None:
        super().__init__()
        self.period = period
        self.last = -math.inf
        self.held = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.period:
                self.held += 1
                return False
            self.last, held, self.held = now, self.held, 0
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = "socket.accept() failed (%s); %d more failures in the last %.0f s not logged"
        record.args = (exc or "out of system resource", held, self.period)
        record.exc_info = record.exc_text = None
        return True

    def flush(self) -> None:
        """Log the failures held back since the last line, if any (at server exit)."""
        with self.lock:
            held, self.held = self.held, 0
        if held:
            log.warning("socket.accept() failed %d more times since the last logged failure", held)


_ACCEPT_ERRORS = _AcceptErrorLimit()


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's file-descriptor soft limit to its hard limit (each connection holds one); returns
    (soft, hard) as they are afterwards (RLIM_INFINITY as is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit and macOS caps it at OPEN_MAX: ask for a large finite one then.
    target = (1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the file-descriptor limit from %d to %d: %s", soft, target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.debug("file-descriptor limit: %d (hard limit %d)", soft, hard)
    return soft, hard


def prepare_process() -> None:
    """What a server process does once before serving: raise its file-descriptor limit, and rate-limit the
    event loop's accept errors in the log."""
    raise_fd_limit()
    logger = logging.getLogger("asyncio")
    if _ACCEPT_ERRORS not in logger.filters:
        logger.addFilter(_ACCEPT_ERRORS)


class ServerHandle:
    """A uvicorn server running in a daemon thread; `.url`, `.port`, `.stop()`, and a context manager."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket) -> None:
        self.server = server
        self.thread = thread
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321."""
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait for its thread, close the socket."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            log.warning("server at %s did not stop within %.0f s", self.url, timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uvicorn_options(idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> dict[str, Any]:
    """uvicorn settings every edgeexit server uses: the C HTTP parser (httptools, in LimitedHttpProtocol: the
    idle timeout and head bound) and the uvloop event loop where installed, and no per-request access log line,
    which costs more than a /healthz answer itself."""
    return {
        "http": _PROTOCOL,
        "loop": "auto",
        "access_log": False,
        "server_header": False,  # says nothing a client needs, and names the server software to a scanner
        "timeout_keep_alive": check_idle_timeout(idle_timeout),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


def run_server(
    app: Any, *, host: str, port: int, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S, **uvicorn_kwargs: Any
) -> None:
    """Serve `app` (an ASGI app, or an import string with `factory`/`workers`) with uvicorn in the foreground
    until interrupted, with the connection limits (`prepare_process`, `uvicorn_options`)."""
    prepare_process()
    options = {**uvicorn_options(idle_timeout), **uvicorn_kwargs}
    try:
        uvicorn.run(app, host=host, port=port, **options)
    finally:
        _ACCEPT_ERRORS.flush()


def start_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 30.0,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
) -> ServerHandle:
    """Serve `app` with uvicorn in a thread on host:port (0 = an ephemeral port); returns once it accepts."""
    prepare_process()
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP; without it Nagle
    # and delayed ACKs add ~40 ms to each response that uvicorn writes in two parts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc}); expected a free local address") from None
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5, **uvicorn_options(idle_timeout)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="edgeexit-server"
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    return ServerHandle(server, thread, sock)


def check_port_free(host: str, port: int) -> None:
    """A UserError, before any model is loaded, when (host, port) cannot be bound (in use, or not ours)."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): the port is in use or the address is not "
            "this machine's; pick another with --port"
        ) from None


def release_freed_memory() -> None:
    """Give the heap freed while loading models (temporary weights, the profiling probe) back to the OS.

    glibc keeps freed memory for reuse, so a server idles at its loading peak: measured on the cloud server, this
    returns about 23 MiB.
    """
    gc.collect()
    trim_heap()
