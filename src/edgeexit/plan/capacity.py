"""Capacity of one cloud replica serving many edges: utilisation, offload latency, edges per replica.

The model of one `edgeexit serve-cloud` process (one worker), with the costs the cost model measured:

- offloads arrive as a Poisson stream of rate N x r x (offload share): N edges, each classifying r images/s;
- the replica is one server that works on one batch at a time, the dynamic batcher's way
  (serving/batcher.py): when it is free it takes every request that has arrived, up to max_batch rows, with
  the adaptive hold of the real batcher (after a batch of several rows, wait for as many again, at most a
  fifth of its compute and 5 ms); a batch of b requests takes b x `front_ms` (the HTTP, payload decoding and
  answer of each request, the server's measured CPU per request beyond the forward) + `cloud_batch_ms[k][b]`
  (the forward, measured per batch size);
- so the replica saturates at max over b of b / (b x front_ms + batch_ms(b)) requests per second, and its
  utilisation is the offered rate over that.

The event loop and the forward are counted one after the other, as if they shared one core. They overlap
somewhat in the real server (ONNX Runtime and torch release the GIL during a forward), so the model errs on the
side of fewer edges per replica, by at most the forward's share of a request. The latencies come from a
small discrete-event simulation (seeded, so answers repeat), not from a closed formula: batch sizes follow
the queue, which M/D/1-style formulas do not. The delay an offload sees beyond an unloaded server's is added
to the planner's per-image draws of an offloaded image (which already hold one unloaded round trip); edge
answers are untouched. Not modelled: other processes on the replica's cores, several workers per replica
(one replica = one worker), the network's own queueing (each edge has its own link).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeexit.errors import UserError
from edgeexit.plan.costmodel import CostModel
from edgeexit.plan.planner import Candidate

__all__ = ["Load", "ServerModel", "SimResult", "edges_per_replica", "predict_load", "simulate"]

HOLD_SHARE = 0.2  # serving.batcher.ADAPTIVE_HOLD
HOLD_MAX_MS = 5.0  # serving.batcher.ADAPTIVE_HOLD_MAX_MS
REQUESTS = 20_000  # simulated offloads per prediction (the first tenth is warm-up)
MAX_EDGES = 10**7


@dataclass(frozen=True)
class ServerModel:
    """One replica: per-request loop CPU, forward time per batch size (rows -> ms), the batcher's limits."""

    front_ms: float
    batch_sizes: tuple[int, ...]
    batch_times_ms: tuple[float, ...]
    max_batch: int = 64
    adaptive_hold: bool = True

    @classmethod
    def of(cls, model: CostModel, k: int, max_batch: int = 64) -> ServerModel:
        """The replica serving offloads at split k (k = 0: the conventional DNN's classifications)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UserError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
        sizes = tuple(range(1, max_batch + 1))
        return cls(model.front_ms, sizes, tuple(model.batch_ms(k, b) for b in sizes), max_batch)

    def service_ms(self, rows: int) -> float:
        """Forward time of a batch of `rows` rows."""
        return self.batch_times_ms[min(rows, len(self.batch_times_ms)) - 1] * max(
            1, rows / len(self.batch_times_ms)
        )

    def batch_ms(self, rows: int) -> float:
        """Time the replica takes for a batch of `rows` requests: each one's loop work, then the forward."""
        return rows * self.front_ms + self.service_ms(rows)

    def capacity_per_s(self) -> float:
        """Requests per second at saturation: the best batch size's throughput."""
        return max(b * 1e3 / self.batch_ms(b) for b in self.batch_sizes if b <= self.max_batch)

    def unloaded_ms(self) -> float:
        """Time in the server of a lone request: its loop work and a batch of one."""
        return self.batch_ms(1)


@dataclass
class SimResult:
    """What the simulation saw after its warm-up."""

    sojourn_ms: np.ndarray  # per request: arrival to answer, inside the server
    busy: float  # share of time the server worked
    mean_batch: float


def simulate(server: ServerModel, rate_per_s: float, *, requests: int = REQUESTS, seed: int = 0) -> SimResult:
    """Discrete-event simulation of one replica under Poisson arrivals at `rate_per_s` (see the module)."""
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate_per_s!r}")
    rng = np.random.default_rng(seed)
    arrive = np.cumsum(rng.exponential(1e3 / rate_per_s, requests))  # ms
    done = np.empty(requests)
    batches: list[tuple[int, float, float]] = []  # (rows, start, ms)
    t, i = -math.inf, 0
    last_rows, last_ms = 1, 0.0
    while i < requests:
        go = max(t, arrive[i])
        if server.adaptive_hold and last_rows > 1:  # serving.batcher._hold: wait for as many rows again
            want = min(last_rows, server.max_batch)
            enough = arrive[i + want - 1] if i + want - 1 < requests else math.inf
            go = max(go, min(arrive[i] + min(HOLD_SHARE * last_ms, HOLD_MAX_MS), enough))
        m = max(1, int(np.searchsorted(arrive[i : i + server.max_batch], go, side="right")))
        ms = server.batch_ms(m)
        t = go + ms
        done[i : i + m] = t
        batches.append((m, go, ms))
        last_rows, last_ms = m, server.service_ms(m)
        i += m
    warm = requests // 10
    span = arrive[-1] - arrive[warm]
    busy = sum(ms for _, start, ms in batches if start >= arrive[warm])
    return SimResult(
        sojourn_ms=done[warm:] - arrive[warm:],
        busy=min(1.0, busy / span) if span > 0 else 0.0,
        mean_batch=float(np.mean([b for b, _, _ in batches])),
    )


@dataclass
class Load:
    """A replica's predicted state with N edges each classifying `rate` images/s with one configuration."""

    edges: int
    rate: float  # images per second per edge
    offloads_per_s: float
    utilisation: float  # offered offloads / the replica's saturated capacity
    busy: float  # share of time the replica works (simulated)
    mean_batch: float
    offload_mean_ms: float  # one offloaded image, edge to answer, queueing included
    offload_p95_ms: float
    latency_mean_ms: float  # every image (edge answers and offloads)
    latency_p95_ms: float
    stable: bool  # False: the offered load exceeds the replica's capacity; latencies grow without bound

    def latency(self, percentile: str) -> float:
        """The end-to-end latency the target is about."""
        return self.latency_mean_ms if percentile == "mean" else self.latency_p95_ms

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()
        }


def predict_load(
    cand: Candidate, model: CostModel, *, edges: int, rate: float, max_batch: int = 64, seed: int = 0
) -> Load:
    """Utilisation and latencies of one replica serving `edges` edges of configuration `cand`."""
    if isinstance(edges, bool) or not isinstance(edges, int) or edges < 1:
        raise UserError(f"--edges must be an integer >= 1, got {edges!r}")
    if not (rate > 0 and math.isfinite(rate)):
        raise UserError(f"--rate must be a positive number of images per second per edge, got {rate!r}")
    share = 1.0 - cand.edge_share
    offered = edges * rate * share
    server = ServerModel.of(model, cand.k, max_batch)
    capacity = server.capacity_per_s()
    draws = cand.draws.copy()
    off = cand.offloaded
    nan = math.nan
    if offered <= 0:  # nothing offloaded: the cloud idles and every answer is the edge's
        return Load(edges, rate, 0.0, 0.0, 0.0, 0.0, nan, nan, cand.mean_ms, cand.p95_ms, True)
    if offered >= capacity:
        return Load(
            edges, rate, offered, offered / capacity, 1.0, nan, math.inf, math.inf, math.inf, math.inf, False
        )
    sim = simulate(server, offered, seed=seed)
    delay = np.maximum(sim.sojourn_ms - server.unloaded_ms(), 0.0)
    rng = np.random.default_rng(seed + 1)
    draws[off] += delay[rng.integers(0, delay.size, int(off.sum()))]
    mean_delay = float(delay.mean())
    return Load(
        edges=edges,
        rate=rate,
        offloads_per_s=offered,
        utilisation=offered / capacity,
        busy=sim.busy,
        mean_batch=sim.mean_batch,
        offload_mean_ms=cand.offload_ms + mean_delay,
        offload_p95_ms=float(np.percentile(draws[off], 95)) if off.any() else nan,
        latency_mean_ms=cand.mean_ms + share * mean_delay,
        latency_p95_ms=float(np.percentile(draws, 95)),
        stable=True,
    )


def edges_per_replica(
    cand: Candidate,
    model: CostModel,
    *,
    rate: float,
    max_latency_ms: float,
    percentile: str,
    max_batch: int = 64,
) -> int | None:
    """The most edges one replica carries with the latency (mean or p95, every image) within the target;
    None when it is unbounded (the configuration never offloads), 0 when not even one edge fits."""
    if cand.edge_share >= 1.0:
        return None

    def fits(n: int) -> bool:
        load = predict_load(cand, model, edges=n, rate=rate, max_batch=max_batch)
        return load.stable and load.latency(percentile) <= max_latency_ms

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_EDGES and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_EDGES:
        return None
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
