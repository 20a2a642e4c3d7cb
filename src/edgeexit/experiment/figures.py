"""Figures 3-6 of the paper (and per-exit accuracy) from summary tables, as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["STYLE", "metric_vs_level", "per_exit_accuracy_figure", "paper_figures"]

STYLE = {
    "ee": {"label": "EE-DNN", "color": "tab:blue", "marker": "o"},
    "ensemble": {"label": "Branch ensemble (weighted)", "color": "tab:orange", "marker": "s"},
    "ensemble-mean": {
        "label": "Branch ensemble (mean)",
        "color": "tab:green",
        "marker": "^",
        "linestyle": "--",
    },
    "entropy": {"label": "Entropy (BranchyNet)", "color": "tab:purple", "marker": "v", "linestyle": "--"},
    "conventional": {"label": "Conventional DNN (cloud)", "color": "tab:red", "marker": "x"},
}

LEVEL_LABELS = {
    "gaussian_blur": "Gaussian blur σ (pixels)",
    "gaussian_noise": "Gaussian noise σ (0-255 scale)",
    "jpeg": "JPEG quality",
}


def _rows(summary: pd.DataFrame, strategy: str, alpha: float, k: int) -> pd.DataFrame:
    s = summary[summary["strategy"] == strategy]
    if strategy == "conventional":  # the same cloud-only rows serve every alpha and k
        return s.drop_duplicates("level").sort_values("level")
    return s[(s["alpha"] == alpha) & (s["k"] == k)].sort_values("level")


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
) -> Path:
    """One panel per (k, alpha): `metric` (with its _lo/_hi band) against the distortion level per strategy."""
    distortion = str(summary["distortion"].iloc[0]) if len(summary) else "gaussian_blur"
    fig, axes = plt.subplots(
        len(ks), len(alphas), figsize=(4.6 * len(alphas), 3.4 * len(ks)), squeeze=False, sharey=True
    )
    for r, k in enumerate(ks):
        for c, alpha in enumerate(alphas):
            ax = axes[r][c]
            for strategy in strategies:
                rows = _rows(summary, strategy, alpha, k)
                if rows.empty or rows[metric].isna().all():
                    continue
                style = dict(STYLE.get(strategy, {"label": strategy}))
                label = style.pop("label")
                x, y = rows["level"], rows[metric] * scale
                ax.plot(x, y, label=label, markersize=4, **style)
                if f"{metric}_lo" in rows:
                    ax.fill_between(
                        x,
                        rows[f"{metric}_lo"] * scale,
                        rows[f"{metric}_hi"] * scale,
                        color=style["color"],
                        alpha=0.15,
                    )
            ax.set_title(f"α = {alpha:g}, k = {k} edge branches", fontsize=10)
            ax.set_xlabel(LEVEL_LABELS.get(distortion, "distortion level"))
            if c == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 3 if len(labels) > 3 else max(len(labels), 1)
    legend_rows = -(-len(labels) // ncol) if labels else 0
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.045 * legend_rows / len(ks) + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_exit_accuracy_figure(table: pd.DataFrame, path: Path, title: str = "Accuracy of each exit") -> Path:
    """Accuracy of every exit alone (argmax, no early exit) against the distortion level."""
    distortion = str(table["distortion"].iloc[0]) if len(table) else "gaussian_blur"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, rows in table.groupby("exit", sort=False):
        rows = rows.sort_values("level")
        ax.plot(rows["level"], rows["accuracy"] * 100, marker="o", markersize=4, label=str(name))
    ax.set_xlabel(LEVEL_LABELS.get(distortion, "distortion level"))
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paper_figures(
    offline: pd.DataFrame, online: pd.DataFrame | None, out: Path, *, alphas: Sequence[float], k: int
) -> dict[str, Path]:
    """Figures 3-6: accuracy (k in {2, 3} when swept), early-exit probability, mean FLOPs, mean time."""
    main = ["ee", "ensemble", "conventional"]
    acc_ks = [kk for kk in (2, 3) if kk in set(offline["k"])] or [k]
    figs = {
        "fig3_accuracy": metric_vs_level(
            offline,
            "accuracy",
            "Accuracy (%)",
            "Fig. 3 — Accuracy vs blur",
            out / "fig3_accuracy.png",
            strategies=[*main, "ensemble-mean", "entropy"],
            alphas=alphas,
            ks=acc_ks,
            scale=100,
        ),
        "fig4_early_exit": metric_vs_level(
            offline,
            "early_exit_prob",
            "Early-exit probability (%)",
            f"Fig. 4 — Share of images answered at the edge (k = {k})",
            out / "fig4_early_exit.png",
            strategies=["ee", "ensemble"],
            alphas=alphas,
            ks=[k],
            scale=100,
        ),
        "fig5_flops": metric_vs_level(
            offline,
            "mean_gflops",
            "Mean GFLOPs per image (FLOPs = 2 × MACs)",
            f"Fig. 5 — Mean FLOPs per image (k = {k})",
            out / "fig5_flops.png",
            strategies=main,
            alphas=alphas,
            ks=[k],
        ),
    }
    if online is not None and len(online) and "mean_time_ms" in online:
        figs["fig6_time"] = metric_vs_level(
            online,
            "mean_time_ms",
            "Mean inference time (ms), 95% CI",
            f"Fig. 6 — Mean inference time over the emulated link (k = {k})",
            out / "fig6_time.png",
            strategies=main,
            alphas=alphas,
            ks=[k],
        )
    return figs
