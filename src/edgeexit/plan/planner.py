"""Choose a deployment (strategy, alpha, k, wire precision) for a latency target from the offline records.

Every configuration the sweep recorded at one distortion level is a candidate, crossed with each wire
precision. Its accuracy and edge share come from the records (per image: where it stopped, right or wrong);
its latency from the cost model (`plan.costmodel`): an image answered at edge exit e costs decoding, stages
and heads 1..e, the policy's decisions and the runner; an offloaded one costs the edge's k stages, the
encoder, the loopback HTTP round trip (client, server, cloud forward), the link's RTT and its bytes over the
link's bandwidth each way. Per-image latencies are drawn from the measured samples of the noisy components
(decode, stages, round trips), so the p95 is that of a distribution, not of a handful of medians; the mean is
the sum of component means. Accuracy under fp16/int8 is taken from the (fp32) records: the wire precisions
change the cloud's input by at most half a quantisation step, and the records cannot say more.

The choice: the most accurate candidate whose latency (mean or p95) meets the target and whose accuracy
meets the minimum; ties go to the lower latency. The Pareto front is accuracy against that latency.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeexit.errors import UserError
from edgeexit.plan.costmodel import (
    ANSWER_BODY_BYTES,
    HTTP_ANSWER_HEAD_BYTES,
    HTTP_REQUEST_HEAD_BYTES,
    CostModel,
    kept,
)
from edgeexit.rundir import RunDir

__all__ = [
    "Candidate",
    "Link",
    "PERCENTILES",
    "candidates",
    "choose",
    "level_records",
    "link_from_config",
    "link_from_run",
    "pareto_front",
    "predict",
]

PERCENTILES = ("mean", "p95")
DRAWS = 20_000  # per-image latency draws per candidate (the p95 of 20,000 draws moves by well under 1%)
_RECORD_COLUMNS = ["distortion", "level", "strategy", "alpha", "k", "sample_id", "exit", "at_edge", "correct"]


@dataclass(frozen=True)
class Link:
    """The edge-cloud link as the planner counts it: network RTT (without HTTP) and rates each way."""

    rtt_ms: float
    up_mbit: float
    down_mbit: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"link RTT {self.rtt_ms!r} ms; expected a finite number >= 0 (--rtt-ms)")
        for name, v in (("up", self.up_mbit), ("down", self.down_mbit)):
            if not (math.isfinite(v) and v > 0):
                raise UserError(
                    f"link bandwidth {name} {v!r} Mbit/s; expected a finite number > 0 (--bandwidth-mbit)"
                )

    def transfer_ms(self, up_bytes: float, down_bytes: float) -> float:
        """Milliseconds the link takes to carry `up_bytes` to the cloud and `down_bytes` back."""
        return 8e-3 * (up_bytes / self.up_mbit + down_bytes / self.down_mbit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "rtt_ms": self.rtt_ms,
            "up_mbit": self.up_mbit,
            "down_mbit": self.down_mbit,
            "source": self.source,
        }


def link_from_run(run_dir: Path, model: CostModel) -> Link:
    """The link a run measured (RUN_DIR/link.json, `probe_link` before its online run): RTT median less the
    HTTP ping's own time on loopback (which the loopback round trips already count), rates as medians."""
    path = Path(run_dir) / "link.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: --link-from needs a run whose online stage measured its link "
            "(`edgeexit reproduce`), or give --rtt-ms and --bandwidth-mbit"
        )
    try:
        m = json.loads(path.read_text())["measured"]
        rtt = float(m.get("rtt_ms_median", m["rtt_ms_mean"]))
        up = float(m.get("up_mbit_median", m["up_mbit_mean"]))
        down = float(m.get("down_mbit_median", m["down_mbit_mean"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} is not a link measurement written by edgeexit; give --rtt-ms and --bandwidth-mbit"
        ) from None
    up, down = (v if math.isfinite(v) else float(m["up_mbit_mean"]) for v in (up, down))
    return Link(
        max(0.0, rtt - model.ping_ms), up, down, f"measured ({path}), less {model.ping_ms:.2f} ms of HTTP"
    )


def link_from_config(run_dir: Path) -> Link:
    """The link of the run's config ([link] rtt_ms, bandwidth_mbit: the one its online run emulates)."""
    cfg = RunDir(Path(run_dir)).load_config()
    bw = float(cfg.link.bandwidth_mbit)
    return Link(float(cfg.link.rtt_ms), bw, bw, "configured ([link] of the run's config)")


@dataclass
class Candidate:
    """One deployable configuration and what it is predicted to give at one distortion level."""

    strategy: str
    alpha: float | None  # None: the conventional DNN (no threshold)
    k: int  # 0: the conventional DNN
    precision: str | None  # None: the conventional DNN sends the image
    n: int
    accuracy: float
    edge_share: float  # answered at the edge
    mean_ms: float
    p95_ms: float
    offload_ms: float  # mean latency of one offloaded image (NaN when none is offloaded)
    # per-image latency draws and which of them are offloads (the capacity model adds queueing to those)
    draws: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    offloaded: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    def latency(self, percentile: str) -> float:
        """The predicted latency the target is about: mean or p95."""
        return self.mean_ms if percentile == "mean" else self.p95_ms

    def name(self) -> str:
        """e.g. 'ee α=0.8 k=3 fp32', 'conventional (cloud)'."""
        if self.k == 0:
            return f"{self.strategy} (cloud)"
        return f"{self.strategy} α={self.alpha:g} k={self.k} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no draws)."""
        return {
            "strategy": self.strategy,
            "alpha": self.alpha,
            "k": self.k,
            "precision": self.precision,
            "images": self.n,
            "accuracy": self.accuracy,
            "edge_share": self.edge_share,
            "latency_mean_ms": self.mean_ms,
            "latency_p95_ms": self.p95_ms,
            "offload_ms": None if math.isnan(self.offload_ms) else self.offload_ms,
        }


def load_records(run_dir: Path) -> pd.DataFrame:
    """RUN_DIR/records.parquet (the offline sweep), the columns the planner reads; a UserError naming the fix
    when it is missing."""
    run = RunDir(Path(run_dir))
    if not run.config.is_file() or not (run.ee / "spec.json").is_file():
        raise UserError(
            f"{run.root} is not a run directory (no config.json or ee/spec.json); expected a trained run"
        )
    if not run.records.is_file():
        raise UserError(
            f"{run.root} has no offline records (records.parquet): run `edgeexit evaluate {run.root}` first"
        )
    try:
        return pd.read_parquet(run.records, columns=_RECORD_COLUMNS)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise UserError(
            f"cannot read {run.records} ({type(exc).__name__}); rerun `edgeexit evaluate {run.root}`"
        ) from None


def level_records(records: pd.DataFrame, distortion: str, level: float) -> pd.DataFrame:
    """The records of one distortion level; a UserError listing what the sweep has otherwise."""
    have = sorted(set(records["distortion"]))
    if distortion not in have:
        raise UserError(f"no offline records for distortion {distortion!r}; the sweep has {', '.join(have)}")
    of = records[records["distortion"] == distortion]
    levels = sorted(set(float(v) for v in of["level"]))
    near = [lv for lv in levels if abs(lv - level) <= 1e-9 * max(1.0, abs(level))]
    if not near:
        raise UserError(
            f"no offline records at {distortion} level {level:g}; the sweep has levels "
            f"{', '.join(f'{v:g}' for v in levels)} (or run `edgeexit evaluate RUN_DIR --levels {level:g}`)"
        )
    return of[of["level"] == near[0]]


def _draw(rng: np.random.Generator, parts: list[np.ndarray], m: int) -> np.ndarray:
    """`m` draws of the sum of independent components, each drawn from its measured samples."""
    total = np.zeros(m)
    for s in parts:
        total += s[rng.integers(0, s.size, m)]
    return total


def predict(
    frame: pd.DataFrame,
    model: CostModel,
    link: Link,
    *,
    strategy: str,
    alpha: float | None,
    k: int,
    precision: str | None,
    distortion: str,
    level: float,
    seed: int = 0,
) -> Candidate:
    """The candidate of one configuration from its records `frame` (one row per image)."""
    n = len(frame)
    exits = frame["exit"].to_numpy()
    rng = np.random.default_rng(seed)
    per_image = max(1, math.ceil(DRAWS / max(n, 1)))
    answer_down = HTTP_ANSWER_HEAD_BYTES + ANSWER_BODY_BYTES
    groups: list[
        tuple[int, float, list[np.ndarray], float]
    ] = []  # (count, constant ms, sampled parts, offload?)
    if k == 0:  # the conventional DNN: the PNG to the cloud and back; the edge computes nothing
        up = model.png_bytes_at(distortion, level) + HTTP_REQUEST_HEAD_BYTES
        const = model.runner_ms + link.rtt_ms + link.transfer_ms(up, answer_down)
        groups.append((n, const, [kept(model.classify_ms)], 1.0))
    else:
        assert precision is not None
        decide = model.decide_ms.get(strategy)
        if decide is None:
            raise UserError(
                f"the cost model has no decision time for strategy {strategy!r}; refit it with --refit"
            )
        decode = kept(model.decode_ms)
        stages = [kept(s) for s in model.stage_ms]
        for e in range(1, k + 1):
            count = int((exits == e).sum())
            if count:
                groups.append((count, model.runner_ms + sum(decide[k - 1][:e]), [decode, *stages[:e]], 0.0))
        count = int((exits == 0).sum())
        if count:
            up = model.payload_bytes[precision][k - 1] + HTTP_REQUEST_HEAD_BYTES
            const = (
                model.runner_ms
                + sum(decide[k - 1])
                + model.encode_ms[precision][k - 1]
                + link.rtt_ms
                + link.transfer_ms(up, answer_down)
            )
            parts = [decode, *stages[:k], kept(model.loopback_ms[precision][k - 1])]
            groups.append((count, const, parts, 1.0))
    draws, offloaded, mean, offload_mean = [], [], 0.0, math.nan
    for count, const, parts, off in groups:
        group_mean = const + sum(float(p.mean()) for p in parts)
        mean += count * group_mean
        if off:
            offload_mean = group_mean
        d = const + _draw(rng, parts, count * per_image)
        draws.append(d)
        offloaded.append(np.full(d.size, bool(off)))
    all_draws = np.concatenate(draws) if draws else np.zeros(0)
    return Candidate(
        strategy=strategy,
        alpha=alpha,
        k=k,
        precision=precision,
        n=n,
        accuracy=float(frame["correct"].mean()) if n else math.nan,
        edge_share=float(frame["at_edge"].mean()) if n else math.nan,
        mean_ms=mean / n if n else math.nan,
        p95_ms=float(np.percentile(all_draws, 95)) if all_draws.size else math.nan,
        offload_ms=offload_mean,
        draws=all_draws,
        offloaded=np.concatenate(offloaded) if offloaded else np.zeros(0, dtype=bool),
    )


def candidates(
    records: pd.DataFrame,
    model: CostModel,
    link: Link,
    *,
    distortion: str,
    level: float,
    strategies: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    sample_ids: Sequence[int] | None = None,
) -> list[Candidate]:
    """Every (strategy, alpha, k) the records hold at one level, crossed with each wire precision (the
    conventional DNN once), each predicted; `sample_ids` keeps only those images."""
    from edgeexit.policy import CONVENTIONAL
    from edgeexit.serving.wire import PRECISIONS

    frame = level_records(records, distortion, level)
    if sample_ids is not None:
        frame = frame[frame["sample_id"].isin(list(sample_ids))]
    if strategies is not None:
        frame = frame[frame["strategy"].isin(list(strategies))]
    out: list[Candidate] = []
    conventional_done = False
    for (strategy, alpha, k), rows in frame.groupby(["strategy", "alpha", "k"], sort=True):
        rows = rows.drop_duplicates("sample_id")
        if strategy == CONVENTIONAL:
            if conventional_done or not model.classify_ms:  # its rows repeat for every (alpha, k) of the grid
                continue
            conventional_done = True
            out.append(
                predict(
                    rows,
                    model,
                    link,
                    strategy=strategy,
                    alpha=None,
                    k=0,
                    precision=None,
                    distortion=distortion,
                    level=level,
                )
            )
            continue
        for precision in precisions or PRECISIONS:
            out.append(
                predict(
                    rows,
                    model,
                    link,
                    strategy=str(strategy),
                    alpha=float(alpha),
                    k=int(k),
                    precision=precision,
                    distortion=distortion,
                    level=level,
                )
            )
    return out


def pareto_front(cands: Sequence[Candidate], percentile: str) -> list[Candidate]:
    """The candidates no other beats on both accuracy (higher) and latency (lower), fastest first."""
    order = sorted(cands, key=lambda c: (c.latency(percentile), -c.accuracy))
    front: list[Candidate] = []
    best = -math.inf
    for c in order:
        if c.accuracy > best:
            front.append(c)
            best = c.accuracy
    return front


@dataclass
class Choice:
    """The planner's answer: the chosen candidate, or None with the nearest miss and by how much."""

    chosen: Candidate | None
    nearest_miss: Candidate | None
    miss: str  # what the nearest miss lacks, in words ("" when a candidate was chosen)


def choose(
    cands: Sequence[Candidate], *, max_latency_ms: float, percentile: str, min_accuracy: float = 0.0
) -> Choice:
    """The most accurate candidate meeting both targets (ties: lower latency), or the nearest miss.

    A target below every candidate's latency is a UserError (no configuration can ever answer that fast).
    """
    if not cands:
        raise UserError("no configuration to plan from: the records hold none for these constraints")
    fastest = min(cands, key=lambda c: c.latency(percentile))
    if max_latency_ms < fastest.latency(percentile):
        raise UserError(
            f"--max-latency-ms {max_latency_ms:g} is below the fastest possible answer: {percentile} "
            f"{fastest.latency(percentile):.2f} ms ({fastest.name()}); set at least that, or a faster link"
        )
    fast = [c for c in cands if c.latency(percentile) <= max_latency_ms]
    ok = [c for c in fast if c.accuracy >= min_accuracy]
    if ok:
        return Choice(max(ok, key=lambda c: (c.accuracy, -c.latency(percentile))), None, "")
    accurate = [c for c in cands if c.accuracy >= min_accuracy]
    if accurate:  # accurate enough but too slow: the fastest of those
        near = min(accurate, key=lambda c: (c.latency(percentile), -c.accuracy))
        miss = (
            f"{percentile} latency {near.latency(percentile):.2f} ms, "
            f"{near.latency(percentile) - max_latency_ms:.2f} ms over the target"
        )
        return Choice(None, near, miss)
    near = max(fast, key=lambda c: (c.accuracy, -c.latency(percentile)))
    miss = f"accuracy {100 * near.accuracy:.1f}%, {100 * (min_accuracy - near.accuracy):.1f} points under the target"
    return Choice(None, near, miss)
