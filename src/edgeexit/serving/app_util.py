"""Shared pieces of the cloud and edge servers: bearer tokens, bounded bodies, image decoding, JSON errors,
and a uvicorn server in a thread on an ephemeral port (used by the tests and the experiment pipeline)."""

from __future__ import annotations

import hmac
import io
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import fastapi
import uvicorn
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeexit.errors import UserError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "IMAGE_TYPES",
    "ImageRejected",
    "ServerHandle",
    "TokenMiddleware",
    "binary_body",
    "check_content_type",
    "decode_image",
    "error_responses",
    "install_error_handlers",
    "read_body",
    "resolve_token",
    "start_server",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGEEXIT_TOKEN"
IMAGE_TYPES = ("image/png", "image/jpeg")
# 16 Mpx (48 MiB as RGB): far above any camera frame this system classifies, far below a decompression bomb.
MAX_IMAGE_PIXELS = 16 * 1024 * 1024
_PIL_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def resolve_token(token: str | None, env: str = TOKEN_ENV) -> str | None:
    """The token given, else the environment variable `env`, else None (no token); empty counts as none."""
    value = token if token is not None else os.environ.get(env)
    return value or None


def _one_line(text: str, limit: int = 300) -> str:
    """Error details are single lines: clients log them, and multi-line text breaks log parsers."""
    return " ".join(str(text).split())[:limit]


def error(status: int, detail: str) -> fastapi.HTTPException:
    """An HTTPException whose JSON body is {"detail": "<one line>"}."""
    return fastapi.HTTPException(status_code=status, detail=_one_line(detail))


class TokenMiddleware:
    """Pure ASGI middleware: every HTTP request but `open_paths` needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str, open_paths: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        # compare_digest on bytes: the time taken does not depend on where the first difference is.
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "missing or wrong bearer token; expected header 'Authorization: Bearer <token>'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def install_error_handlers(app: fastapi.FastAPI) -> None:
    """Every error answers {"detail": "<one line>"}: validation errors flattened, crashes logged and hidden."""

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": _one_line("invalid request; " + "; ".join(parts))}, status_code=422)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": _one_line(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers
        )

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, crash)


def check_content_type(request: Request, accepted: tuple[str, ...], *, allow_missing: bool = False) -> str:
    """The request's media type if it is one of `accepted` (parameters ignored); else 415."""
    raw = request.headers.get("content-type")
    if raw is None and allow_missing:
        return accepted[0]
    media = (raw or "").split(";", 1)[0].strip().lower()
    if media not in accepted:
        raise error(415, f"Content-Type {(raw or '(none)')[:60]!r}; expected {' or '.join(accepted)}")
    return media


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes: 413 from Content-Length before reading anything, or as soon as
    a body without one (chunked) passes the limit; the rest is never read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise error(400, f"Content-Length {declared[:30]!r}; expected a non-negative integer")
        if int(declared) > limit:
            raise error(413, f"request body of {int(declared)} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise error(413, f"request body over {limit} bytes; the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class ImageRejected(UserError):
    """Image bytes that cannot be classified; `status` is the HTTP code a server answers (400/413/415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully decoded PNG or JPEG image; anything else raises ImageRejected (400 / 413 / 415)."""
    if not data:
        raise ImageRejected(400, "empty body; expected PNG or JPEG image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in _PIL_FORMATS:
                raise ImageRejected(415, f"image format {fmt}; expected PNG or JPEG")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(413, f"image of {w}x{h} pixels; at most {max_pixels} pixels are accepted")
            img.load()  # decode now: truncated or corrupt data fails here, not later in preprocessing
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"image too large; at most {max_pixels} pixels are accepted") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        raise ImageRejected(400, f"cannot decode the image ({type(exc).__name__}); expected PNG or JPEG bytes") from None
    return img


def sniff_image_type(data: bytes) -> str | None:
    """'image/png' or 'image/jpeg' from the magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def binary_body(*media_types: str) -> dict[str, Any]:
    """`openapi_extra` describing a raw binary request body of the given media types."""
    schema = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media_types}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error codes, each with the {"detail": str} body."""
    described = {
        400: "malformed body", 401: "missing or wrong bearer token", 409: "model hash mismatch",
        413: "body too large", 415: "wrong Content-Type or image format", 422: "valid body the model cannot take",
        503: "no model for this request",
    }  # fmt: skip
    schema = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    return {c: {"description": described.get(c, "error"), "content": {"application/json": {"schema": schema}}}
            for c in codes}  # fmt: skip


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


def start_server(app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> ServerHandle:
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
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="edgeexit-server")
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
