"""Running an ASGI app: a uvicorn server in a thread on an ephemeral port (tests, the experiment pipeline),
an early, readable check that a port can be bound, and handing memory freed while loading back to the OS."""

from __future__ import annotations

import ctypes
import gc
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from edgeexit.errors import UserError

__all__ = ["ServerHandle", "check_port_free", "release_freed_memory", "start_server", "uvicorn_options"]

log = logging.getLogger(__name__)


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


def uvicorn_options() -> dict[str, Any]:
    """uvicorn settings every edgeexit server uses: the C HTTP parser (httptools) and the uvloop event loop
    where installed (uvicorn's "auto" picks them), and no per-request access log line, which costs more
    than a /healthz answer itself."""
    return {"http": "auto", "loop": "auto", "access_log": False}


def start_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0
) -> ServerHandle:
    """Serve `app` with uvicorn in a thread on host:port (0 = an ephemeral port); returns once it accepts."""
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
        app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5, **uvicorn_options()
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
    returns about 23 MiB. A no-op where the C library has no `malloc_trim` (musl, macOS).
    """
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
