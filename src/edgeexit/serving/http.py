"""HTTP plumbing shared by the cloud and edge apps: bearer-token auth and a cap on concurrent requests (ASGI
middlewares), GET /metrics (serving.metrics), bounded bodies, content types, one-line JSON errors and their
OpenAPI descriptions."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fastapi
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edgeexit.serving import limits
from edgeexit.serving.docs import ASSETS_URL, install_docs
from edgeexit.serving.limits import DEFAULT_MAX_CONCURRENCY, RETRY_AFTER_S, check_max_concurrency
from edgeexit.serving.metrics import CONTENT_TYPE, MetricsMiddleware, ServerMetrics

__all__ = [
    "TOKEN_ENV",
    "binary_body",
    "BearerAuth",
    "body_chunks",
    "check_content_type",
    "ConcurrencyLimit",
    "DirectRoutes",
    "error",
    "error_responses",
    "install_error_handlers",
    "new_app",
    "read_body",
    "resolve_token",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGEEXIT_TOKEN"
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_AUTH_DETAIL = "missing or wrong bearer token; expected header 'Authorization: Bearer <token>'"
UNCAPPED_PATHS = frozenset({"/healthz", "/metrics"})  # answered at once, and wanted most when busy


def resolve_token(token: str | None, env: str = TOKEN_ENV) -> str | None:
    """The token given, else the environment variable `env`, else None (no token); empty counts as none."""
    value = token if token is not None else os.environ.get(env)
    return value or None


def _one_line(text: str, limit: int = 300) -> str:
    """Error details are single lines: clients log them, and multi-line text breaks log parsers."""
    return " ".join(str(text).split())[:limit]


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> fastapi.HTTPException:
    """An HTTPException whose JSON body is {"detail": "<one line>"} (with `headers` on the answer)."""
    return fastapi.HTTPException(status_code=status, detail=_one_line(detail), headers=headers)


def _app_path(scope: dict[str, Any]) -> str:
    """The request's path within the app: without the root path a proxy mounted it under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BearerAuth:
    """ASGI middleware: 401 unless a request carries `Authorization: Bearer <token>`, on every path but the open
    ones (/healthz and the API docs: OPEN_PATHS, and the docs' assets). It answers before the body is read.

    Closed unless listed open, so a route added later is protected by default. A middleware rather than a
    FastAPI dependency: resolving a dependency per request cost about a quarter of the request path's overhead
    (BENCHMARKS.md, request path).
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    @staticmethod
    def _is_protected(scope: dict[str, Any]) -> bool:
        path = _app_path(scope)
        return path not in OPEN_PATHS and not path.startswith(ASSETS_URL + "/")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self._is_protected(scope):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            # compare_digest on bytes: the time taken does not depend on where the first difference is.
            if not hmac.compare_digest(given, self.expected):
                denied = JSONResponse(
                    {"detail": _AUTH_DETAIL}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests in progress at once (but /healthz and /metrics, which are
    always answered); beyond it 503 with `Retry-After` and a one-line JSON detail, before the body is read.

    Ours rather than uvicorn's `limit_concurrency`: that one counts idle keep-alive connections as well as
    requests, and answers a plain-text 503 without Retry-After.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0
        detail = f"server busy: {limit} requests in progress, its limit; retry after {RETRY_AFTER_S} s"
        self.busy = JSONResponse(
            {"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNCAPPED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await self.busy(scope, receive, send)
            return
        self.in_flight += 1  # one event loop per app: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


Handler = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    """ASGI middleware, the innermost of ours: a request for a hot route (exact method and path, registered in
    `routes`, e.g. POST /v1/offload) goes straight to its handler, past FastAPI's router (matching every route,
    solving dependencies, its exception middleware), which cost about a tenth of a small offload's time on the
    server (BENCHMARKS.md, request path). The routes stay declared in FastAPI with the same handlers (OpenAPI,
    docs, other methods' 405), and their errors answer as `install_error_handlers` makes FastAPI answer."""

    def __init__(self, app: Any, routes: dict[tuple[str, str], Handler], api: fastapi.FastAPI) -> None:
        self.app = app
        self.routes = routes
        self.api = api
        self._route_objects: dict[str, Any] | None = None

    def _route_object(self, path: str) -> Any:
        """The FastAPI route declared for `path` (the metrics label it by its template)."""
        if self._route_objects is None:
            self._route_objects = {getattr(r, "path", None): r for r in self.api.routes}
        return self._route_objects.get(path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = None
        if scope["type"] == "http":
            path = _app_path(scope)
            handler = self.routes.get((scope["method"], path))
        if handler is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route_object(path)
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except StarletteHTTPException as exc:
            response = await _http_error(request, exc)
        except ClientDisconnect as exc:
            response = await _disconnected(request, exc)
        except Exception as exc:
            response = await _crash(request, exc)
        await response(scope, receive, send)


def new_app(
    title: str,
    description: str | None,
    token: str | None,
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    health: Callable[[], dict[str, str]] | None = None,
) -> tuple[fastapi.FastAPI, fastapi.APIRouter]:
    """A FastAPI app with one-line JSON errors, an open GET /healthz, open API docs that need no internet
    (/docs, /redoc, /openapi.json; see serving.docs), GET /metrics (serving.metrics; `app.state.metrics`), at
    most `max_concurrency` requests in progress (ConcurrencyLimit), and the router for its protected routes
    (bearer token `token`, None: open; BearerAuth guards every route but /healthz and the docs); include the
    router once its routes are declared; `app.state.direct_routes` maps (method, path) of the hot routes to their
    handlers, taken past the router (DirectRoutes). `health` adds fields to /healthz's {"status": "ok"}, read at
    each call (keep it cheap). DocsAssetsMissing if the docs' assets are not installed."""
    check_max_concurrency(max_concurrency)
    app = fastapi.FastAPI(
        title=title, version="1", description=description or "", docs_url=None, redoc_url=None
    )
    install_error_handlers(app)
    install_docs(app)
    healthy = Response(b'{"status":"ok"}', media_type="application/json")
    metrics = app.state.metrics = ServerMetrics()

    @app.get("/healthz", response_model=dict[str, str])
    async def healthz() -> Response:
        """Liveness: always open, even with a token configured."""
        if health is None:
            return healthy
        return Response(json.dumps({"status": "ok", **health()}).encode(), media_type="application/json")

    @app.get("/metrics", response_class=Response, responses=error_responses(401))
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text format) of this server process; behind the token like the API."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    api = fastapi.APIRouter()
    # The hot routes, called past the router (DirectRoutes); the apps add theirs.
    direct = app.state.direct_routes = {("GET", "/healthz"): lambda request: healthz()}
    # Added innermost first: metrics (sees every answer) > auth > the cap (unauthenticated requests take no slot)
    # > the hot routes.
    app.add_middleware(DirectRoutes, routes=direct, api=app)
    app.add_middleware(ConcurrencyLimit, limit=max_concurrency)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    # Requests answered before routing are labelled by path when it is an API route's (all ours are static).
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=lambda: app.openapi()["paths"])
    return app, api


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return JSONResponse({"detail": _one_line("invalid request; " + "; ".join(parts))}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"detail": _one_line(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers
    )


async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:
    # The client went away mid-body: the server's protocol logs that once (serving.server); the answer
    # goes nowhere, its status (499, nginx's "client closed request") only to /metrics.
    return Response(status_code=499)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500
    )


def install_error_handlers(app: fastapi.FastAPI) -> None:
    """Every error answers {"detail": "<one line>"}: validation errors flattened, crashes logged and hidden."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)


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
    a body without one (chunked) passes the limit; the rest is never read. A body that stalls for
    `limits.BODY_STALL_TIMEOUT_S`: 408, and the connection is closed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise error(400, f"Content-Length {declared[:30]!r}; expected a non-negative integer")
        if int(declared) > limit:
            raise error(413, f"request body of {int(declared)} bytes; the limit is {limit} bytes")
        if int(declared) > _TRIM_ABOVE:
            # An earlier request's body can outlive it in a reference cycle (an exception's traceback holds the
            # frames that held the body); collect it and give the heap back before taking another large body.
            gc.collect()
            trim_heap()
    chunks: list[bytes] = []
    n = 0
    async for chunk in body_chunks(request):
        n += len(chunk)
        if n > limit:
            raise error(413, f"request body over {limit} bytes; the limit is {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if n > _TRIM_ABOVE:
        # glibc keeps the chunks' freed memory resident beside the body; handing it back keeps a large body from
        # costing three times its size once decoding starts (measured: a 60 MiB image body, 184 -> 120 MiB peak).
        del chunks
        trim_heap()
    return body


_TRIM_ABOVE = 4 << 20


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; a body that stalls (no chunk for `limits.BODY_STALL_TIMEOUT_S`):
    408 with `Connection: close`, so that a client sending a byte now and then cannot hold a request slot."""
    stall_s = limits.BODY_STALL_TIMEOUT_S
    stream = request.stream()
    received = 0
    while True:
        try:
            async with asyncio.timeout(stall_s):  # a timer handle per chunk, not a task
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise error(
                408,
                f"request body stalled: nothing for {stall_s:g} s after {received} bytes; expected the whole body "
                "without long pauses",
                headers={"Connection": "close"},
            ) from None
        received += len(chunk)
        yield chunk


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim(0), every arena); a no-op where the C library
    has none (musl, macOS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def binary_body(*media_types: str) -> dict[str, Any]:
    """`openapi_extra` describing a raw binary request body of the given media types."""
    schema = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media_types}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error codes, each with the {"detail": str} body."""
    described = {
        400: "malformed body",
        401: "missing or wrong bearer token",
        408: "request body stalled",
        409: "model hash mismatch",
        413: "body too large",
        415: "wrong Content-Type or image format",
        422: "valid body the model cannot take",
        503: "no model for this request, or busy (Retry-After)",
    }
    schema = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    return {
        c: {"description": described.get(c, "error"), "content": {"application/json": {"schema": schema}}}
        for c in codes
    }
