"""The cloud server: an HTTP front for the cloud runner (serving.cloud_runner), which does the work.

Endpoints (every error is a JSON body {"detail": "..."}, one line saying what was expected):

- ``POST /v1/offload`` (application/octet-stream, a `wire.encode_payload` body): runs stages k+1.. and the
  final head on the tensor, calibrated with the final exit's temperature. Answers
  {label, class_name, confidence, server_ms, request_id, model_hash, k, batch}. A payload may hold a batch
  [B, *split_shape(k)] with 1 <= B <= max_batch: for B == 1 label, class_name and confidence are scalars,
  for B > 1 they are lists of B values (one per row, in order). `batch` is the rows of the forward pass that
  answered it, this request's and others'.
- ``POST /v1/classify`` (image/png or image/jpeg): the conventional DNN decodes, preprocesses (its spec's
  Preprocessing) and classifies the image; same answer shape with k = 0 (503 if the run has no conventional DNN).
- ``GET /healthz``, ``GET /v1/model`` (specs, hashes, accepted k, split shapes, precisions), ``GET /metrics``
  (Prometheus; serving.metrics, with the rows per forward as edgeexit_cloud_batch_rows) and the link-probe
  routes of `probe.probe_router`.

Status codes: 400 malformed payload or undecodable image, 401 missing bearer token (when one is configured;
/healthz stays open), 409 model hash mismatch, 413 body too large (refused from Content-Length before
reading, or as soon as a chunked body passes the limit), 415 wrong Content-Type or image format, 422 a
well-formed payload this model cannot take (k, shape, dtype, batch size, NaN/Inf) or an image's aspect ratio
(serving.images lists the image caps), 500 the forward pass of
this request's batch failed (the detail names the request id; the server goes on serving), 503 no
conventional DNN, or more than --max-concurrency requests in progress (with Retry-After).

Concurrent requests are answered from shared forward passes (`serving.batcher`): offloads with the same k
together, classifications together, up to --max-batch rows; each answer says how many rows its batch had.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import fastapi
import torch
from fastapi import Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from edgeexit.errors import UserError
from edgeexit.model.checkpoint import load_spec
from edgeexit.rundir import RunDir
from edgeexit.serving import wire
from edgeexit.serving.batcher import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAIT_MS,
    Batcher,
    BatchFailed,
    check_batching,
)
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.http import (
    binary_body,
    check_content_type,
    error,
    error_responses,
    new_app,
    read_body,
    resolve_token,
)
from edgeexit.serving.images import IMAGE_TYPES, MAX_IMAGE_BODY, ImageRejected, image_to_uint8
from edgeexit.serving.limits import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENCY,
    check_idle_timeout,
    check_max_concurrency,
)
from edgeexit.serving.metrics import BATCH_BUCKETS
from edgeexit.serving.probe import probe_router
from edgeexit.serving.server import (
    ServerHandle,
    check_port_free,
    prepare_process,
    run_server,
    start_server,
)
from edgeexit.threads import SERVER_THREADS, check_threads, set_threads

__all__ = ["create_cloud_app", "serve_cloud", "start_cloud", "app_from_env", "DEFAULT_MAX_BODY"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 << 20
_ENV_RUN_DIR = "EDGEEXIT_CLOUD_RUN_DIR"
_ENV_MAX_BODY = "EDGEEXIT_CLOUD_MAX_BODY"
_ENV_MAX_BATCH = "EDGEEXIT_CLOUD_MAX_BATCH"
_ENV_MAX_WAIT = "EDGEEXIT_CLOUD_MAX_WAIT_MS"
_ENV_RUNTIME = "EDGEEXIT_CLOUD_RUNTIME"
_ENV_THREADS = "EDGEEXIT_CLOUD_THREADS"
_ENV_MAX_CONCURRENCY = "EDGEEXIT_CLOUD_MAX_CONCURRENCY"


class Answer(BaseModel):
    """A classification: scalars for one sample, lists (one entry per row) for a batched payload."""

    label: int | list[int]
    class_name: str | list[str]
    confidence: float | list[float]
    server_ms: float
    request_id: str
    model_hash: str
    k: int
    batch: int = 1  # rows in the forward pass that answered this request (dynamic batching)


def _answer(**fields: Any) -> Response:
    """An `Answer` as JSON, built directly: FastAPI's validation of a returned model costs more than the
    route's own work on small answers (the fields here are already the right types)."""
    return Response(json.dumps(fields, separators=(",", ":")).encode(), media_type="application/json")


def _check_payload(models: CloudRunner, p: wire.OffloadPayload, max_batch: int) -> None:
    """409 for another model, 422 for a k, shape, batch or value this model cannot take."""
    if p.model_hash != models.ee_hash:
        raise error(
            409,
            f"model hash mismatch: the payload was made by model {p.model_hash[:40]!r}, this server runs "
            f"{models.ee_hash!r}; deploy the same checkpoint at the edge and in the cloud",
        )
    n = models.ee_spec.num_branches
    if not 1 <= p.k <= n:
        raise error(422, f"split point k={p.k}; this model accepts k in 1..{n}")
    want = models.split_shape(p.k)
    shape = list(p.tensor.shape)
    if len(shape) != len(want) + 1 or shape[1:] != want:
        raise error(422, f"tensor shape {shape[:8]}; expected [B, {', '.join(map(str, want))}] for k={p.k}")
    if not 1 <= shape[0] <= max_batch:
        raise error(422, f"batch of {shape[0]} tensors; expected 1..{max_batch}")
    if wire.has_non_finite(p.tensor):
        raise error(422, "tensor holds NaN or Inf; expected finite values")


def create_cloud_app(
    run_dir: Path,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float | None = DEFAULT_MAX_WAIT_MS,
    models: CloudRunner | None = None,
    runtime: str = "torch",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> fastapi.FastAPI:
    """The cloud ASGI app for RUN_DIR (models loaded once, here, in `runtime`); `token` None falls back to
    $EDGEEXIT_TOKEN.

    Concurrent requests are batched (serving.batcher): up to `max_batch` rows per forward, a batch held up to
    `max_wait_ms` for more (None: adaptively, see serving.batcher). `models` lets several apps share already
    loaded models (the run directory is then not read). Beyond `max_concurrency` requests in progress: 503.
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    check_batching(max_batch, max_wait_ms)
    m = models if models is not None else CloudRunner.load(Path(run_dir), runtime)
    token = resolve_token(token)
    app, api = new_app("edgeexit cloud server", __doc__, token, max_concurrency=max_concurrency)
    batch_rows = app.state.metrics.histogram(
        "edgeexit_cloud_batch_rows",
        "rows per forward pass, by kind (offload, classify)",
        ["kind"],
        BATCH_BUCKETS,
    )

    def run_batch(key: Hashable, items: list[torch.Tensor]) -> list[tuple[Any, float, int]]:
        """One forward for a batch of requests: per request (its result, the batch's ms, the batch's rows)."""
        t0 = time.perf_counter()
        if key[0] == "offload":  # type: ignore[index]
            results: list[Any] = m.finish_many(key[1], items)  # type: ignore[index]
            rows = sum(t.shape[0] for t in items)
        else:
            results, rows = m.classify_many(items), len(items)
        ms = (time.perf_counter() - t0) * 1e3
        batch_rows.labels(key[0]).observe(rows)  # type: ignore[index]
        return [(r, ms, rows) for r in results]

    batcher: Batcher[torch.Tensor, tuple[Any, float, int]] = Batcher(
        run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms
    )
    app.state.batcher = batcher

    @api.get("/v1/model", responses=error_responses(401))
    async def model() -> dict[str, Any]:
        """Both specs, content hashes, accepted k, tensor shape per k and wire precisions."""
        return m.info(max_batch, max_body_bytes)

    @api.post(
        "/v1/offload",
        response_model=Answer,
        openapi_extra=binary_body("application/octet-stream"),
        responses=error_responses(400, 401, 409, 413, 415, 422, 500),
    )
    async def offload(request: Request) -> Response:
        """Finish an offloaded inference: the body is a safetensors payload (`edgeexit.serving.wire`)."""
        check_content_type(request, ("application/octet-stream",), allow_missing=True)
        body = await read_body(request, max_body_bytes)
        try:
            p = wire.decode_payload(body)
        except wire.PayloadDtypeError as exc:
            raise error(422, str(exc)) from None
        except wire.PayloadError as exc:
            raise error(400, str(exc)) from None
        _check_payload(m, p, max_batch)
        (labels, confs), server_ms, rows = await _batched(("offload", p.k), p.tensor, p.request_id)
        names = [m.ee_spec.class_names[i] for i in labels]
        one = len(labels) == 1
        return _answer(
            label=labels[0] if one else labels,
            class_name=names[0] if one else names,
            confidence=confs[0] if one else confs,
            server_ms=server_ms,
            request_id=p.request_id,
            model_hash=m.ee_hash,
            k=p.k,
            batch=rows,
        )

    @api.post(
        "/v1/classify",
        response_model=Answer,
        openapi_extra=binary_body(*IMAGE_TYPES),
        responses=error_responses(400, 401, 413, 415, 422, 500, 503),
    )
    async def classify(request: Request) -> Response:
        """Classify a PNG or JPEG image with the conventional DNN (the paper's cloud-only baseline)."""
        if m.conv_spec is None:
            raise error(
                503, "this cloud server has no conventional DNN (RUN_DIR/conventional); use /v1/offload"
            )
        check_content_type(request, IMAGE_TYPES)
        body = await read_body(request, min(max_body_bytes, MAX_IMAGE_BODY))
        request_id = request.headers.get("x-request-id", "")[:100] or uuid.uuid4().hex
        conv_spec = m.conv_spec
        t0 = time.perf_counter()
        try:
            x = await run_in_threadpool(image_to_uint8, body, conv_spec.preprocessing)
        except ImageRejected as exc:
            raise error(exc.status, str(exc)) from None
        decode_ms = (time.perf_counter() - t0) * 1e3
        (label, conf), server_ms, rows = await _batched(("classify",), x, request_id)
        return _answer(
            label=label,
            class_name=conv_spec.class_names[label],
            confidence=conf,
            server_ms=decode_ms + server_ms,
            request_id=request_id,
            model_hash=conv_spec.content_hash,
            k=0,
            batch=rows,
        )

    async def _batched(key: tuple, item: torch.Tensor, request_id: str) -> tuple[Any, float, int]:
        """(this request's result, the batch's compute ms, rows in the batch); 500 naming the request id
        when its batch failed."""
        try:
            return await batcher.submit(key, item, rows=item.shape[0] if key[0] == "offload" else 1)
        except BatchFailed as exc:
            raise error(500, f"request {request_id[:100]}: {exc}") from None

    api.include_router(probe_router)  # behind the same token
    app.include_router(api)
    app.state.direct_routes.update({("POST", "/v1/offload"): offload, ("POST", "/v1/classify"): classify})
    return app


def app_from_env() -> fastapi.FastAPI:
    """App factory for `uvicorn --factory` with several workers: settings come from environment variables."""
    run_dir = os.environ.get(_ENV_RUN_DIR)
    if not run_dir:
        raise UserError(f"set {_ENV_RUN_DIR} to the run directory (serve_cloud does this)")
    prepare_process()  # in each worker: the parent's rate limit on accept errors is not inherited
    set_threads(int(os.environ.get(_ENV_THREADS, SERVER_THREADS)))
    return create_cloud_app(
        Path(run_dir),
        max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, DEFAULT_MAX_BODY)),
        max_batch=int(os.environ.get(_ENV_MAX_BATCH, DEFAULT_MAX_BATCH)),
        max_wait_ms=float(os.environ[_ENV_MAX_WAIT]) if os.environ.get(_ENV_MAX_WAIT) else None,
        runtime=os.environ.get(_ENV_RUNTIME, "torch"),
        max_concurrency=int(os.environ.get(_ENV_MAX_CONCURRENCY, DEFAULT_MAX_CONCURRENCY)),
    )


def start_cloud(
    run_dir: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    runtime: str = "torch",
) -> ServerHandle:
    """The cloud server for RUN_DIR in a background thread (port 0: an ephemeral one); returns once it accepts.

    The handle has `.url` and `.stop()` and is a context manager: `with start_cloud(run) as cloud: ...`.
    """
    return start_server(create_cloud_app(Path(run_dir), token=token, runtime=runtime), host=host, port=port)


def serve_cloud(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float | None = DEFAULT_MAX_WAIT_MS,
    runtime: str = "torch",
    threads: int = SERVER_THREADS,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
) -> None:
    """Run the cloud server with uvicorn until interrupted; workers > 1 starts that many processes, each with
    `threads` intra-op threads and its own `max_concurrency`; connections idle for `idle_timeout` s are closed."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be an integer >= 1, got {workers!r}")
    if not 0 <= port <= 65535:
        raise UserError(f"port must be in 0..65535, got {port}")
    check_threads(threads)
    check_batching(max_batch, max_wait_ms)
    check_max_concurrency(max_concurrency)
    check_idle_timeout(idle_timeout)
    check_port_free(host, port)
    run_dir = Path(run_dir)
    if workers == 1:
        set_threads(threads)
        app = create_cloud_app(
            run_dir,
            token=token,
            max_body_bytes=max_body_bytes,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            runtime=runtime,
            max_concurrency=max_concurrency,
        )
        run_server(app, host=host, port=port, idle_timeout=idle_timeout)
        return
    load_spec(RunDir(run_dir).ee)  # fail here, once, rather than in every worker
    # Workers are separate processes that import the app: they read the settings from the environment.
    os.environ[_ENV_RUN_DIR] = str(run_dir.resolve())
    os.environ[_ENV_MAX_BODY] = str(max_body_bytes)
    os.environ[_ENV_MAX_BATCH] = str(max_batch)
    os.environ[_ENV_MAX_WAIT] = "" if max_wait_ms is None else str(max_wait_ms)
    os.environ[_ENV_RUNTIME] = runtime
    os.environ[_ENV_THREADS] = str(threads)
    os.environ[_ENV_MAX_CONCURRENCY] = str(max_concurrency)
    if token is not None:
        os.environ["EDGEEXIT_TOKEN"] = token
    run_server(
        "edgeexit.serving.cloud_app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        idle_timeout=idle_timeout,
    )
