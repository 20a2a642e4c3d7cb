"""The edge server: an HTTP front for one edge runner (serving.edge_runner), which does all the work.

POST /v1/classify (image bytes) -> EdgeAnswer JSON; GET /v1/config; GET /metrics (Prometheus, with the
answers by outcome as edgeexit_edge_answers_total); GET /healthz (always open):
{"status": "ok", "breaker": "closed" | "open" | "half_open" | "disabled"}, the cloud client's circuit breaker.

Each classification runs in a worker thread, and one waiting on the cloud holds its thread up to the offload
deadline. Starlette's `run_in_threadpool` shares anyio's default limiter of 40 threads: with a cloud that never
answers, image 41 would wait a whole deadline for a thread before its own began. The edge has its own limiter
with a thread for each request it admits (`max_concurrency`): a thread blocked on a socket costs little memory
and no CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import fastapi
from fastapi import Request, Response

from edgeexit.errors import UserError
from edgeexit.serving.client import DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_FAILURES, DEFAULT_DEADLINE
from edgeexit.serving.edge_runner import EdgeAnswer, Runner, load_runner
from edgeexit.serving.http import (
    binary_body,
    check_content_type,
    error,
    error_responses,
    new_app,
    read_body,
    resolve_token,
)
from edgeexit.serving.images import IMAGE_TYPES, MAX_IMAGE_BODY, ImageRejected
from edgeexit.serving.limits import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENCY,
    check_idle_timeout,
    check_max_concurrency,
)
from edgeexit.serving.server import check_port_free, run_server
from edgeexit.threads import SERVER_THREADS, check_threads, set_threads

__all__ = ["create_edge_app", "serve_edge", "EDGE_TOKEN_ENV"]

EDGE_TOKEN_ENV = "EDGEEXIT_EDGE_TOKEN"


def create_edge_app(
    runner: Runner,
    *,
    token: str | None = None,
    max_body_bytes: int = 16 << 20,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> fastapi.FastAPI:
    """The edge server: POST /v1/classify (image bytes) -> EdgeAnswer JSON; GET /healthz, GET /v1/config.

    `token` (None: $EDGEEXIT_EDGE_TOKEN) is the bearer token the edge's clients must send; the cloud's token is
    the runner's client's business. The edge keeps serving when the cloud is down: answers then carry
    outcome "offload_failed". Beyond `max_concurrency` requests in progress: 503 with Retry-After; each one
    admitted gets a thread (see the module docstring). With a cloud that never answers, each offloading image
    holds its thread for the whole deadline: at the default 256 the edge takes 256 such images per deadline, and
    after `breaker_failures` failures the breaker answers the rest at once.
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    token = resolve_token(token, EDGE_TOKEN_ENV)
    app, api = new_app(
        "edgeexit edge server",
        __doc__,
        token,
        max_concurrency=max_concurrency,
        health=lambda: {"breaker": runner.breaker_state()},
    )
    answers = app.state.metrics.counter(
        "edgeexit_edge_answers", "answers by outcome and where they were answered", ["outcome", "answered_at"]
    )
    readings = app.state.metrics.readings
    readings.counter(
        "edgeexit_edge_offloads",
        "offloads by result: ok, or the reason the edge answered without the cloud",
        "reason",
        runner.outcome_counts,
    )
    readings.state(
        "edgeexit_edge_breaker_state",
        "the cloud circuit breaker (1 for the current state)",
        runner.breaker_state,
        states=("closed", "open", "half_open", "disabled"),
    )
    # A thread for every request ConcurrencyLimit admits: none waits for a thread while others wait on the cloud.
    limiter = anyio.CapacityLimiter(max_concurrency)
    app.state.limiter = limiter

    @api.get("/v1/config", responses=error_responses(401))
    async def config() -> dict[str, Any]:
        """The runner's strategy, alpha, k, precision, cloud URL and model."""
        return runner.config()

    @api.post(
        "/v1/classify",
        response_model=EdgeAnswer,
        openapi_extra=binary_body(*IMAGE_TYPES),
        responses=error_responses(400, 401, 413, 415, 422),
    )
    async def classify(request: Request) -> Response:
        """Classify a PNG or JPEG image at the edge, offloading to the cloud when no exit is confident."""
        check_content_type(request, IMAGE_TYPES)
        body = await read_body(request, min(max_body_bytes, MAX_IMAGE_BODY))
        try:
            answer = await anyio.to_thread.run_sync(runner.classify_image, body, limiter=limiter)
        except ImageRejected as exc:
            raise error(exc.status, str(exc)) from None
        answers.labels(answer.outcome, answer.answered_at).inc()
        # The answer as JSON directly (it is a validated EdgeAnswer): this route is taken past the router.
        return Response(answer.model_dump_json().encode(), media_type="application/json")

    app.include_router(api)
    app.state.direct_routes[("POST", "/v1/classify")] = classify
    return app


def serve_edge(
    run_dir: Path,
    *,
    cloud_url: str | None,
    strategy: str = "ee",
    alpha: float = 0.8,
    k: int | None = None,
    precision: str = "fp32",
    host: str = "127.0.0.1",
    port: int = 8001,
    token: str | None = None,
    cloud_token: str | None = None,
    runtime: str = "torch",
    threads: int = SERVER_THREADS,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    deadline: float | None = DEFAULT_DEADLINE,
    breaker_failures: int = DEFAULT_BREAKER_FAILURES,
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
) -> None:
    """Run the edge server with uvicorn until interrupted (token: clients' bearer token; cloud_token: the cloud's),
    computing with `threads` intra-op threads; connection limits as in serving.server; each offload gets
    `deadline` seconds in all, and the circuit breaker opens after `breaker_failures` consecutive failures for
    `breaker_cooldown` seconds."""
    check_threads(threads)
    check_max_concurrency(max_concurrency)
    check_idle_timeout(idle_timeout)
    check_port_free(host, port)
    set_threads(threads)
    runner = load_runner(
        Path(run_dir),
        strategy=strategy,
        alpha=alpha,
        k=k,
        cloud_url=cloud_url,
        precision=precision,
        token=cloud_token,
        runtime=runtime,
        deadline=deadline,
        breaker_failures=breaker_failures,
        breaker_cooldown=breaker_cooldown,
    )
    try:
        app = create_edge_app(runner, token=token, max_concurrency=max_concurrency)
        run_server(app, host=host, port=port, idle_timeout=idle_timeout)
    finally:
        runner.close()
