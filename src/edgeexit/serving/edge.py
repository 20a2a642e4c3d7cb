"""The edge: a runner that classifies one image stage by stage and offloads the hard ones, and its HTTP server.

`EdgeRunner` decodes and preprocesses an image, runs stage i and side branch i, calibrates the branch's
logits (the spec's temperature), and asks the policy (`policy.make_policy`, the same code the offline sweep
uses) whether to stop. When no branch up to k is confident it sends the stage-k tensor to the cloud
(`wire.encode_payload`) and returns the cloud's answer. Strategy `conventional` sends the image itself to
the cloud's conventional DNN.

Failures lose nothing: when the cloud is unreachable, times out, answers 5xx after the client's retries, or
refuses the payload (409 model mismatch, 422, 401...), the runner answers with the most confident edge exit
computed so far (ensembles: the ensemble's own answer after branch k), outcome ``offload_failed`` and
``detail`` saying why. Strategy `conventional` with the cloud down runs the EE-DNN's edge exits 1..k and
answers the same way. A runner without a cloud (no URL, no client) always falls back, detail
"no cloud configured".

MACs are counted as `evaluate.records.executed_macs` counts them offline (one rule): an answer at edge
exit i costs stages 1..i and heads 1..i (ensembles decide only at k: stages and heads 1..k); an offloaded
answer costs every stage, the k edge heads and the final head; a fallback costs what the edge ran (stages
and heads 1..k); `conventional` costs the conventional DNN's total. `bytes_sent` is the request body
(safetensors payload or image bytes) the edge sent, 0 when it sent nothing.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fastapi
import numpy as np
import torch
import uvicorn
from fastapi import Request
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from edgeexit.errors import UserError
from edgeexit.evaluate.records import executed_macs
from edgeexit.evaluate.sweep import preprocessing_of, threshold_for
from edgeexit.model.build import build_model
from edgeexit.model.checkpoint import SPEC, load_checkpoint, load_spec
from edgeexit.model.costs import CostTable, cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.spec import ModelSpec
from edgeexit.policy import CLOUD, POLICIES, Decision, Outcome, Policy, make_policy
from edgeexit.rundir import RunDir
from edgeexit.serving import wire
from edgeexit.serving.app_util import (
    IMAGE_TYPES,
    ImageRejected,
    TokenMiddleware,
    binary_body,
    check_content_type,
    check_port_free,
    decode_image,
    error,
    error_responses,
    install_error_handlers,
    read_body,
    resolve_token,
    sniff_image_type,
)
from edgeexit.serving.client import CloudClient, OffloadFailed
from edgeexit.train.calibrate import calibrated_probs

__all__ = ["EdgeAnswer", "EdgeRunner", "classify_files", "create_edge_app", "serve_edge", "EDGE_TOKEN_ENV"]

log = logging.getLogger(__name__)

EDGE_TOKEN_ENV = "EDGEEXIT_EDGE_TOKEN"
NO_CLOUD = "no cloud configured"


@dataclass
class EdgeAnswer:
    """One image's answer at the edge: what, where, at what cost, how long it took."""

    label: int
    class_name: str
    confidence: float
    exit: int  # 1..k = edge branch; 0 = cloud (final exit or the conventional DNN)
    answered_at: str  # "edge" | "cloud"
    macs: int
    bytes_sent: int
    time_ms: float  # from the image in hand to the answer known (includes the HTTP round trip)
    outcome: str  # "ok" | "offload_failed"
    request_id: str
    detail: str | None = None  # why the offload failed


class EdgeAnswerModel(BaseModel):
    """EdgeAnswer as the edge server's JSON answer."""

    label: int
    class_name: str
    confidence: float
    exit: int
    answered_at: str
    macs: int
    bytes_sent: int
    time_ms: float
    outcome: str
    request_id: str
    detail: str | None = None


def _png(x: torch.Tensor) -> bytes:
    """Lossless PNG of a uint8 [3, H, W] tensor."""
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


class EdgeRunner:
    """The edge half of the system for one model and one policy (strategy, alpha, k, wire precision)."""

    def __init__(
        self,
        net: EarlyExitNet,
        spec: ModelSpec,
        *,
        strategy: str,
        alpha: float,
        k: int | None,
        client: CloudClient | None,
        precision: str = "fp32",
        conventional_macs: int | None = None,
        costs: CostTable | None = None,
    ) -> None:
        n = spec.num_branches
        if k is None:
            k = n
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
            raise UserError(f"edge branches k={k!r}; this model accepts an integer in 1..{n}")
        if precision not in wire.PRECISIONS:
            raise UserError(f"wire precision {precision!r}; expected one of {', '.join(wire.PRECISIONS)}")
        if spec.temperatures is not None and len(spec.temperatures) != spec.num_exits:
            raise UserError(f"model spec has {len(spec.temperatures)} temperatures for {spec.num_exits} exits")
        net.eval()
        self.net = net
        self.spec = spec
        self.client = client
        self.precision = precision
        self.conventional_macs = conventional_macs
        self.prep = preprocessing_of(spec)
        self.costs = costs if costs is not None else cost_table(net, spec.input_size)
        self._owns_client = False
        self._set_k(int(k))
        self._set_policy(strategy, alpha)

    def _set_k(self, k: int) -> None:
        self.k = k
        # Per exit i: the MACs of an answer there, and of an offload, by the offline rule (records.executed_macs).
        exits = torch.tensor([*range(1, k + 1), CLOUD])
        heads = torch.tensor([*range(1, k + 1), k])
        macs = executed_macs(self.costs, Outcome(exits, heads, exits, torch.zeros(len(exits))), k)
        self._macs_at = [0, *(int(m) for m in macs[:k])]
        self._macs_cloud = int(macs[-1])

    def _set_policy(self, strategy: str, alpha: float) -> None:
        POLICIES.get(strategy)  # unknown name: UserError listing the known ones
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise UserError(f"alpha must be a number, got {alpha!r}") from None
        self.strategy = strategy
        self.policy: Policy | None = None
        if strategy == "conventional":
            if self.conventional_macs is None:
                raise UserError("strategy 'conventional' needs the conventional DNN's MACs (RUN_DIR/conventional)")
            return
        if math.isnan(self.alpha):
            raise UserError(f"alpha must be a number >= 0 for strategy {strategy!r}, got {alpha!r}")
        self.policy = make_policy(strategy, threshold_for(strategy, self.alpha), self.spec.ensemble_weights)
        # One dry decision at exit k: a policy that cannot work with this k (too few ensemble weights) fails now.
        uniform = torch.full((1, self.spec.num_classes), 1.0 / self.spec.num_classes)
        self.policy.decide([uniform] * self.k, self.k)

    @classmethod
    def from_run(
        cls,
        run_dir: Path,
        *,
        strategy: str,
        alpha: float,
        k: int | None = None,
        cloud_url: str | None = None,
        client: CloudClient | None = None,
        precision: str = "fp32",
        token: str | None = None,
        retries: int = 2,
        timeout: float = 10.0,
    ) -> EdgeRunner:
        """Load RUN_DIR/ee (and the conventional DNN's MACs when RUN_DIR/conventional exists).

        `client` wins over `cloud_url`; with neither there is no cloud and every offload falls back to the
        edge. `token` is the cloud's bearer token (None: $EDGEEXIT_TOKEN). k None = all branches.
        """
        run = RunDir(Path(run_dir))
        net, spec = load_checkpoint(run.ee)
        if spec.kind != "early_exit" or spec.num_branches < 1:
            raise UserError(f"{run.ee} holds a model without side branches; expected the EE-DNN")
        costs = cost_table(net, spec.input_size)
        conv_macs = None
        if (run.conventional / SPEC).is_file():
            conv_spec = load_spec(run.conventional)
            same = (conv_spec.backbone, conv_spec.num_classes, conv_spec.input_size) == (
                spec.backbone, spec.num_classes, spec.input_size)  # fmt: skip
            # The conventional DNN is the EE-DNN's backbone without branches: same MACs as its stages + head.
            # Otherwise measure it (MACs need no weights).
            conv_macs = costs.total_macs if same else cost_table(build_model(conv_spec), conv_spec.input_size).total_macs
        owns = False
        if client is None and cloud_url is not None:
            client = CloudClient(cloud_url, token=token, retries=retries, timeout=timeout)
            owns = True
        if client is None:
            log.warning("no cloud configured: every offload falls back to the edge's most confident exit")
        runner = cls(
            net, spec, strategy=strategy, alpha=alpha, k=k, client=client, precision=precision,
            conventional_macs=conv_macs, costs=costs,
        )  # fmt: skip
        runner._owns_client = owns
        return runner

    def variant(self, *, strategy: str, alpha: float, k: int | None = None) -> EdgeRunner:
        """The same model, costs, precision and client (one keep-alive connection) with another policy.

        k None keeps this runner's k.
        """
        n = self.spec.num_branches
        if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n):
            raise UserError(f"edge branches k={k!r}; this model accepts an integer in 1..{n}")
        other = copy.copy(self)
        other._owns_client = False
        if k is not None:
            other._set_k(int(k))
        other._set_policy(strategy, alpha)
        return other

    def close(self) -> None:
        """Close the cloud client if this runner created it (from_run with a URL)."""
        if self._owns_client and self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> dict[str, Any]:
        """The runner's settings (the edge server's /v1/config)."""
        return {
            "strategy": self.strategy,
            "alpha": None if math.isnan(self.alpha) else self.alpha,
            "k": self.k,
            "precision": self.precision,
            "cloud_url": None if self.client is None else self.client.base_url,
            "model_hash": self.spec.content_hash,
            "num_branches": self.spec.num_branches,
            "class_names": self.spec.class_names,
            "input_size": self.spec.input_size,
        }

    # --- classification ------------------------------------------------------------------------------------

    def classify_image(self, data: bytes) -> EdgeAnswer:
        """Classify encoded image bytes (PNG or JPEG); the timer starts now, with the bytes in hand.

        Bytes that are not a decodable PNG/JPEG raise ImageRejected (a UserError with an HTTP status).
        """
        t0 = time.perf_counter()
        if self.strategy == "conventional":
            content_type = sniff_image_type(data)
            if content_type is None:
                raise ImageRejected(415, "image bytes are neither PNG nor JPEG; expected PNG or JPEG")
            return self._conventional(data, content_type, None, t0)
        return self._early_exit(self._to_uint8(data), t0)

    def classify_uint8(self, x: torch.Tensor) -> EdgeAnswer:
        """Classify one uint8 [3, S, S] image at the model's input size S."""
        t0 = time.perf_counter()
        s = self.spec.input_size
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or tuple(x.shape) != (3, s, s):
            raise UserError(f"expected a uint8 tensor [3, {s}, {s}], got {getattr(x, 'dtype', type(x))} "
                            f"{tuple(getattr(x, 'shape', ()))}")  # fmt: skip
        if self.strategy == "conventional":
            return self._conventional(_png(x), "image/png", x, t0)
        return self._early_exit(x, t0)

    def _to_uint8(self, data: bytes) -> torch.Tensor:
        return self.prep.to_uint8(decode_image(data))

    def _probs(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        temps = self.spec.temperatures
        return calibrated_probs([logits], None if temps is None else [temps[i - 1]])[0]

    def _run_edge(self, x: torch.Tensor, policy: Policy) -> tuple[int | None, list[torch.Tensor], Decision, torch.Tensor]:
        """Stages and branches 1..k until the policy stops: (stop exit or None, probs so far, last decision, h)."""
        probs: list[torch.Tensor] = []
        with torch.inference_mode():
            h = self.prep.normalize(x).unsqueeze(0)
            for i in range(1, self.k + 1):
                h = self.net.run_stage(i, h)
                probs.append(self._probs(self.net.run_exit(i, h), i))
                d = policy.decide(probs, self.k)
                if bool(d.stop[0]):
                    return i, probs, d, h
        return None, probs, d, h

    def _early_exit(self, x: torch.Tensor, t0: float) -> EdgeAnswer:
        assert self.policy is not None
        request_id = uuid.uuid4().hex
        stop, probs, d, h = self._run_edge(x, self.policy)
        if stop is not None:
            return self._edge_answer(d, stop, request_id, t0)
        if self.client is None:
            return self._fallback(probs, d, self.policy, request_id, t0, NO_CLOUD, 0)
        try:
            body = wire.encode_payload(
                h, model_hash=self.spec.content_hash, k=self.k, request_id=request_id, precision=self.precision
            )
        except UserError as exc:  # e.g. a tensor outside the fp16 range: the edge's answer still stands
            return self._fallback(probs, d, self.policy, request_id, t0, f"cannot encode the payload: {exc}", 0)
        try:
            ans = self.client.offload(body, request_id)
        except OffloadFailed as exc:
            return self._fallback(probs, d, self.policy, request_id, t0, str(exc), len(body))
        return EdgeAnswer(
            label=ans.label, class_name=ans.class_name, confidence=ans.confidence, exit=CLOUD,
            answered_at="cloud", macs=self._macs_cloud, bytes_sent=len(body), time_ms=_ms(t0), outcome="ok",
            request_id=request_id,
        )  # fmt: skip

    def _edge_answer(self, d: Decision, i: int, request_id: str, t0: float, *, failed: str | None = None,
                     bytes_sent: int = 0, macs: int | None = None) -> EdgeAnswer:  # fmt: skip
        label = int(d.label[0])
        return EdgeAnswer(
            label=label, class_name=self.spec.class_names[label], confidence=float(d.confidence[0]), exit=i,
            answered_at="edge", macs=self._macs_at[i] if macs is None else macs, bytes_sent=bytes_sent,
            time_ms=_ms(t0), outcome="ok" if failed is None else "offload_failed", request_id=request_id,
            detail=failed,
        )  # fmt: skip

    def _fallback(self, probs: Sequence[torch.Tensor], last: Decision, policy: Policy, request_id: str,
                  t0: float, why: str, bytes_sent: int) -> EdgeAnswer:  # fmt: skip
        """The best answer the edge has: the ensemble's after branch k, else the most confident exit so far."""
        if policy.decides_every_exit:
            confs = [float(p.max()) for p in probs]
            i = confs.index(max(confs)) + 1  # ties: the earliest exit
            p = probs[i - 1]
            conf, label = p.max(dim=1)
            d = Decision(stop=torch.ones(1, dtype=torch.bool), label=label, confidence=conf.to(torch.float32))
        else:
            i, d = len(probs), last
        if why == NO_CLOUD:
            log.debug("no cloud configured: answering at edge exit %d", i)
        else:
            log.warning("offload failed (%s); answering at edge exit %d", why, i)
        # What the edge ran: stages and heads 1..k, i.e. the cost of an answer at exit k.
        return self._edge_answer(d, i, request_id, t0, failed=why, bytes_sent=bytes_sent, macs=self._macs_at[self.k])

    def _conventional(self, data: bytes, content_type: str, x: torch.Tensor | None, t0: float) -> EdgeAnswer:
        request_id = uuid.uuid4().hex
        why, sent = NO_CLOUD, 0
        if self.client is not None:
            try:
                ans = self.client.classify(data, content_type)
            except OffloadFailed as exc:
                why, sent = str(exc), len(data)
            else:
                return EdgeAnswer(
                    label=ans.label, class_name=ans.class_name, confidence=ans.confidence, exit=CLOUD,
                    answered_at="cloud", macs=int(self.conventional_macs or 0), bytes_sent=len(data),
                    time_ms=_ms(t0), outcome="ok", request_id=ans.request_id or request_id,
                )  # fmt: skip
        # Cloud down: the EE-DNN's edge exits 1..k still give an answer (the most confident one).
        never = make_policy("ee", math.inf)
        _, probs, d, _ = self._run_edge(x if x is not None else self._to_uint8(data), never)
        return self._fallback(probs, d, never, request_id, t0, why, sent)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def classify_files(paths: Sequence[Path], runner: EdgeRunner) -> list[EdgeAnswer]:
    """Classify image files with `runner`; an unreadable or undecodable file raises a UserError naming it."""
    answers = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from None
        try:
            answers.append(runner.classify_image(data))
        except ImageRejected as exc:
            raise UserError(f"{path}: {exc}") from None
    return answers


def create_edge_app(
    runner: EdgeRunner, *, token: str | None = None, max_body_bytes: int = 16 << 20
) -> fastapi.FastAPI:
    """The edge server: POST /v1/classify (image bytes) -> EdgeAnswer JSON; GET /healthz, GET /v1/config.

    `token` (None: $EDGEEXIT_EDGE_TOKEN) is the bearer token the edge's clients must send; the cloud's token is
    the runner's client's business. The edge keeps serving when the cloud is down: answers then carry
    outcome "offload_failed".
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    token = resolve_token(token, EDGE_TOKEN_ENV)
    app = fastapi.FastAPI(title="edgeexit edge server", version="1", description=__doc__)
    install_error_handlers(app)
    if token is not None:
        app.add_middleware(TokenMiddleware, token=token)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: always open, even with a token configured."""
        return {"status": "ok"}

    @app.get("/v1/config", responses=error_responses(401))
    async def config() -> dict[str, Any]:
        """The runner's strategy, alpha, k, precision, cloud URL and model."""
        return runner.config()

    @app.post(
        "/v1/classify",
        response_model=EdgeAnswerModel,
        openapi_extra=binary_body(*IMAGE_TYPES),
        responses=error_responses(400, 401, 413, 415),
    )
    async def classify(request: Request) -> EdgeAnswerModel:
        """Classify a PNG or JPEG image at the edge, offloading to the cloud when no exit is confident."""
        check_content_type(request, IMAGE_TYPES)
        body = await read_body(request, max_body_bytes)
        try:
            answer = await run_in_threadpool(runner.classify_image, body)
        except ImageRejected as exc:
            raise error(exc.status, str(exc)) from None
        return EdgeAnswerModel(**asdict(answer))

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
) -> None:
    """Run the edge server with uvicorn until interrupted (token: clients' bearer token; cloud_token: the cloud's)."""
    check_port_free(host, port)
    runner = EdgeRunner.from_run(
        Path(run_dir), strategy=strategy, alpha=alpha, k=k, cloud_url=cloud_url, precision=precision,
        token=cloud_token,
    )  # fmt: skip
    try:
        uvicorn.run(create_edge_app(runner, token=token), host=host, port=port)
    finally:
        runner.close()
