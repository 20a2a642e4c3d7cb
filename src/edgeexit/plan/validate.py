"""The planner checked against a run's online measurements (the `plan` stage of `edgeexit reproduce`).

For every configuration the online run timed (each strategy, alpha and level, at online_k and the wire
precision of the run), the planner predicts the mean and p95 latency of the same images (their offline
records say where each one stops: online and offline decisions are the same, tested) over the link the
online run measured, and the measured times say how far off it is. The targets of issue 13: mean within
15%, p95 within 25%. Also drawn: the Pareto front of accuracy against predicted latency at three levels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from edgeexit.atomic import atomic_write_with
from edgeexit.config import RunConfig
from edgeexit.plan.costmodel import CostModel, cost_model
from edgeexit.plan.planner import (
    Candidate,
    Link,
    candidates,
    choose,
    link_from_config,
    link_from_run,
    load_records,
    pareto_front,
    predict,
)
from edgeexit.rundir import RunDir

__all__ = [
    "MEAN_TARGET",
    "P95_TARGET",
    "VALIDATION_CSV",
    "pareto_figure",
    "report_table",
    "validate_plan",
    "validation_figure",
    "validation_summary",
]

log = logging.getLogger(__name__)

MEAN_TARGET = 0.15
P95_TARGET = 0.25
VALIDATION_CSV = "validation.csv"


def _online_records(run: RunDir) -> pd.DataFrame:
    from edgeexit.evaluate.records import read_records

    paths = sorted(run.online.glob("*.parquet"))
    if not paths:
        return pd.DataFrame()
    return pd.concat([read_records(p) for p in paths], ignore_index=True)


def _link(run: RunDir, model: CostModel) -> Link:
    return (
        link_from_run(run.root, model) if (run.root / "link.json").is_file() else link_from_config(run.root)
    )


def validate_plan(run_dir: Path, cfg: RunConfig, *, threads: int = 1, refit: bool = True) -> pd.DataFrame:
    """Predicted against measured latency for every configuration of the online run; written to
    RUN_DIR/plan/validation.csv with the figures in RUN_DIR/figures (plan_pareto.png, plan_validation.png).

    `refit` (the default): measure the cost model now, right after the online run, on the same machine in
    the same state, rather than reuse a cached one."""
    from edgeexit.policy import CONVENTIONAL

    run = RunDir(Path(run_dir))
    model = cost_model(run.root, cfg.runtime.backend, threads, refit=refit)
    link = _link(run, model)
    records = load_records(run.root)
    online = _online_records(run)
    exp = cfg.experiment
    rows = []
    keys = ["level", "strategy", "alpha", "k"]
    for (level, strategy, alpha, k), got in online.groupby(keys, dropna=False) if len(online) else []:
        off = records[(records["distortion"] == exp.distortion) & (records["level"] == level)]
        off = off[off["strategy"] == strategy]
        if strategy == CONVENTIONAL:  # one set of cloud-only rows, repeated for every (alpha, k) offline
            first = off.iloc[0] if len(off) else None
            if first is not None:
                off = off[(off["alpha"] == first["alpha"]) & (off["k"] == first["k"])]
        else:
            off = off[(off["alpha"] == alpha) & (off["k"] == k)]
        off = off[off["sample_id"].isin(got["sample_id"])].drop_duplicates("sample_id")
        if len(off) != len(got):
            log.warning(
                "plan validation: %s at level %g has %d offline records for %d online images",
                strategy,
                level,
                len(off),
                len(got),
            )
            continue
        cand = predict(
            off,
            model,
            link,
            strategy=str(strategy),
            alpha=None if strategy == CONVENTIONAL else float(alpha),
            k=0 if strategy == CONVENTIONAL else int(k),
            precision=None if strategy == CONVENTIONAL else exp.precision,
            distortion=exp.distortion,
            level=float(level),
        )
        t = got["time_ms"].to_numpy(dtype=float)
        mean, p95 = float(t.mean()), float(np.percentile(t, 95))
        rows.append(
            {
                "level": float(level),
                "strategy": strategy,
                "alpha": alpha,
                "k": int(k),
                "precision": cand.precision or "png",
                "images": len(got),
                "edge_share": cand.edge_share,
                "predicted_mean_ms": cand.mean_ms,
                "measured_mean_ms": mean,
                "mean_error": cand.mean_ms / mean - 1,
                "predicted_p95_ms": cand.p95_ms,
                "measured_p95_ms": p95,
                "p95_error": cand.p95_ms / p95 - 1,
            }
        )
    table = pd.DataFrame(rows)
    out = run.root / "plan" / VALIDATION_CSV
    atomic_write_with(out, lambda tmp: table.to_csv(tmp, index=False))
    levels = sorted(set(float(v) for v in records.loc[records["distortion"] == exp.distortion, "level"]))
    if levels:
        pareto_figure(records, model, link, exp.distortion, levels, run.figures / "plan_pareto.png")
    if len(table):
        validation_figure(table, run.figures / "plan_validation.png")
    return table


def validation_summary(table: pd.DataFrame) -> str:
    """One paragraph: how many configurations meet the targets, the median and worst errors."""
    if not len(table):
        return "No online measurements to compare the planner's predictions with."
    n = len(table)
    mean_ok = int((table["mean_error"].abs() <= MEAN_TARGET).sum())
    p95_ok = int((table["p95_error"].abs() <= P95_TARGET).sum())
    worst_mean = table.loc[table["mean_error"].abs().idxmax()]
    worst_p95 = table.loc[table["p95_error"].abs().idxmax()]

    def where(r: pd.Series) -> str:
        a = "" if pd.isna(r["alpha"]) else f" α = {r['alpha']:g}"
        return f"{r['strategy']}{a} at σ = {r['level']:g}"

    verdict = "met" if mean_ok == n and p95_ok == n else "NOT met everywhere"
    return (
        f"The planner's predictions for the {n} configurations the online run timed (strategy, α and level; "
        f"the same images, over the link the online run measured): the mean latency is within "
        f"{100 * MEAN_TARGET:.0f}% of the measured mean for {mean_ok} of {n} (median |error| "
        f"{100 * table['mean_error'].abs().median():.1f}%, worst {100 * worst_mean['mean_error']:+.1f}% for "
        f"{where(worst_mean)}), the p95 within {100 * P95_TARGET:.0f}% for {p95_ok} of {n} (median |error| "
        f"{100 * table['p95_error'].abs().median():.1f}%, worst {100 * worst_p95['p95_error']:+.1f}% for "
        f"{where(worst_p95)}). Target of issue 13 (mean within 15%, p95 within 25%): {verdict}."
    )


def report_table(table: pd.DataFrame, max_levels: int = 3) -> pd.DataFrame:
    """Predicted against measured at the lightest, a middle and the heaviest level, for the report."""
    if not len(table):
        return table
    levels = sorted(table["level"].unique())
    if len(levels) > max_levels:
        mid = min(levels, key=lambda v: abs(v - 1.0))
        levels = sorted({levels[0], mid, levels[-1]})
    t = table[table["level"].isin(levels)].sort_values(["level", "strategy", "alpha"])
    return pd.DataFrame(
        {
            "σ": t["level"].map(lambda v: f"{v:g}"),
            "strategy": t["strategy"],
            "α": t["alpha"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
            "at edge (%)": (100 * t["edge_share"]).map(lambda v: f"{v:.1f}"),
            "mean ms, predicted / measured": [
                f"{p:.2f} / {m:.2f} ({100 * e:+.0f}%)"
                for p, m, e in zip(
                    t["predicted_mean_ms"], t["measured_mean_ms"], t["mean_error"], strict=True
                )
            ],
            "p95 ms, predicted / measured": [
                f"{p:.2f} / {m:.2f} ({100 * e:+.0f}%)"
                for p, m, e in zip(t["predicted_p95_ms"], t["measured_p95_ms"], t["p95_error"], strict=True)
            ],
        }
    )


def _panel_levels(levels: list[float], most: int = 3) -> list[float]:
    if len(levels) <= most:
        return levels
    mid = min(levels, key=lambda v: abs(v - 1.0))
    return sorted({levels[0], mid, levels[-1]})


def pareto_figure(
    records: pd.DataFrame, model: CostModel, link: Link, distortion: str, levels: list[float], path: Path
) -> Path:
    """Accuracy against predicted mean latency of every configuration at up to three levels; the Pareto
    front as a step line; the plan's choice for a target of half the cloud-only DNN's mean latency marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    from edgeexit.experiment.figures import STYLE, _save

    shown = _panel_levels(levels)
    fig, axes = plt.subplots(
        1, len(shown), figsize=(4.8 * len(shown), 4.2), squeeze=False, layout="constrained"
    )
    for ax, level in zip(axes[0], shown, strict=True):
        cands = candidates(records, model, link, distortion=distortion, level=level)
        for strategy in sorted({c.strategy for c in cands}):
            cs = [c for c in cands if c.strategy == strategy]
            style = STYLE.get(strategy, {})
            ax.scatter(
                [c.mean_ms for c in cs],
                [100 * c.accuracy for c in cs],
                s=22,
                color=style.get("color"),
                marker=style.get("marker", "o"),
                label=style.get("label", strategy),
                alpha=0.8,
                zorder=3,
            )
        front = pareto_front(cands, "mean")
        ax.step(
            [c.mean_ms for c in front],
            [100 * c.accuracy for c in front],
            where="post",
            color="black",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
        cloud = [c for c in cands if c.k == 0]
        if cloud:
            slo = 0.5 * cloud[0].mean_ms
            ax.axvline(slo, color="grey", ls=":", lw=1)
            try:
                chosen = choose(cands, max_latency_ms=slo, percentile="mean").chosen
            except Exception:  # the target is below the fastest answer: nothing to mark
                chosen = None
            if chosen is not None:
                ax.scatter(
                    [chosen.mean_ms],
                    [100 * chosen.accuracy],
                    s=160,
                    marker="*",
                    color="gold",
                    edgecolor="black",
                    zorder=4,
                    label=f"plan for mean ≤ {slo:.1f} ms",
                )
                ax.annotate(
                    _short(chosen),
                    (chosen.mean_ms, 100 * chosen.accuracy),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=7,
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{distortion} {level:g}", fontsize=10)
        ax.set_xlabel("predicted mean latency (ms, log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False, fontsize=8)
    fig.suptitle(
        f"Accuracy against predicted latency (link RTT {link.rtt_ms:.1f} ms, {link.up_mbit:.0f} Mbit/s)"
    )
    return _save(fig, path)


def _short(c: Candidate) -> str:
    return "cloud only" if c.k == 0 else f"{c.strategy} α={c.alpha:g} k={c.k} {c.precision}"


def validation_figure(table: pd.DataFrame, path: Path) -> Path:
    """Predicted against measured mean and p95 latency, one point per configuration and level, with the
    targets' bands around the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeexit.experiment.figures import STYLE, _save

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4), layout="constrained")
    for ax, what, band in ((axes[0], "mean", MEAN_TARGET), (axes[1], "p95", P95_TARGET)):
        lo = max(
            1e-3, 0.8 * float(min(table[f"predicted_{what}_ms"].min(), table[f"measured_{what}_ms"].min()))
        )
        hi = 1.25 * float(max(table[f"predicted_{what}_ms"].max(), table[f"measured_{what}_ms"].max()))
        x = np.geomspace(lo, hi, 50)
        ax.plot(x, x, color="black", lw=1)
        ax.fill_between(
            x, x * (1 - band), x * (1 + band), color="grey", alpha=0.2, label=f"±{100 * band:.0f}%"
        )
        for strategy, g in table.groupby("strategy"):
            style = STYLE.get(str(strategy), {})
            ax.scatter(
                g[f"measured_{what}_ms"],
                g[f"predicted_{what}_ms"],
                s=20,
                color=style.get("color"),
                marker=style.get("marker", "o"),
                label=style.get("label", strategy),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"measured {what} latency (ms)")
        ax.set_ylabel(f"predicted {what} latency (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{what}: target ±{100 * band:.0f}%", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False, fontsize=8)
    fig.suptitle("The planner's latency against the online run's, per configuration and level")
    return _save(fig, path)
