"""Why the early-exit model loses more accuracy under blur than the conventional DNN, in numbers.

From the sweep's cached calibrated probabilities (RUN_DIR/cache) of every exit:
- the accuracy of every exit alone (argmax, no early exit), the final exit included, per level;
- an oracle, "the first exit that is right" (right when any exit is right): how much any exit knows;
- per side branch, the share of images it answers confidently (top probability >= alpha) and wrongly;
and, from the offline records, the EE-DNN's errors split by where they were made (which edge exit, or the
cloud). `explain` turns them, with the distortion-aware ablation (an EE-DNN trained with blur augmentation,
RUN_DIR/ablation_blur), into the report's conclusion, computed from the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from edgeexit.config import RunConfig
from edgeexit.model.checkpoint import SPEC, load_spec
from edgeexit.rundir import RunDir

__all__ = ["exit_tables", "edge_errors", "explain"]


def _exit_name(i: int, n: int) -> str:
    return "final exit" if i == n else f"branch {i}"


def exit_tables(
    run: RunDir, cfg: RunConfig, alphas: Sequence[float], models: Sequence[tuple[str, str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accuracy, confident) tables from the cache of run `run`.

    accuracy: model, exit, level, accuracy (every exit alone; 'oracle' = the first exit that is right).
    confident: model, exit, alpha, level, confident (share with top probability >= alpha), confidently_wrong
    (share confident and wrong), precision (accuracy among the confident ones; NaN when none).
    `models`: (directory name, display name) pairs; default the EE-DNN and the conventional DNN.
    """
    from safetensors.torch import load_file

    from edgeexit.data.sources import load_dataset
    from edgeexit.evaluate.cache import cache_path

    models = models or (("ee", "EE-DNN"), ("conventional", "Conventional DNN"))
    labels = load_dataset(cfg.dataset.name, cfg.dataset.root).labels
    acc_rows, conf_rows = [], []
    for which, display in models:
        directory = run.root / which
        if not (directory / SPEC).is_file():
            continue
        spec = load_spec(directory)
        n = spec.num_exits
        for level in cfg.experiment.levels:
            path = cache_path(run, spec, cfg.experiment.distortion, level)
            if not path.is_file():
                continue
            tensors = load_file(str(path))
            truth = torch.as_tensor(labels[tensors["sample_ids"].numpy()])
            probs = [tensors[f"exit_{i}"] for i in range(1, n + 1)]
            right = torch.stack([p.argmax(1) == truth for p in probs])  # [exits, N]
            shown = range(1, n + 1) if which != "conventional" else [n]
            for i in shown:
                name = "final exit" if which == "conventional" else _exit_name(i, n)
                acc_rows.append(
                    {
                        "model": display,
                        "exit": name,
                        "level": float(level),
                        "accuracy": right[i - 1].float().mean().item(),
                    }
                )
            if n > 1:
                acc_rows.append(
                    {
                        "model": display,
                        "exit": "oracle",
                        "level": float(level),
                        "accuracy": right.any(0).float().mean().item(),
                    }
                )
                for i in range(1, n + 1):
                    conf = probs[i - 1].max(1).values
                    for alpha in alphas:
                        sure = conf >= alpha
                        n_sure = int(sure.sum())
                        conf_rows.append(
                            {
                                "model": display,
                                "exit": _exit_name(i, n),
                                "alpha": float(alpha),
                                "level": float(level),
                                "confident": sure.float().mean().item(),
                                "confidently_wrong": (sure & ~right[i - 1]).float().mean().item(),
                                "precision": (
                                    right[i - 1][sure].float().mean().item() if n_sure else float("nan")
                                ),
                            }
                        )
    return pd.DataFrame(acc_rows), pd.DataFrame(conf_rows)


def edge_errors(records: pd.DataFrame, strategy: str, alpha: float, k: int) -> pd.DataFrame:
    """Where `strategy`'s errors were made, per level: columns level, where (branch i / cloud), errors (share of
    all images answered wrongly there), answered (share answered there), accuracy there."""
    r = records[(records["strategy"] == strategy) & (records["alpha"] == alpha) & (records["k"] == k)]
    rows = []
    for level, g in r.groupby("level", sort=True):
        n = len(g)
        for ex, h in g.groupby("exit", sort=True):
            rows.append(
                {
                    "level": float(level),
                    "where": "cloud (final exit)" if ex == 0 else f"branch {ex}",
                    "answered": len(h) / n,
                    "errors": float((~h["correct"].astype(bool)).sum()) / n,
                    "accuracy": float(h["correct"].mean()),
                }
            )
    return pd.DataFrame(rows)


def _at(df: pd.DataFrame, level: float, **eq) -> float:
    m = df["level"] == level
    for k, v in eq.items():
        m &= df[k] == v
    vals = df.loc[m]
    col = "accuracy"
    return float(vals[col].iloc[0]) if len(vals) else float("nan")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def explain(
    offline: pd.DataFrame,
    accuracy: pd.DataFrame,
    confident: pd.DataFrame,
    errors: pd.DataFrame,
    *,
    alpha: float,
    k: int,
    ablation: pd.DataFrame | None = None,
    ablation_accuracy: pd.DataFrame | None = None,
) -> list[str]:
    """The conclusion on the robustness of EE-DNN vs the conventional DNN, as sentences computed from the tables.

    `offline`: the sweep summary; `ablation`: the summary of the blur-trained EE-DNN (same grid) or None.
    """
    levels = sorted(offline["level"].unique())
    if len(levels) < 2 or accuracy.empty:
        return ["Too few levels or no cached probabilities: no robustness analysis."]
    lo_level, hi_level = levels[0], levels[-1]

    def policy_acc(summary: pd.DataFrame, strategy: str, level: float) -> float:
        s = summary[(summary["strategy"] == strategy) & (summary["level"] == level)]
        if strategy != "conventional":
            s = s[(s["alpha"] == alpha) & (s["k"] == k)]
        return float(s["accuracy"].iloc[0]) if len(s) else float("nan")

    a_ee, a_conv = policy_acc(offline, "ee", hi_level), policy_acc(offline, "conventional", hi_level)
    final = _at(accuracy, hi_level, model="EE-DNN", exit="final exit")
    oracle = _at(accuracy, hi_level, model="EE-DNN", exit="oracle")
    conv_final = _at(accuracy, hi_level, model="Conventional DNN", exit="final exit")
    out = []
    gap = a_conv - a_ee
    who = "more" if gap > 0 else "less"
    out.append(
        f"At the heaviest blur (σ = {hi_level:g}) the conventional DNN answers {_pct(a_conv)} right and EE-DNN "
        f"(α = {alpha:g}, k = {k}) {_pct(a_ee)}: the conventional DNN is {abs(100 * gap):.1f} points {who} robust."
    )
    backbone = conv_final - final
    policy = final - a_ee
    out.append(
        f"Of that gap, {100 * backbone:+.1f} points lie in the models themselves (the EE-DNN's own final exit "
        f"alone: {_pct(final)}) and {100 * policy:+.1f} points in the early exits (the final exit alone vs "
        f"EE-DNN's early-exit answers). The oracle that takes the first right exit reaches {_pct(oracle)}: "
        + (
            "the exits together know more than the conventional DNN, so the loss is in which exit answers."
            if oracle >= a_conv
            else "even the exits together know less than the conventional DNN."
        )
    )
    if len(errors):
        e = errors[errors["level"] == hi_level].sort_values("errors", ascending=False)
        if len(e):
            top = e.iloc[0]
            parts = ", ".join(
                f"{r.where} {_pct(r.errors)} of all images (accuracy {_pct(r.accuracy)} of the {_pct(r.answered)} "
                "it answers)"
                for r in e.itertuples()
            )
            out.append(
                f"Where EE-DNN's errors at σ = {hi_level:g} are made: {parts}. Most come from {top['where']}."
            )
    c = confident[(confident["model"] == "EE-DNN") & (confident["alpha"] == alpha)]
    if len(c):
        side = c[c["exit"] != "final exit"]
        hi_rows = side[side["level"] == hi_level]
        lo_rows = side[side["level"] == lo_level]
        if len(hi_rows):
            worst = hi_rows.sort_values("confidently_wrong", ascending=False).iloc[0]
            before = lo_rows[lo_rows["exit"] == worst["exit"]]
            out.append(
                f"Confidently wrong (top probability ≥ {alpha:g} and wrong) at σ = {hi_level:g}: "
                + ", ".join(f"{r.exit} {_pct(r.confidently_wrong)}" for r in hi_rows.itertuples())
                + f" of the images (at σ = {lo_level:g}: "
                + ", ".join(f"{r.exit} {_pct(r.confidently_wrong)}" for r in lo_rows.itertuples())
                + f"). {worst['exit'].capitalize()} is the most confidently wrong under blur"
                + (
                    f", up from {_pct(float(before['confidently_wrong'].iloc[0]))} without blur."
                    if len(before)
                    else "."
                )
            )
    if ablation is not None and len(ablation):
        b_hi, b_lo = policy_acc(ablation, "ee", hi_level), policy_acc(ablation, "ee", lo_level)
        a_lo = policy_acc(offline, "ee", lo_level)
        conv_lo = policy_acc(offline, "conventional", lo_level)
        closed = (b_hi - a_ee) / gap if gap > 0 else float("nan")
        b_final = (
            _at(ablation_accuracy, hi_level, model="EE-DNN (blur-trained)", exit="final exit")
            if ablation_accuracy is not None and len(ablation_accuracy)
            else float("nan")
        )
        verdict = (
            "closes the gap"
            if b_hi >= a_conv
            else ("narrows the gap" if b_hi > a_ee else "does not narrow the gap")
        )
        text = (
            f"Distortion-aware ablation: the EE-DNN trained with blur augmentation (same recipe, each batch blurred "
            f"at a random level of the grid) reaches {_pct(b_hi)} at σ = {hi_level:g} (its final exit alone "
            f"{_pct(b_final)}) against {_pct(a_ee)} for the EE-DNN trained on pristine images and {_pct(a_conv)} "
            f"for the conventional DNN: it {verdict}"
        )
        if gap > 0:
            text += f" ({100 * closed:.0f}% of it)"
        text += (
            f". On pristine images (σ = {lo_level:g}) it answers {_pct(b_lo)} right vs {_pct(a_lo)} "
            f"(conventional {_pct(conv_lo)}): "
            + (
                f"a cost of {100 * (a_lo - b_lo):.1f} points."
                if a_lo > b_lo
                else f"no cost ({100 * (b_lo - a_lo):.1f} points better)."
            )
        )
        out.append(text)
    else:
        out.append("No distortion-aware ablation in this run.")
    return out


def write_tables(out: Path, **tables: pd.DataFrame) -> None:
    """Each table as out/<name>.csv."""
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)
