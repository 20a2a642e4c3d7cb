"""Figures 3-7 of the paper (and the robustness analysis) from summary tables, as PNG files.

Every line has its own colour, marker and line style; lines that often coincide (the weighted and the mean
ensemble) are drawn wide and light underneath, narrow on top, so an overlap stays visible. FLOPs are shown in
MFLOPs or GFLOPs as the scale suits. Layouts are constrained, so no label is clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = [
    "STYLE",
    "metric_vs_level",
    "per_exit_accuracy_figure",
    "confidently_wrong_figure",
    "deadline_figure",
    "paper_figures",
    "flops_unit",
]

# drawn in this order (zorder): wide light lines first, so the narrow ones on top never hide them
STYLE = {
    "ensemble-mean": {
        "label": "Branch ensemble (mean)",
        "color": "tab:green",
        "marker": "^",
        "linestyle": "--",
        "linewidth": 4.0,
        "alpha": 0.45,
        "markersize": 8,
        "zorder": 2,
    },
    "ensemble-unnormalised": {
        "label": "Branch ensemble (paper's Eq. 1, unnormalised)",
        "color": "tab:brown",
        "marker": "D",
        "linestyle": "-.",
        "linewidth": 2.5,
        "markersize": 5,
        "zorder": 3,
    },
    "entropy": {
        "label": "Entropy (BranchyNet)",
        "color": "tab:purple",
        "marker": "v",
        "linestyle": ":",
        "linewidth": 2.0,
        "markersize": 5,
        "zorder": 4,
    },
    "conventional": {
        "label": "Conventional DNN (cloud)",
        "color": "tab:red",
        "marker": "x",
        "linestyle": "-",
        "linewidth": 1.8,
        "markersize": 7,
        "zorder": 5,
    },
    "ensemble": {
        "label": "Branch ensemble (weighted)",
        "color": "tab:orange",
        "marker": "s",
        "linestyle": "-",
        "linewidth": 1.4,
        "markersize": 4,
        "zorder": 6,
    },
    "ee": {
        "label": "EE-DNN",
        "color": "tab:blue",
        "marker": "o",
        "linestyle": "-",
        "linewidth": 1.4,
        "markersize": 4,
        "zorder": 7,
    },
}

LEVEL_LABELS = {
    "gaussian_blur": "Gaussian blur σ (pixels)",
    "gaussian_noise": "Gaussian noise σ (0-255 scale)",
    "jpeg": "JPEG quality",
}


def flops_unit(max_flops: float) -> tuple[str, float]:
    """('MFLOPs', 1e-6) or ('GFLOPs', 1e-9) for values up to `max_flops` FLOPs."""
    return ("GFLOPs", 1e-9) if max_flops >= 1e9 else ("MFLOPs", 1e-6)


def _rows(summary: pd.DataFrame, strategy: str, alpha: float, k: int) -> pd.DataFrame:
    s = summary[summary["strategy"] == strategy]
    if strategy == "conventional":  # the same cloud-only rows serve every alpha and k
        return s.drop_duplicates("level").sort_values("level")
    return s[(s["alpha"] == alpha) & (s["k"] == k)].sort_values("level")


def _ordered(strategies: Sequence[str]) -> list[str]:
    return sorted(strategies, key=lambda s: STYLE.get(s, {}).get("zorder", 10))


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_level(
    summary: pd.DataFrame,
    metric: str,
    ylabel: str,
    title: str,
    path: Path,
    *,
    strategies: Sequence[str],
    alphas: Sequence[float],
    ks: Sequence[int],
    scale: float = 1.0,
    band: bool = True,
) -> Path:
    """One panel per (k, alpha): `metric` (with its _lo/_hi band) against the distortion level per strategy."""
    distortion = str(summary["distortion"].iloc[0]) if len(summary) else "gaussian_blur"
    fig, axes = plt.subplots(
        len(ks),
        len(alphas),
        figsize=(4.8 * len(alphas), 3.3 * len(ks) + 0.9),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for r, k in enumerate(ks):
        for c, alpha in enumerate(alphas):
            ax = axes[r][c]
            for strategy in _ordered(strategies):
                rows = _rows(summary, strategy, alpha, k)
                if rows.empty or metric not in rows or rows[metric].isna().all():
                    continue
                style = dict(STYLE.get(strategy, {"label": strategy}))
                label = style.pop("label")
                x, y = rows["level"], rows[metric] * scale
                ax.plot(x, y, label=label, **style)
                if band and f"{metric}_lo" in rows:
                    ax.fill_between(
                        x,
                        rows[f"{metric}_lo"] * scale,
                        rows[f"{metric}_hi"] * scale,
                        color=style.get("color"),
                        alpha=0.12,
                        zorder=1,
                    )
            ax.set_title(f"α = {alpha:g}, k = {k} edge branches", fontsize=10)
            ax.set_xlabel(LEVEL_LABELS.get(distortion, "distortion level"))
            if c == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(len(labels), 1)), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def per_exit_accuracy_figure(
    table: pd.DataFrame,
    path: Path,
    title: str = "Accuracy of each exit alone",
    distortion: str = "gaussian_blur",
) -> Path:
    """Accuracy of every exit alone (argmax, no early exit) and the oracle against the level, one panel per
    model group (the EE-DNN with the conventional DNN; the blur-trained EE-DNN when present)."""
    groups = [m for m in table["model"].unique() if m != "Conventional DNN"]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.6 * len(groups), 4.4), squeeze=False, sharey=True, layout="constrained"
    )
    exit_styles = {
        "branch 1": ("tab:cyan", "v", ":"),
        "branch 2": ("tab:blue", "^", "-."),
        "branch 3": ("tab:purple", "<", "--"),
        "final exit": ("navy", "o", "-"),
        "oracle": ("black", "*", ":"),
    }
    conv = table[table["model"] == "Conventional DNN"].sort_values("level")
    for ax, model in zip(axes[0], groups, strict=True):
        rows = table[table["model"] == model]
        for name, g in rows.groupby("exit", sort=False):
            g = g.sort_values("level")
            color, marker, ls = exit_styles.get(str(name), ("gray", "o", "-"))
            ax.plot(
                g["level"],
                g["accuracy"] * 100,
                color=color,
                marker=marker,
                linestyle=ls,
                markersize=5,
                label=f"{name}",
            )
        if len(conv):
            ax.plot(
                conv["level"],
                conv["accuracy"] * 100,
                color="tab:red",
                marker="x",
                linewidth=2.2,
                markersize=7,
                label="Conventional DNN",
                zorder=1,
            )
        ax.set_title(model, fontsize=10)
        ax.set_xlabel(LEVEL_LABELS.get(distortion, "distortion level"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("Top-1 accuracy (%)")
    fig.suptitle(title)
    return _save(fig, path)


def confidently_wrong_figure(
    table: pd.DataFrame, path: Path, title: str, distortion: str = "gaussian_blur"
) -> Path:
    """Share of images each EE exit answers confidently (top probability >= alpha) and wrongly, per alpha."""
    table = table[table["model"] == "EE-DNN"]
    alphas = sorted(table["alpha"].unique())
    fig, axes = plt.subplots(
        1,
        max(len(alphas), 1),
        figsize=(4.8 * max(len(alphas), 1), 3.8),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    markers = ["v", "^", "<", "o", "s", "D"]
    styles = [":", "-.", "--", "-"]
    for ax, alpha in zip(axes[0], alphas, strict=False):
        rows = table[table["alpha"] == alpha]
        for j, (name, g) in enumerate(rows.groupby("exit", sort=False)):
            g = g.sort_values("level")
            ax.plot(
                g["level"],
                g["confidently_wrong"] * 100,
                marker=markers[j % 6],
                linestyle=styles[j % 4],
                markersize=5,
                label=str(name),
            )
        ax.set_title(f"α = {alpha:g}", fontsize=10)
        ax.set_xlabel(LEVEL_LABELS.get(distortion, "distortion level"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("confidently wrong (% of images)")
    fig.suptitle(title)
    return _save(fig, path)


def deadline_figure(deadlines: pd.DataFrame, path: Path, title: str, k: int, max_panels: int = 3) -> Path:
    """Fig. 7: missed-deadline probability against the deadline, one panel per (chosen) level; a line per
    strategy and alpha (marker: strategy, line style: alpha)."""
    levels = sorted(deadlines["level"].unique())
    if len(levels) > max_panels:
        mid = min(levels, key=lambda v: abs(v - 1.0))
        levels = sorted({levels[0], mid, levels[-1]})
    alphas = sorted(a for a in deadlines["alpha"].dropna().unique())
    alpha_styles = {a: s for a, s in zip(alphas, ["-", "--", ":", "-."], strict=False)}
    fig, axes = plt.subplots(
        1, len(levels), figsize=(4.6 * len(levels), 4.0), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, level in zip(axes[0], levels, strict=True):
        d = deadlines[deadlines["level"] == level]
        for strategy in _ordered(list(d["strategy"].unique())):
            style = dict(STYLE.get(strategy, {"label": strategy}))
            label = style.pop("label")
            style.pop("linestyle", None)
            rows = d[d["strategy"] == strategy]
            for alpha, g in rows.groupby(rows["alpha"].fillna(-1.0), sort=True):
                if strategy != "conventional" and "k" in g and (g["k"] != k).all():
                    continue
                g = g.sort_values("deadline_ms")
                ls = "-" if alpha < 0 else alpha_styles.get(alpha, "-")
                name = label if alpha < 0 else f"{label}, α = {alpha:g}"
                ax.plot(g["deadline_ms"], g["miss_prob"] * 100, linestyle=ls, label=name, **style)
        ax.set_title(f"σ = {level:g}", fontsize=10)
        ax.set_xlabel("deadline (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("missed-deadline probability (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def paper_figures(
    offline: pd.DataFrame,
    online: pd.DataFrame | None,
    out: Path,
    *,
    alphas: Sequence[float],
    k: int,
    setting: str = "",
) -> dict[str, tuple[Path, str]]:
    """Figures 3-6 (and time tails): name -> (path, caption). `setting` (dataset, model, n) joins each caption."""
    main = ["ee", "ensemble", "conventional"]
    with_eq1 = [*main, "ensemble-unnormalised"]
    acc_ks = [kk for kk in (2, 3) if kk in set(offline["k"])] or [k]
    strategies_acc = [s for s in [*with_eq1, "ensemble-mean", "entropy"] if s in set(offline["strategy"])]
    unit, scale = flops_unit(float(2 * offline["mean_macs"].max()) if len(offline) else 0.0)
    tail = f" {setting}" if setting else ""
    figs = {
        "fig3_accuracy": (
            metric_vs_level(
                offline,
                "accuracy",
                "Accuracy (%), 95% Wilson band",
                "Fig. 3 — Accuracy vs blur",
                out / "fig3_accuracy.png",
                strategies=strategies_acc,
                alphas=alphas,
                ks=acc_ks,
                scale=100,
            ),
            f"Fig. 3: top-1 accuracy (edge and cloud answers together) against blur σ, per threshold α and number "
            f"of edge branches k, for every strategy of the sweep; the weighted and mean ensembles often "
            f"coincide (the mean is the wide light line).{tail}",
        ),
        "fig4_early_exit": (
            metric_vs_level(
                offline,
                "early_exit_prob",
                "Answered at the edge (%)",
                f"Fig. 4 — Early-exit probability (k = {k})",
                out / "fig4_early_exit.png",
                strategies=["ee", "ensemble", "ensemble-unnormalised"],
                alphas=alphas,
                ks=[k],
                scale=100,
            ),
            f"Fig. 4: share of images answered at the edge against blur σ (k = {k}), with the paper's own Eq. 1 "
            f"(unnormalised weights) beside our normalised ensemble.{tail}",
        ),
        "fig5_flops": (
            metric_vs_level(
                offline.assign(
                    mean_flops=2 * offline["mean_macs"],
                    mean_flops_lo=2 * offline["mean_macs_lo"],
                    mean_flops_hi=2 * offline["mean_macs_hi"],
                ),
                "mean_flops",
                f"Mean {unit} per image (FLOPs = 2 × MACs)",
                f"Fig. 5 — Mean FLOPs per image (k = {k})",
                out / "fig5_flops.png",
                strategies=with_eq1,
                alphas=alphas,
                ks=[k],
                scale=scale,
            ),
            f"Fig. 5: mean {unit} per image against blur σ (k = {k}), counting only what ran: the edge up to "
            f"the exit, or edge and cloud.{tail}",
        ),
    }
    if online is not None and len(online) and "mean_time_ms" in online:
        n = int(online["n_timed"].min()) if "n_timed" in online else 0
        online_strategies = [s for s in with_eq1 if s in set(online["strategy"])]
        figs["fig6_time"] = (
            metric_vs_level(
                online,
                "mean_time_ms",
                "Mean inference time (ms), 95% bootstrap band",
                f"Fig. 6 — Mean inference time over the emulated link (k = {k})",
                out / "fig6_time.png",
                strategies=online_strategies,
                alphas=alphas,
                ks=[k],
            ),
            f"Fig. 6: mean time per image, from the edge receiving the image to the answer (HTTP round trip "
            f"included when offloaded), with its 95% BCa bootstrap interval; {n} timed images per level and "
            f"configuration.{tail}",
        )
        for p in (95, 99):
            if f"time_p{p}_ms" in online:
                figs[f"fig6_time_p{p}"] = (
                    metric_vs_level(
                        online,
                        f"time_p{p}_ms",
                        f"p{p} inference time (ms)",
                        f"Fig. 6 (tail) — {p}th percentile of the inference time (k = {k})",
                        out / f"fig6_time_p{p}.png",
                        strategies=online_strategies,
                        alphas=alphas,
                        ks=[k],
                        band=False,
                    ),
                    f"The {p}th percentile of the inference time against blur σ (k = {k}): the time a deadline "
                    f"has to allow for {p}% of the images; {n} timed images per level.{tail}",
                )
    return figs
