"""The paper's findings (PAPER.md), each checked against this run's numbers: reproduced or not, and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["Finding", "check_findings"]


@dataclass
class Finding:
    """One claim of the paper, the verdict on this run, and the numbers that decide it."""

    claim: str
    reproduced: bool | None  # None: this run has no data for it
    evidence: str


def _series(summary: pd.DataFrame, strategy: str, alpha: float, k: int, metric: str) -> pd.Series:
    s = summary[summary["strategy"] == strategy]
    if strategy != "conventional":
        s = s[(s["alpha"] == alpha) & (s["k"] == k)]
    s = s.drop_duplicates("level").sort_values("level")
    return pd.Series(s[metric].to_numpy(), index=s["level"].to_numpy())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cheaper(
    summary: pd.DataFrame | None, metric: str, alphas: Sequence[float], k: int, claim: str, describe
) -> Finding:
    """Whether EE-DNN and ensemble average less of `metric` over the levels than the conventional DNN."""
    if summary is None:
        return Finding(claim, None, "no online run")
    parts, ok = [], True
    conv = _series(summary, "conventional", alphas[0], k, metric).mean()
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            value = _series(summary, st, alpha, k, metric).mean()
            ok &= bool(value < conv)
            parts.append(f"{st} α={alpha:g}: {describe(value, conv)}")
    return Finding(claim, ok, "; ".join(parts))


def check_findings(
    offline: pd.DataFrame,
    online: pd.DataFrame | None,
    *,
    alphas: Sequence[float],
    k: int,
    low_level: float = 0.5,
) -> list[Finding]:
    """Check each trend of the paper on the offline summary (and the online one for inference time)."""
    out: list[Finding] = []
    strategies = ("ee", "ensemble", "conventional")

    # 1. accuracy falls as blur grows, for all three
    parts, ok = [], True
    for alpha in alphas:
        for st in strategies:
            acc = _series(offline, st, alpha, k, "accuracy")
            if len(acc) < 2:
                continue
            ok &= bool(acc.iloc[-1] < acc.iloc[0])
            parts.append(f"{st} α={alpha:g}: {_pct(acc.iloc[0])} → {_pct(acc.iloc[-1])}")
    out.append(
        Finding(
            "Accuracy falls as blur grows, for EE-DNN, ensemble and conventional DNN",
            ok if parts else None,
            "; ".join(parts),
        )
    )

    # 2. at low blur EE approaches match or beat the conventional DNN (within the 95% CI of the EE accuracy)
    parts, ok = [], True
    conv = _series(offline, "conventional", alphas[0], k, "accuracy")
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            acc = _series(offline, st, alpha, k, "accuracy")
            hi = _series(offline, st, alpha, k, "accuracy_hi")
            for level in [lv for lv in acc.index if lv <= low_level and lv in conv.index]:
                ok &= bool(hi[level] >= conv[level])
                parts.append(f"{st} α={alpha:g} σ={level:g}: {_pct(acc[level])} vs {_pct(conv[level])}")
    out.append(
        Finding(
            f"At low blur (σ ≤ {low_level:g}) EE-DNN and ensemble match or beat the conventional DNN "
            "(conventional accuracy within or below the EE 95% CI)",
            ok if parts else None,
            "; ".join(parts[:8]) + (" …" if len(parts) > 8 else ""),
        )
    )

    # 3. ensemble slightly more accurate, exits early less often, so costs more FLOPs (and time)
    parts, acc_ok, exit_ok, cost_ok = [], True, True, True
    for alpha in alphas:
        a_ee, a_en = (_series(offline, s, alpha, k, "accuracy").mean() for s in ("ee", "ensemble"))
        e_ee, e_en = (_series(offline, s, alpha, k, "early_exit_prob").mean() for s in ("ee", "ensemble"))
        m_ee, m_en = (_series(offline, s, alpha, k, "mean_macs").mean() for s in ("ee", "ensemble"))
        acc_ok &= bool(a_en >= a_ee)
        exit_ok &= bool(e_en <= e_ee)
        cost_ok &= bool(m_en >= m_ee)
        parts.append(
            f"α={alpha:g}: accuracy {_pct(a_en)} vs {_pct(a_ee)}, early exit {_pct(e_en)} vs {_pct(e_ee)}, "
            f"MMACs {m_en / 1e6:.2f} vs {m_ee / 1e6:.2f} (ensemble vs EE-DNN, mean over levels)"
        )
    out.append(Finding("The ensemble is at least as accurate as EE-DNN", acc_ok, "; ".join(parts)))
    out.append(
        Finding(
            "The ensemble exits early less often than EE-DNN and so costs more FLOPs",
            exit_ok and cost_ok,
            "; ".join(parts),
        )
    )

    # 4. a large share of images (>= 20% at sigma = 1) exits at the edge
    parts, ok, seen = [], True, False
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            eep = _series(offline, st, alpha, k, "early_exit_prob")
            if 1.0 in eep.index:
                seen = True
                ok &= bool(eep[1.0] >= 0.2)
                parts.append(f"{st} α={alpha:g}: {_pct(eep[1.0])}")
    out.append(
        Finding("At least 20% of images exit at the edge at σ = 1", ok if seen else None, "; ".join(parts))
    )

    # 5. EE approaches cut FLOPs strongly versus the cloud-only conventional DNN; 6. ... and inference time
    out.append(
        _cheaper(
            offline,
            "mean_macs",
            alphas,
            k,
            "EE-DNN and ensemble need fewer FLOPs than the conventional DNN",
            lambda m, c: f"{m / c:.2f}× the conventional MACs",
        )
    )
    has_time = online is not None and len(online) and "mean_time_ms" in online
    out.append(
        _cheaper(
            online if has_time else None,
            "mean_time_ms",
            alphas,
            k,
            "EE-DNN and ensemble answer faster than the cloud-only conventional DNN",
            lambda t, c: f"{t:.2f} ms vs {c:.2f} ms",
        )
    )

    # 7. FLOPs of EE approaches rise (slightly) with blur
    parts, ok = [], True
    for alpha in alphas:
        for st in ("ee", "ensemble"):
            m = _series(offline, st, alpha, k, "mean_macs")
            ok &= bool(m.iloc[-1] >= m.iloc[0])
            parts.append(f"{st} α={alpha:g}: {m.iloc[0] / 1e6:.2f} → {m.iloc[-1] / 1e6:.2f} MMACs")
    out.append(Finding("Mean FLOPs of EE-DNN and ensemble rise with blur", ok, "; ".join(parts)))
    return out
