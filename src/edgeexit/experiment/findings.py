"""The paper's findings (PAPER.md), each checked against this run's numbers: reproduced or not, and why.

Every check can fail, and tests/test_findings.py builds, for each one, a summary that fails it and one that
passes. Trends ("falls / rises with blur") are judged over all levels with Kendall's rank correlation and its
one-sided p-value (exact without ties): a flat series has no correlation, so a tie is not a rise. One claim,
"the ensemble exits early less often and so costs more FLOPs", holds by construction under our normalised
ensemble weights and is labelled so; the paper's own rule (unnormalised weights, `ensemble-unnormalised`) is
checked beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Finding", "check_findings", "trend", "flops_text", "ms_text", "TREND_P"]

TREND_P = 0.05  # one-sided significance of a trend


@dataclass
class Finding:
    """One claim of the paper, the verdict on this run, and the numbers that decide it."""

    key: str
    claim: str
    reproduced: bool | None  # None: this run has no data for it
    evidence: str
    by_construction: bool = False  # true whatever the data (a consequence of the method, not a finding)

    @property
    def verdict(self) -> str:
        """reproduced / NOT reproduced / no data / holds by construction."""
        if self.reproduced is None:
            return "no data"
        if self.by_construction and self.reproduced:
            return "holds by construction"
        return "reproduced" if self.reproduced else "NOT reproduced"


def flops_text(macs: float) -> str:
    """FLOPs (= 2 x MACs) in MFLOPs or GFLOPs, whichever the scale suits."""
    flops = 2.0 * float(macs)
    return f"{flops / 1e9:.2f} GFLOPs" if flops >= 1e9 else f"{flops / 1e6:.2f} MFLOPs"


def ms_text(mean: float, lo: float | None = None, hi: float | None = None) -> str:
    """A time in ms, with its interval when given."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.1f} ms"
    return f"{mean:.1f} ms [{lo:.1f}, {hi:.1f}]"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _label(strategy: str, alpha: float) -> str:
    names = {"ee": "EE-DNN", "ensemble": "ensemble", "ensemble-unnormalised": "ensemble (Eq. 1)"}
    return f"{names.get(strategy, strategy)} α={alpha:g}"


def _rows(summary: pd.DataFrame, strategy: str, alpha: float, k: int) -> pd.DataFrame:
    s = summary[summary["strategy"] == strategy]
    if strategy != "conventional":
        s = s[(s["alpha"] == alpha) & (s["k"] == k)]
    return s.drop_duplicates("level").sort_values("level")


def _series(summary: pd.DataFrame, strategy: str, alpha: float, k: int, metric: str) -> pd.Series:
    s = _rows(summary, strategy, alpha, k)
    return pd.Series(s[metric].to_numpy(dtype=float), index=s["level"].to_numpy(dtype=float))


def trend(series: pd.Series, direction: str, p_max: float = TREND_P) -> tuple[bool, str]:
    """Whether `series` (values indexed by level) falls ('down') or rises ('up') over all its levels.

    Kendall's tau between level and value with its one-sided p-value (scipy; exact for small series without
    ties), Spearman's rho beside it. It holds when p < p_max. Fewer than 3 levels or a constant series: it
    does not hold (no trend can be shown; a tie is not a rise).
    """
    from scipy import stats

    s = series.dropna()
    word = "falls" if direction == "down" else "rises"
    if len(s) < 3:
        return False, f"only {len(s)} levels: no trend can be shown"
    if s.nunique() == 1:
        return False, f"flat at {s.iloc[0]:.4g} over {len(s)} levels: no trend"
    x, y = s.index.to_numpy(dtype=float), s.to_numpy(dtype=float)
    res = stats.kendalltau(x, y, alternative="less" if direction == "down" else "greater")
    rho = stats.spearmanr(x, y).statistic
    ok = bool(np.isfinite(res.pvalue) and res.pvalue < p_max)
    text = f"Kendall τ = {res.statistic:+.2f} (one-sided p = {res.pvalue:.3g}), Spearman ρ = {rho:+.2f}"
    return ok, text + ("" if ok else f": it does not clearly {word[:-1]}")


def _trend_finding(
    key: str,
    claim: str,
    summary: pd.DataFrame,
    strategies: Sequence[str],
    alphas: Sequence[float],
    k: int,
    metric: str,
    direction: str,
    show,
) -> Finding:
    parts, ok, seen = [], True, False
    for alpha in alphas:
        for st in strategies:
            if st == "conventional" and alpha != alphas[0]:
                continue  # one cloud-only series
            s = _series(summary, st, alpha, k, metric)
            if s.empty:
                continue
            seen = True
            holds, text = trend(s, direction)
            ok &= holds
            who = "conventional" if st == "conventional" else _label(st, alpha)
            parts.append(f"{who}: {show(s.iloc[0])} → {show(s.iloc[-1])} over {len(s)} levels, {text}")
    return Finding(key, claim, ok if seen else None, "; ".join(parts))


def check_findings(
    offline: pd.DataFrame,
    online: pd.DataFrame | None,
    *,
    alphas: Sequence[float],
    k: int,
    low_level: float = 0.5,
) -> list[Finding]:
    """Check each finding of the paper on the offline summary (and the online one for inference time)."""
    out: list[Finding] = []
    main = ("ee", "ensemble", "conventional")

    out.append(
        _trend_finding(
            "accuracy_falls",
            "Accuracy falls as blur grows, for EE-DNN, ensemble and conventional DNN",
            offline,
            main,
            alphas,
            k,
            "accuracy",
            "down",
            _pct,
        )
    )

    # at low blur EE approaches match or beat the conventional DNN (within the 95% CI of the EE accuracy)
    parts, ok = [], True
    conv = _series(offline, "conventional", alphas[0], k, "accuracy")
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            acc = _series(offline, st, alpha, k, "accuracy")
            lo = _series(offline, st, alpha, k, "accuracy_lo")
            hi = _series(offline, st, alpha, k, "accuracy_hi")
            for level in [lv for lv in acc.index if lv <= low_level and lv in conv.index]:
                ok &= bool(hi[level] >= conv[level])
                parts.append(
                    f"{_label(st, alpha)} σ={level:g}: {_pct(acc[level])} [{_pct(lo[level])}, "
                    f"{_pct(hi[level])}] vs {_pct(conv[level])}"
                )
    out.append(
        Finding(
            "low_blur_match",
            f"At low blur (σ ≤ {low_level:g}) EE-DNN and ensemble match or beat the conventional DNN "
            "(conventional accuracy within or below the EE 95% CI)",
            ok if parts else None,
            "; ".join(parts[:8]) + (" …" if len(parts) > 8 else ""),
        )
    )

    # the ensemble is at least as accurate as EE-DNN (mean over levels)
    parts, acc_ok = [], True
    for alpha in alphas:
        a_ee, a_en = (_series(offline, s, alpha, k, "accuracy").mean() for s in ("ee", "ensemble"))
        acc_ok &= bool(a_en >= a_ee)
        parts.append(f"α={alpha:g}: ensemble {_pct(a_en)} vs EE-DNN {_pct(a_ee)}")
    out.append(
        Finding(
            "ensemble_accuracy",
            "The ensemble is at least as accurate as EE-DNN (mean accuracy over the levels)",
            acc_ok,
            "; ".join(parts),
        )
    )

    # the ensemble exits early less often and costs more: true by construction with normalised weights
    parts, exit_ok, cost_ok = [], True, True
    for alpha in alphas:
        e_ee, e_en = (_series(offline, s, alpha, k, "early_exit_prob").mean() for s in ("ee", "ensemble"))
        m_ee, m_en = (_series(offline, s, alpha, k, "mean_macs").mean() for s in ("ee", "ensemble"))
        exit_ok &= bool(e_en <= e_ee)
        cost_ok &= bool(m_en >= m_ee)
        parts.append(
            f"α={alpha:g}: answered at the edge {_pct(e_en)} vs {_pct(e_ee)}, "
            f"{flops_text(m_en)} vs {flops_text(m_ee)} (ensemble vs EE-DNN, mean over levels)"
        )
    out.append(
        Finding(
            "ensemble_exits_less",
            "The ensemble exits early less often than EE-DNN and so costs more FLOPs",
            exit_ok and cost_ok,
            "By construction with weights that sum to 1: the weighted mean's top probability never exceeds "
            "the largest branch confidence, so whenever the ensemble answers at the edge EE-DNN does too, "
            "no later; the ensemble always runs all k heads. " + "; ".join(parts),
            by_construction=True,
        )
    )

    # ... and under the paper's own Eq. 1 (unnormalised weights), where it can fail
    parts, ok, seen = [], True, False
    for alpha in alphas:
        e_ee = _series(offline, "ee", alpha, k, "early_exit_prob")
        e_un = _series(offline, "ensemble-unnormalised", alpha, k, "early_exit_prob")
        if e_un.empty or e_ee.empty:
            continue
        seen = True
        a_ee = _series(offline, "ee", alpha, k, "accuracy").mean()
        a_un = _series(offline, "ensemble-unnormalised", alpha, k, "accuracy").mean()
        m_ee = _series(offline, "ee", alpha, k, "mean_macs").mean()
        m_un = _series(offline, "ensemble-unnormalised", alpha, k, "mean_macs").mean()
        ok &= bool(e_un.mean() < e_ee.mean() and m_un > m_ee)
        parts.append(
            f"α={alpha:g}: answered at the edge {_pct(e_un.mean())} vs {_pct(e_ee.mean())}, accuracy "
            f"{_pct(a_un)} vs {_pct(a_ee)}, {flops_text(m_un)} vs {flops_text(m_ee)} "
            "(Eq. 1 ensemble vs EE-DNN, mean over levels)"
        )
    out.append(
        Finding(
            "unnormalised_exits_less",
            "Under the paper's own Eq. 1 (unnormalised validation-accuracy weights) the ensemble exits early "
            "less often than EE-DNN and costs more FLOPs",
            ok if seen else None,
            "; ".join(parts) if parts else "ensemble-unnormalised not in the sweep",
        )
    )

    # a large share of images (>= 20% at sigma = 1) exits at the edge
    parts, ok, seen = [], True, False
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            eep = _series(offline, st, alpha, k, "early_exit_prob")
            lo = _series(offline, st, alpha, k, "early_exit_prob_lo")
            if 1.0 in eep.index:
                seen = True
                ok &= bool(eep[1.0] >= 0.2)
                parts.append(f"{_label(st, alpha)}: {_pct(eep[1.0])} (95% CI from {_pct(lo[1.0])})")
    out.append(
        Finding(
            "edge_share",
            "At least 20% of images exit at the edge at σ = 1",
            ok if seen else None,
            "; ".join(parts) if parts else "σ = 1 not among the levels",
        )
    )

    # EE approaches need fewer FLOPs than the cloud-only conventional DNN (mean over levels)
    parts, ok = [], True
    conv_macs = _series(offline, "conventional", alphas[0], k, "mean_macs").mean()
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            m = _series(offline, st, alpha, k, "mean_macs").mean()
            ok &= bool(m < conv_macs)
            parts.append(f"{_label(st, alpha)}: {flops_text(m)} ({m / conv_macs:.2f}×)")
    out.append(
        Finding(
            "fewer_flops",
            "EE-DNN and ensemble need fewer FLOPs than the conventional DNN (mean over levels)",
            ok,
            f"conventional {flops_text(conv_macs)}; " + "; ".join(parts),
        )
    )

    # ... and answer faster: at every level, the EE interval lies below the conventional one
    has_time = online is not None and len(online) > 0 and "mean_time_ms" in online
    if not has_time:
        out.append(
            Finding(
                "faster",
                "EE-DNN and ensemble answer faster than the cloud-only conventional DNN",
                None,
                "no online run",
            )
        )
    else:
        assert online is not None
        parts, ok = [], True
        conv_rows = _rows(online, "conventional", alphas[0], k).set_index("level")
        for alpha in alphas:
            for st in ("ee", "ensemble"):
                rows = _rows(online, st, alpha, k).set_index("level")
                levels = [lv for lv in rows.index if lv in conv_rows.index]
                faster = [
                    lv
                    for lv in levels
                    if rows.at[lv, "mean_time_ms_hi"] < conv_rows.at[lv, "mean_time_ms_lo"]
                ]
                ok &= bool(levels) and len(faster) == len(levels)
                parts.append(
                    f"{_label(st, alpha)}: {ms_text(rows['mean_time_ms'].mean())} vs "
                    f"{ms_text(conv_rows['mean_time_ms'].mean())} (mean over levels), interval below the "
                    f"conventional one at {len(faster)}/{len(levels)} levels"
                )
        out.append(
            Finding(
                "faster",
                "EE-DNN and ensemble answer faster than the cloud-only conventional DNN "
                "(at every level, 95% intervals apart)",
                ok,
                "; ".join(parts),
            )
        )

    out.append(
        _trend_finding(
            "flops_rise",
            "Mean FLOPs of EE-DNN and ensemble rise with blur",
            offline,
            ("ee", "ensemble"),
            alphas,
            k,
            "mean_macs",
            "up",
            flops_text,
        )
    )
    return out
