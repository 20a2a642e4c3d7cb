"""The cloud server: an HTTP front for the cloud runner (serving.cloud_runner), which does the work.

Endpoints (every error is a JSON body {"detail": "..."}, one line saying what was expected):

- ``POST /v1/offload`` (application/octet-stream, a `wire.encode_payload` body): runs stages k+1.. and the
  final head on the tensor, calibrated with the final exit's temperature. Answers
  {label, class_name, confidence, server_ms, request_id, model_hash, k}. A payload may hold a batch
  [B, *split_shape(k)] with 1 <= B <= max_batch: for B == 1 label, class_name and confidence are scalars,
  for B > 1 they are lists of B values (one per row, in order).
- ``POST /v1/classify`` (image/png or image/jpeg): the conventional DNN decodes, preprocesses (its spec's
  Preprocessing) and classifies the image; same answer shape with k = 0 (503 if the run has no conventional DNN).
- ``GET /healthz``, ``GET /v1/model`` (specs, hashes, accepted k, split shapes, precisions) and the link-probe
  routes of `probe.probe_router`.

Status codes: 400 malformed payload or undecodable image, 401 missing bearer token (when one is configured;
/healthz stays open), 409 model hash mismatch, 413 body too large (refused from Content-Length before
reading, or as soon as a chunked body passes the limit), 415 wrong Content-Type or image format, 422 a
well-formed payload this model cannot take (k, shape, dtype, batch size, NaN/Inf), 503 no conventional DNN.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import fastapi
import uvicorn
from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from edgeexit.errors import UserError
from edgeexit.model.checkpoint import load_spec
from edgeexit.rundir import RunDir
from edgeexit.serving import wire
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
from edgeexit.serving.images import IMAGE_TYPES, ImageRejected, decode_image
from edgeexit.serving.probe import probe_router
from edgeexit.serving.server import ServerHandle, check_port_free, start_server

__all__ = ["create_cloud_app", "serve_cloud", "start_cloud", "app_from_env", "DEFAULT_MAX_BODY"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 << 20
_ENV_RUN_DIR = "EDGEEXIT_CLOUD_RUN_DIR"
_ENV_MAX_BODY = "EDGEEXIT_CLOUD_MAX_BODY"
_ENV_MAX_BATCH = "EDGEEXIT_CLOUD_MAX_BATCH"
_ENV_RUNTIME = "EDGEEXIT_CLOUD_RUNTIME"


class Answer(BaseModel):
    """A classification: scalars for one sample, lists (one entry per row) for a batched payload."""

    label: int | list[int]
    class_name: str | list[str]
    confidence: float | list[float]
    server_ms: float
    request_id: str
    model_hash: str
    k: int


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
    max_batch: int = 64,
    models: CloudRunner | None = None,
    runtime: str = "torch",
) -> fastapi.FastAPI:
    """The cloud ASGI app for RUN_DIR (models loaded once, here, in `runtime`); `token` None falls back to
    $EDGEEXIT_TOKEN.

    `models` lets several apps share already loaded models (the run directory is then not read).
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max_batch must be a positive integer, got {max_batch!r}")
    m = models if models is not None else CloudRunner.load(Path(run_dir), runtime)
    token = resolve_token(token)
    app, api = new_app("edgeexit cloud server", __doc__, token)

    @api.get("/v1/model", responses=error_responses(401))
    async def model() -> dict[str, Any]:
        """Both specs, content hashes, accepted k, tensor shape per k and wire precisions."""
        return m.info(max_batch, max_body_bytes)

    @api.post(
        "/v1/offload",
        response_model=Answer,
        openapi_extra=binary_body("application/octet-stream"),
        responses=error_responses(400, 401, 409, 413, 415, 422),
    )
    async def offload(request: Request) -> Answer:
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
        t0 = time.perf_counter()
        labels, confs = await run_in_threadpool(m.finish, p.tensor, p.k)
        server_ms = (time.perf_counter() - t0) * 1e3
        names = [m.ee_spec.class_names[i] for i in labels]
        one = len(labels) == 1
        return Answer(
            label=labels[0] if one else labels,
            class_name=names[0] if one else names,
            confidence=confs[0] if one else confs,
            server_ms=server_ms,
            request_id=p.request_id,
            model_hash=m.ee_hash,
            k=p.k,
        )

    @api.post(
        "/v1/classify",
        response_model=Answer,
        openapi_extra=binary_body(*IMAGE_TYPES),
        responses=error_responses(400, 401, 413, 415, 503),
    )
    async def classify(request: Request) -> Answer:
        """Classify a PNG or JPEG image with the conventional DNN (the paper's cloud-only baseline)."""
        if m.conv_spec is None:
            raise error(
                503, "this cloud server has no conventional DNN (RUN_DIR/conventional); use /v1/offload"
            )
        check_content_type(request, IMAGE_TYPES)
        body = await read_body(request, max_body_bytes)
        request_id = request.headers.get("x-request-id", "")[:100] or uuid.uuid4().hex
        conv_spec = m.conv_spec

        def work() -> tuple[int, float, float]:
            t0 = time.perf_counter()
            x = conv_spec.preprocessing.to_uint8(decode_image(body))
            label, conf = m.classify(x)
            return label, conf, (time.perf_counter() - t0) * 1e3

        try:
            label, conf, server_ms = await run_in_threadpool(work)
        except ImageRejected as exc:
            raise error(exc.status, str(exc)) from None
        return Answer(
            label=label,
            class_name=conv_spec.class_names[label],
            confidence=conf,
            server_ms=server_ms,
            request_id=request_id,
            model_hash=conv_spec.content_hash,
            k=0,
        )

    api.include_router(probe_router)  # behind the same token
    app.include_router(api)
    return app


def app_from_env() -> fastapi.FastAPI:
    """App factory for `uvicorn --factory` with several workers: settings come from environment variables."""
    run_dir = os.environ.get(_ENV_RUN_DIR)
    if not run_dir:
        raise UserError(f"set {_ENV_RUN_DIR} to the run directory (serve_cloud does this)")
    return create_cloud_app(
        Path(run_dir),
        max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, DEFAULT_MAX_BODY)),
        max_batch=int(os.environ.get(_ENV_MAX_BATCH, 64)),
        runtime=os.environ.get(_ENV_RUNTIME, "torch"),
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
    max_batch: int = 64,
    runtime: str = "torch",
) -> None:
    """Run the cloud server with uvicorn until interrupted; workers > 1 starts that many processes."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be an integer >= 1, got {workers!r}")
    if not 0 <= port <= 65535:
        raise UserError(f"port must be in 0..65535, got {port}")
    check_port_free(host, port)
    run_dir = Path(run_dir)
    if workers == 1:
        app = create_cloud_app(
            run_dir, token=token, max_body_bytes=max_body_bytes, max_batch=max_batch, runtime=runtime
        )
        uvicorn.run(app, host=host, port=port)
        return
    load_spec(RunDir(run_dir).ee)  # fail here, once, rather than in every worker
    # Workers are separate processes that import the app: they read the settings from the environment.
    os.environ[_ENV_RUN_DIR] = str(run_dir.resolve())
    os.environ[_ENV_MAX_BODY] = str(max_body_bytes)
    os.environ[_ENV_MAX_BATCH] = str(max_batch)
    os.environ[_ENV_RUNTIME] = runtime
    if token is not None:
        os.environ["EDGEEXIT_TOKEN"] = token
    uvicorn.run(
        "edgeexit.serving.cloud_app:app_from_env", factory=True, host=host, port=port, workers=workers
    )
