"""Aggregation of per-sample records into per-configuration metrics with 95% confidence intervals.

Proportions (accuracy, early-exit probability, edge accuracy, deadlines met) get Wilson score intervals;
mean MACs a Student-t interval; mean inference time a BCa bootstrap interval (times are skewed: a symmetric
t interval on them can reach below zero, a bootstrap interval of a mean of positive times cannot), with the
p50/p95/p99 percentiles beside it. FLOPs are reported as 2 x MACs (one multiply-add = 2 FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import special  # the quantiles scipy.stats computes with, without its 0.6 s import

from edgeexit.errors import UserError
from edgeexit.policy import STRATEGIES

GROUP_KEYS = ("dataset", "distortion", "level", "strategy", "alpha", "k")
_NEEDED = ("correct", "at_edge", "macs", "outcome")


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise UserError(f"confidence level must be in (0, 1), e.g. 0.95; got {confidence!r}")
    return c


def wilson_interval(successes: Any, n: Any, confidence: float = 0.95) -> tuple[Any, Any]:
    """Wilson score interval (lo, hi) of successes/n, vectorised; NaN where n == 0."""
    c = _check_confidence(confidence)
    s = np.asarray(successes, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    if np.any(s < 0) or np.any(s > m):
        raise ValueError("successes must lie in [0, n]")
    z = special.ndtri(0.5 + 0.5 * c)  # = scipy.stats.norm.ppf
    with np.errstate(divide="ignore", invalid="ignore"):
        p = s / m
        denom = 2.0 * (m + z * z)
        center = (2.0 * m * p + z * z) / denom
        delta = z / denom * np.sqrt(4.0 * m * p * (1.0 - p) + z * z)
        # The bounds are exactly 0 / 1 at the extremes; the formula only reaches them up to rounding.
        lo = np.where(s == 0, 0.0, np.clip(center - delta, 0.0, 1.0))
        hi = np.where(s == m, 1.0, np.clip(center + delta, 0.0, 1.0))
    lo = np.where(m > 0, lo, np.nan)
    hi = np.where(m > 0, hi, np.nan)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _t_half_width(std: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """Half-width t_{(1+c)/2, n-1} * std / sqrt(n); 0 for n == 1, NaN for n == 0."""
    n = np.asarray(n, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = special.stdtrit(np.where(n > 1, n - 1, 1), 0.5 + 0.5 * confidence)  # = scipy.stats.t.ppf
        half = q * std / np.sqrt(n)
    half = np.where(n == 1, 0.0, half)
    return np.where(n > 0, half, np.nan)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean, ignoring NaN values.

    With one value there is no spread estimate and the interval is degenerate: lo = hi = mean.
    With no (non-NaN) values all three are NaN.
    """
    c = _check_confidence(confidence)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = float(_t_half_width(np.array(std), np.array(v.size), c))
    return mean, mean - half, mean + half


BOOTSTRAP_RESAMPLES = 2000
PERCENTILES = (50, 95, 99)


def bootstrap_mean_interval(
    values: Any, confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the non-NaN `values` with its BCa bootstrap interval (scipy.stats.bootstrap).

    Every resampled mean lies between the smallest and the largest value, so for times (>= 0) neither bound is
    negative. One value or all values equal: lo = hi = mean. No values: NaN. Seeded: the same data give the
    same interval.
    """
    c = _check_confidence(confidence)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1 or float(v.min()) == float(v.max()):
        return mean, mean, mean
    from scipy import stats  # 0.6 s to import: only when there are times to summarise

    rng = np.random.default_rng(seed)
    lo = hi = float("nan")
    for method in ("BCa", "percentile"):  # BCa is NaN on degenerate resamples; percentile never is
        with np.errstate(all="ignore"):
            res = stats.bootstrap(
                (v,),
                np.mean,
                confidence_level=c,
                n_resamples=n_resamples,
                method=method,
                random_state=rng,
                vectorized=True,
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            break
    # a resampled mean never leaves [min, max]; BCa's adjusted quantiles stay among them too
    return mean, max(lo, float(v.min())), min(hi, float(v.max()))


def _time_stats(df: pd.DataFrame, keys: list[str], confidence: float) -> pd.DataFrame:
    """Per group of `keys`: mean time's bootstrap interval and the time percentiles, from column `_time`."""
    rows = []
    for key, idx in df.groupby(keys, sort=True, dropna=False, observed=True).indices.items():
        t = df["_time"].to_numpy()[idx]
        t = t[~np.isnan(t)]
        _, lo, hi = bootstrap_mean_interval(t, confidence)
        pct = np.percentile(t, PERCENTILES) if t.size else [np.nan] * len(PERCENTILES)
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row.update({"mean_time_ms_lo": lo, "mean_time_ms_hi": hi})
        row.update({f"time_p{p}_ms": float(x) for p, x in zip(PERCENTILES, pct, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(
    records: pd.DataFrame, by: Sequence[str] = GROUP_KEYS, confidence: float = 0.95
) -> pd.DataFrame:
    """One row per group of `by`: n, accuracy, early-exit probability, edge accuracy, MACs/GFLOPs, time, CIs.

    Columns: n, accuracy(+_lo/_hi, Wilson), early_exit_prob(+_lo/_hi, Wilson; share answered at the edge),
    n_edge, edge_accuracy(+_lo/_hi, Wilson; among edge answers, NaN when none), mean_macs(+_lo/_hi, t),
    mean_gflops(+_lo/_hi; GFLOPs = 2 x MACs / 1e9), offload_failed_share, and, when any record has a
    time, n_timed, mean_time_ms(+_lo/_hi, BCa bootstrap over the records that have one, see
    `bootstrap_mean_interval`) and time_p50_ms, time_p95_ms, time_p99_ms.
    """
    c = _check_confidence(confidence)
    by = list(by)
    missing = [col for col in [*by, *_NEEDED] if col not in records.columns]
    if missing:
        raise UserError(f"records lack columns {missing} needed to summarize by {by}")
    has_time = "time_ms" in records.columns and bool(records["time_ms"].notna().any())

    df = pd.DataFrame({key: records[key] for key in by})
    correct = records["correct"].astype(bool).to_numpy()
    at_edge = records["at_edge"].astype(bool).to_numpy()
    df["_correct"] = correct.astype(np.int64)
    df["_edge"] = at_edge.astype(np.int64)
    df["_edge_correct"] = (correct & at_edge).astype(np.int64)
    df["_macs"] = records["macs"].to_numpy(dtype=np.float64)
    df["_failed"] = (records["outcome"].astype(str) == "offload_failed").to_numpy().astype(np.int64)
    aggs: dict[str, tuple[str, str]] = {
        "n": ("_correct", "size"),
        "_correct": ("_correct", "sum"),
        "_edge": ("_edge", "sum"),
        "_edge_correct": ("_edge_correct", "sum"),
        "mean_macs": ("_macs", "mean"),
        "_macs_std": ("_macs", "std"),
        "_failed": ("_failed", "sum"),
    }
    if has_time:
        df["_time"] = records["time_ms"].to_numpy(dtype=np.float64)
        aggs.update({"n_timed": ("_time", "count"), "mean_time_ms": ("_time", "mean")})

    # by=() means one group of everything: group by a constant key, dropped again below.
    keys = by or ["_all"]
    if not by:
        df["_all"] = 0
    g = df.groupby(keys, sort=True, dropna=False, observed=True).agg(**aggs).reset_index()

    n = g["n"].to_numpy(dtype=np.float64)
    out = g[by].copy()
    out["n"] = g["n"].astype(np.int64)
    out["accuracy"] = g["_correct"] / n
    out["accuracy_lo"], out["accuracy_hi"] = wilson_interval(g["_correct"].to_numpy(), n, c)
    out["early_exit_prob"] = g["_edge"] / n
    out["early_exit_prob_lo"], out["early_exit_prob_hi"] = wilson_interval(g["_edge"].to_numpy(), n, c)
    n_edge = g["_edge"].to_numpy(dtype=np.float64)
    out["n_edge"] = g["_edge"].astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["edge_accuracy"] = np.where(n_edge > 0, g["_edge_correct"].to_numpy() / n_edge, np.nan)
    out["edge_accuracy_lo"], out["edge_accuracy_hi"] = wilson_interval(
        g["_edge_correct"].to_numpy(), n_edge, c
    )
    half = _t_half_width(g["_macs_std"].fillna(0.0).to_numpy(), n, c)
    out["mean_macs"] = g["mean_macs"]
    out["mean_macs_lo"] = g["mean_macs"] - half
    out["mean_macs_hi"] = g["mean_macs"] + half
    for suffix in ("", "_lo", "_hi"):
        out[f"mean_gflops{suffix}"] = 2.0 * out[f"mean_macs{suffix}"] / 1e9
    out["offload_failed_share"] = g["_failed"] / n
    if has_time:
        out["n_timed"] = g["n_timed"].astype(np.int64)
        out["mean_time_ms"] = g["mean_time_ms"]
        stats_t = _time_stats(df, keys, c)  # rows in the same (sorted) group order as g
        for col in stats_t.columns[len(keys) :]:
            out[col] = stats_t[col].to_numpy()
    return out.reset_index(drop=True)


DEFAULT_DEADLINES_MS = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 75.0, 100.0)


def deadline_table(
    records: pd.DataFrame,
    deadlines_ms: Sequence[float] = DEFAULT_DEADLINES_MS,
    by: Sequence[str] = GROUP_KEYS,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Missed-deadline probability: per group of `by` and deadline d, the share of timed answers slower than d.

    Columns: `by`, deadline_ms, n_timed, met (answers within d, time <= d), miss_prob (1 - met / n_timed) and
    its Wilson interval miss_prob_lo/_hi. Records without a time are left out; a group with none is dropped.
    """
    c = _check_confidence(confidence)
    by = list(by)
    if "time_ms" not in records.columns:
        raise UserError(
            "records have no time_ms column: the missed-deadline probability needs online timings"
        )
    timed = records[records["time_ms"].notna()]
    rows = []
    if len(timed):
        for key, group in timed.groupby(by, sort=True, dropna=False, observed=True):
            t = group["time_ms"].to_numpy(dtype=np.float64)
            base = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            for d in deadlines_ms:
                rows.append({**base, "deadline_ms": float(d), "n_timed": t.size, "met": int((t <= d).sum())})
    out = pd.DataFrame(rows, columns=[*by, "deadline_ms", "n_timed", "met"])
    missed = (out["n_timed"] - out["met"]).to_numpy()
    n = out["n_timed"].to_numpy()
    out["miss_prob"] = missed / np.where(n > 0, n, 1)
    lo, hi = wilson_interval(missed, n, c) if len(out) else (np.array([]), np.array([]))
    out["miss_prob_lo"], out["miss_prob_hi"] = lo, hi
    return out


def format_summary(summary: pd.DataFrame) -> str:
    """A compact text table: strategy, alpha, k, level, accuracy [95% CI], early-exit probability, mean MMACs."""
    if summary.empty:
        return "(no results)"
    order = {s: i for i, s in enumerate(STRATEGIES)}
    df = summary.assign(_s=summary["strategy"].map(lambda s: order.get(s, len(order))))
    df = df.sort_values(["distortion", "_s", "strategy", "alpha", "k", "level"], kind="stable")
    header = ("strategy", "alpha", "k", "level", "accuracy [95% CI]", "early exit", "MMACs")
    rows = [
        (
            str(r.strategy),
            f"{r.alpha:.2f}",
            str(r.k),
            f"{r.level:g}",
            f"{r.accuracy:.3f} [{r.accuracy_lo:.3f}, {r.accuracy_hi:.3f}]",
            f"{r.early_exit_prob:.3f}",
            f"{r.mean_macs / 1e6:.2f}",
        )
        for r in df.itertuples(index=False)
    ]
    widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    distortions = ", ".join(sorted(df["distortion"].astype(str).unique()))
    datasets = ", ".join(sorted(df["dataset"].astype(str).unique())) if "dataset" in df else ""
    ns = sorted(df["n"].unique()) if "n" in df else []
    title = f"{datasets} / {distortions}" + (f"  (n = {ns[0]} images per row)" if len(ns) == 1 else "")
    return "\n".join([title, line(header), *(line(r) for r in rows)])
