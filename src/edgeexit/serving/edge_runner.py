"""The edge: runners that classify one image and offload the hard ones (no HTTP here; see edge_app).

`EdgeRunner` (an edge policy) preprocesses an image (`spec.preprocessing`), runs stage i and branch i through
the runtime and calibrates (`Runtime.edge_input`/`edge_probs`: `inference.calibrate`, or its numpy twin on
runtime onnx), and asks the policy (`policy.policy_for`, the sweep's code, on numpy arrays) whether to stop;
when no branch up to k is confident it sends the stage-k tensor to the cloud and returns its answer.
`ConventionalRunner`, the cloud-only model role, sends the image itself to the conventional DNN.

Failures lose nothing: when the cloud is unreachable, misses the offload deadline, answers 5xx after retries,
refuses the payload, answers something unusable (not JSON, a label outside the model's classes, a confidence
outside [0, 1], another model's hash, another request's id or k: see serving.client) or the circuit breaker is
open, the runner answers from the most confident edge exit so far (ensembles: their own answer after branch k)
with outcome ``offload_failed``, ``reason`` (serving.client.REASONS, or "no_cloud", "encode") and ``detail``
saying why; without a cloud, detail is "no cloud configured". Each runner counts its offloads by outcome
(`offload_outcomes`: "ok" or the reason). MACs follow `CostTable.executed_macs`, the offline rule; a fallback
costs what the edge ran (stages and heads 1..k). `bytes_sent` is the request body the edge sent, 0 when it sent
nothing.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from edgeexit.errors import UserError
from edgeexit.policy import (
    CLOUD,
    CONVENTIONAL,
    POLICIES,
    Decision,
    Policy,
    policy_for,
    spec_policy,
    top_label,
)
from edgeexit.runtime import Runtime, load_runtime
from edgeexit.serving import wire
from edgeexit.serving.client import (
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_DEADLINE,
    CloudAnswer,
    CloudClient,
    Expect,
    OffloadFailed,
)
from edgeexit.serving.images import (
    ImageRejected,
    decode_image,
    image_to_uint8,
    png_bytes,
    sniff_image_type,
)
from edgeexit.serving.server import release_freed_memory

__all__ = [
    "EdgeAnswer",
    "EdgeRunner",
    "ConventionalRunner",
    "Runner",
    "load_runner",
    "make_runner",
    "classify_files",
]

log = logging.getLogger(__name__)

NO_CLOUD = "no cloud configured"
NO_CLOUD_REASON = "no_cloud"


class EdgeAnswer(BaseModel):
    """One image's answer at the edge: what, where, at what cost, how long it took (the edge server's JSON)."""

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
    reason: str | None = None  # the same for machines: serving.client.REASONS, "no_cloud" or "encode"


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _request_id() -> str:
    """32 random hex digits, like uuid4().hex (a quarter of its cost; nothing reads a UUID's version bits)."""
    return os.urandom(16).hex()


def _cloud_answer(ans: CloudAnswer, *, macs: int, bytes_sent: int, t0: float, request_id: str) -> EdgeAnswer:
    """The cloud's answer as the edge reports it."""
    return EdgeAnswer(
        label=ans.label,
        class_name=ans.class_name,
        confidence=ans.confidence,
        exit=CLOUD,
        answered_at="cloud",
        macs=macs,
        bytes_sent=bytes_sent,
        time_ms=_ms(t0),
        outcome="ok",
        request_id=request_id,
    )


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise UserError(f"edge branches k={k!r}; this model accepts an integer in 1..{n}")
    return int(k)


class Runner(ABC):
    """What every edge runner shares: the runtime, k, the wire precision, the cloud client, the MACs per exit."""

    strategy: str

    def __init__(
        self,
        runtime: Runtime,
        *,
        k: int | None = None,
        client: CloudClient | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in wire.PRECISIONS:
            raise UserError(f"wire precision {precision!r}; expected one of {', '.join(wire.PRECISIONS)}")
        self.runtime = runtime
        self.spec = runtime.spec
        self.prep = self.spec.preprocessing
        self.costs = runtime.costs
        self.client = client
        self.precision = precision
        self._owns_client = False
        # Offloads by outcome: "ok" or the failure's reason (for metrics; read with `outcome_counts`).
        self.offload_outcomes: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self.k = _check_k(self.spec.num_branches if k is None else k, self.spec.num_branches)
        # Per exit i: the MACs of an answer there, and of an offload, by the offline rule.
        exits = np.array([*range(1, self.k + 1), CLOUD])
        heads = np.array([*range(1, self.k + 1), self.k])
        macs = self.costs.executed_macs(exits, heads, self.k)
        self._macs_at = [0, *(int(m) for m in macs[: self.k])]
        self._macs_cloud = int(macs[-1])

    # --- lifecycle -----------------------------------------------------------------------------------------

    def variant(self, *, strategy: str, alpha: float, k: int | None = None) -> Runner:
        """The same runtime, precision and client (one keep-alive connection) with another strategy; k None
        keeps this runner's k."""
        return make_runner(
            self.runtime,
            strategy=strategy,
            alpha=alpha,
            k=self.k if k is None else k,
            client=self.client,
            precision=self.precision,
        )

    def close(self) -> None:
        """Close the cloud client if this runner created it (`load_runner` with a URL)."""
        if self._owns_client and self.client is not None:
            self.client.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> dict[str, Any]:
        """The runner's settings (the edge server's /v1/config)."""
        return {
            "strategy": self.strategy,
            "alpha": self._alpha_out(),
            "k": self.k,
            "precision": self.precision,
            "runtime": self.runtime.name,
            "cloud_url": None if self.client is None else self.client.base_url,
            "model_hash": self.spec.content_hash,
            "num_branches": self.spec.num_branches,
            "class_names": self.spec.class_names,
            "input_size": self.spec.input_size,
        }

    def _alpha_out(self) -> float | None:
        return None

    def breaker_state(self) -> str:
        """The cloud client's circuit breaker: "closed", "open", "half_open", or "disabled" (none, or no cloud)."""
        return "disabled" if self.client is None else self.client.breaker_state

    def outcome_counts(self) -> dict[str, int]:
        """A snapshot of `offload_outcomes`: offloads by "ok" or failure reason since the runner was made."""
        with self._count_lock:
            return dict(self.offload_outcomes)

    def _count(self, outcome: str) -> None:
        with self._count_lock:
            self.offload_outcomes[outcome] += 1

    # --- classification ------------------------------------------------------------------------------------

    @abstractmethod
    def classify_image(self, data: bytes) -> EdgeAnswer:
        """Classify encoded image bytes (PNG or JPEG); the timer starts now, with the bytes in hand.

        Bytes that are not a decodable PNG/JPEG raise ImageRejected (a UserError with an HTTP status).
        """

    @abstractmethod
    def classify_uint8(self, x: torch.Tensor) -> EdgeAnswer:
        """Classify one uint8 [3, S, S] image at the model's input size S."""

    def _check_uint8(self, x: torch.Tensor) -> None:
        s = self.spec.input_size
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or tuple(x.shape) != (3, s, s):
            raise UserError(
                f"expected a uint8 tensor [3, {s}, {s}], got {getattr(x, 'dtype', type(x))} "
                f"{tuple(getattr(x, 'shape', ()))}"
            )

    def _to_uint8(self, data: bytes) -> torch.Tensor:
        return image_to_uint8(data, self.prep)

    def _run_edge(
        self, x: torch.Tensor, policy: Policy
    ) -> tuple[int | None, list[np.ndarray], Decision, Any]:
        """Stages and branches 1..k until the policy stops: (stop exit or None, probs so far, last decision, h).

        h is in the runtime's own array type (`Runtime.edge_probs`); the probabilities and decisions are numpy.
        """
        probs: list[np.ndarray] = []
        runtime, k = self.runtime, self.k
        h = runtime.edge_input(x)
        for i in range(1, k + 1):
            h, p = runtime.edge_probs(i, h)
            probs.append(p)
            d = policy.decide(probs, k)
            if d.stop[0]:
                return i, probs, d, h
        return None, probs, d, h

    def _edge_answer(
        self,
        d: Decision,
        i: int,
        request_id: str,
        t0: float,
        *,
        failed: str | None = None,
        reason: str | None = None,
        bytes_sent: int = 0,
        macs: int | None = None,
    ) -> EdgeAnswer:
        label = int(d.label[0])
        # Validated: pydantic-core's validator (~1.5 us) costs less than `model_construct`'s Python loop over the
        # fields (~3 us, and more with cold caches between requests).
        return EdgeAnswer(
            label=label,
            class_name=self.spec.class_names[label],
            confidence=float(d.confidence[0]),
            exit=i,
            answered_at="edge",
            macs=self._macs_at[i] if macs is None else macs,
            bytes_sent=bytes_sent,
            time_ms=_ms(t0),
            outcome="ok" if failed is None else "offload_failed",
            request_id=request_id,
            detail=failed,
            reason=reason,
        )

    def _fallback(
        self,
        probs: Sequence[np.ndarray],
        last: Decision,
        policy: Policy,
        request_id: str,
        t0: float,
        why: str,
        bytes_sent: int,
        reason: str,
    ) -> EdgeAnswer:
        """The best answer the edge has: the ensemble's after branch k, else the most confident exit so far."""
        if policy.decides_every_exit:
            confs = [float(p.max()) for p in probs]
            i = confs.index(max(confs)) + 1  # ties: the earliest exit
            label, conf = top_label(probs[i - 1])
            d = Decision(stop=np.ones(1, dtype=np.bool_), label=label, confidence=conf.astype(np.float32))
        else:
            i, d = len(probs), last
        self._count(reason)
        if reason == NO_CLOUD_REASON:
            log.debug("no cloud configured: answering at edge exit %d", i)
        elif reason == "breaker_open":
            log.debug("offload refused (%s); answering at edge exit %d", why, i)  # one warning opened it
        else:
            log.warning("offload failed (%s); answering at edge exit %d", why, i)
        # What the edge ran: stages and heads 1..k, i.e. the cost of an answer at exit k.
        return self._edge_answer(
            d, i, request_id, t0, failed=why, reason=reason, bytes_sent=bytes_sent, macs=self._macs_at[self.k]
        )

    def _cloud_answer(
        self, ans: CloudAnswer, *, macs: int, bytes_sent: int, t0: float, request_id: str
    ) -> EdgeAnswer:
        """The cloud's (checked) answer as the edge reports it, counted "ok"."""
        self._count("ok")
        return _cloud_answer(ans, macs=macs, bytes_sent=bytes_sent, t0=t0, request_id=request_id)


class EdgeRunner(Runner):
    """The edge half of the system for one edge policy (strategy, alpha), k and wire precision."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        strategy: str,
        alpha: float,
        k: int | None = None,
        client: CloudClient | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(runtime, k=k, client=client, precision=precision)
        POLICIES.get(strategy)  # unknown name: UserError listing the known ones
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise UserError(f"alpha must be a number, got {alpha!r}") from None
        if math.isnan(self.alpha):
            raise UserError(f"alpha must be a number >= 0 for strategy {strategy!r}, got {alpha!r}")
        self.strategy = strategy
        self.policy = spec_policy(strategy, self.alpha, self.spec)
        self._expect = Expect(self.spec.content_hash, self.k, self.spec.class_names)
        # One dry decision at exit k: a policy that cannot work with this k (too few ensemble weights) fails now.
        uniform = np.full((1, self.spec.num_classes), 1.0 / self.spec.num_classes, dtype=np.float32)
        self.policy.decide([uniform] * self.k, self.k)

    def _alpha_out(self) -> float | None:
        return self.alpha

    def classify_image(self, data: bytes) -> EdgeAnswer:
        """Classify encoded image bytes (PNG or JPEG); the timer starts now, with the bytes in hand."""
        t0 = time.perf_counter()
        return self._classify(self._to_uint8(data), t0)

    def classify_uint8(self, x: torch.Tensor) -> EdgeAnswer:
        """Classify one uint8 [3, S, S] image at the model's input size S."""
        t0 = time.perf_counter()
        self._check_uint8(x)
        return self._classify(x, t0)

    def _classify(self, x: torch.Tensor, t0: float) -> EdgeAnswer:
        request_id = _request_id()
        stop, probs, d, h = self._run_edge(x, self.policy)
        if stop is not None:
            return self._edge_answer(d, stop, request_id, t0)
        if self.client is None:
            return self._fallback(probs, d, self.policy, request_id, t0, NO_CLOUD, 0, NO_CLOUD_REASON)
        try:
            body = wire.encode_payload(
                torch.as_tensor(h),  # a numpy stage output as a tensor without a copy: the same bytes
                model_hash=self.spec.content_hash,
                k=self.k,
                request_id=request_id,
                precision=self.precision,
            )
        except UserError as exc:  # e.g. a tensor outside the fp16 range: the edge's answer still stands
            why = f"encode: cannot encode the payload: {exc}"
            return self._fallback(probs, d, self.policy, request_id, t0, why, 0, "encode")
        try:
            ans = self.client.offload(body, request_id, expect=self._expect, spent=time.perf_counter() - t0)
        except OffloadFailed as exc:
            why = f"{exc.reason}: {exc}"
            return self._fallback(probs, d, self.policy, request_id, t0, why, len(body), exc.reason)
        return self._cloud_answer(
            ans, macs=self._macs_cloud, bytes_sent=len(body), t0=t0, request_id=request_id
        )


class ConventionalRunner(Runner):
    """The cloud-only model role: the image goes to the cloud's conventional DNN; the edge runs nothing
    unless the cloud fails, and then answers from the EE-DNN's edge exits 1..k."""

    strategy = CONVENTIONAL

    def __init__(
        self,
        runtime: Runtime,
        *,
        k: int | None = None,
        client: CloudClient | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(runtime, k=k, client=client, precision=precision)
        if runtime.conventional_macs is None:
            raise UserError("strategy 'conventional' needs the conventional DNN (RUN_DIR/conventional)")
        self.conventional_macs = runtime.conventional_macs
        self._never = policy_for("ee", math.inf)  # the fallback runs every edge exit 1..k
        conv = runtime.conventional_spec
        # The answer must come from the conventional DNN (k = 0); a runtime without its spec checks the classes.
        self._expect = (
            Expect(conv.content_hash, 0, conv.class_names)
            if conv is not None
            else Expect(self.spec.content_hash, 0, self.spec.class_names)
        )

    def classify_image(self, data: bytes) -> EdgeAnswer:
        """Send image bytes (PNG or JPEG) to the cloud's conventional DNN; the timer starts now."""
        t0 = time.perf_counter()
        content_type = sniff_image_type(data)
        if content_type is None:
            decode_image(
                data
            )  # raises the EdgeRunner's and the cloud's answer: 400 empty, 415 naming the format
            raise ImageRejected(415, "image bytes are neither PNG nor JPEG; expected PNG or JPEG")
        return self._classify(data, content_type, None, t0)

    def classify_uint8(self, x: torch.Tensor) -> EdgeAnswer:
        """Send one uint8 [3, S, S] image (as a lossless PNG) to the cloud's conventional DNN."""
        t0 = time.perf_counter()
        self._check_uint8(x)
        return self._classify(png_bytes(x), "image/png", x, t0)

    def _classify(self, data: bytes, content_type: str, x: torch.Tensor | None, t0: float) -> EdgeAnswer:
        request_id = _request_id()
        why, sent, reason = NO_CLOUD, 0, NO_CLOUD_REASON
        if self.client is not None:
            try:
                ans = self.client.classify(
                    data, content_type, request_id, expect=self._expect, spent=time.perf_counter() - t0
                )
            except OffloadFailed as exc:
                why, sent, reason = f"{exc.reason}: {exc}", len(data), exc.reason
            else:
                return self._cloud_answer(
                    ans, macs=self.conventional_macs, bytes_sent=len(data), t0=t0, request_id=request_id
                )
        # Cloud down: the EE-DNN's edge exits 1..k still give an answer (the most confident one).
        _, probs, d, _ = self._run_edge(x if x is not None else self._to_uint8(data), self._never)
        return self._fallback(probs, d, self._never, request_id, t0, why, sent, reason)


def make_runner(
    runtime: Runtime,
    *,
    strategy: str,
    alpha: float,
    k: int | None = None,
    client: CloudClient | None = None,
    precision: str = "fp32",
) -> Runner:
    """The runner of `strategy`: an `EdgeRunner` for an edge policy, a `ConventionalRunner` for the
    cloud-only conventional DNN (alpha unused)."""
    if strategy == CONVENTIONAL:
        return ConventionalRunner(runtime, k=k, client=client, precision=precision)
    return EdgeRunner(runtime, strategy=strategy, alpha=alpha, k=k, client=client, precision=precision)


def load_runner(
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
    deadline: float | None = DEFAULT_DEADLINE,
    breaker_failures: int = DEFAULT_BREAKER_FAILURES,
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
    runtime: str = "torch",
) -> Runner:
    """The runner of `strategy` over RUN_DIR/ee (the conventional DNN's spec and MACs when the run has one).

    `client` wins over `cloud_url`; with neither there is no cloud and every offload falls back to the
    edge. `token` is the cloud's bearer token (None: $EDGEEXIT_TOKEN). k None = all branches. The client made
    from `cloud_url` gives each offload `deadline` seconds in all (None: no total bound; `timeout` bounds each
    socket operation) and opens its circuit breaker after `breaker_failures` consecutive failures (0: never)
    for `breaker_cooldown` seconds (serving.client).
    """
    rt = load_runtime(Path(run_dir), runtime, load_conventional=False)
    release_freed_memory()
    owns = False
    if client is None and cloud_url is not None:
        client = CloudClient(
            cloud_url,
            token=token,
            retries=retries,
            timeout=timeout,
            deadline=deadline,
            breaker_failures=breaker_failures,
            breaker_cooldown=breaker_cooldown,
        )
        owns = True
    if client is None:
        log.warning("no cloud configured: every offload falls back to the edge's most confident exit")
    try:
        runner = make_runner(rt, strategy=strategy, alpha=alpha, k=k, client=client, precision=precision)
    except BaseException:
        if owns:
            client.close()  # type: ignore[union-attr]
        raise
    runner._owns_client = owns
    return runner


def classify_files(paths: Sequence[Path], runner: Runner) -> list[EdgeAnswer]:
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
