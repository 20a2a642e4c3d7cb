"""Every finding of the paper can fail: for each, a crafted summary that passes it and one that fails it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from edgeexit.experiment.findings import check_findings, flops_text, ms_text, trend

LEVELS = [0.0, 0.5, 1.0, 1.5, 1.8]
ALPHAS = [0.8, 0.9]
K = 3


def _offline() -> pd.DataFrame:
    """A summary in which every finding holds."""
    rows = []
    falls = np.linspace(0.0, 1.0, len(LEVELS))
    for alpha in ALPHAS:
        for i, level in enumerate(LEVELS):
            ee_acc = 0.96 - 0.3 * falls[i]
            ee_eep = 0.9 - 0.4 * falls[i]
            ee_macs = 2e6 + 1.5e6 * falls[i]
            for strategy, acc, eep, macs in (
                ("ee", ee_acc, ee_eep, ee_macs),
                ("ensemble", ee_acc + 0.005, ee_eep - 0.1, ee_macs + 1e6),
                ("ensemble-unnormalised", ee_acc - 0.01, ee_eep - 0.05, ee_macs + 0.5e6),
                ("conventional", 0.95 - 0.25 * falls[i], 0.0, 6e6),
            ):
                rows.append(
                    {
                        "strategy": strategy,
                        "alpha": alpha,
                        "k": K,
                        "level": level,
                        "accuracy": acc,
                        "accuracy_lo": acc - 0.02,
                        "accuracy_hi": acc + 0.02,
                        "early_exit_prob": eep,
                        "early_exit_prob_lo": max(eep - 0.03, 0.0),
                        "mean_macs": macs,
                    }
                )
    return pd.DataFrame(rows)


def _online() -> pd.DataFrame:
    rows = []
    for level in LEVELS:
        for strategy, alphas, t in (
            ("ee", ALPHAS, 3.0),
            ("ensemble", ALPHAS, 5.0),
            ("conventional", [np.nan], 25.0),
        ):
            for alpha in alphas:
                rows.append(
                    {
                        "strategy": strategy,
                        "alpha": alpha,
                        "k": 0 if strategy == "conventional" else K,
                        "level": level,
                        "mean_time_ms": t,
                        "mean_time_ms_lo": t - 1,
                        "mean_time_ms_hi": t + 1,
                    }
                )
    return pd.DataFrame(rows)


def _set(df: pd.DataFrame, strategy: str, column: str, values, level: float | None = None) -> pd.DataFrame:
    df = df.copy()
    mask = df["strategy"] == strategy
    if level is not None:
        mask &= df["level"] == level
    if callable(values):
        df.loc[mask, column] = values(df.loc[mask])
    else:
        df.loc[mask, column] = values
    return df


def _verdicts(offline: pd.DataFrame, online: pd.DataFrame | None = None) -> dict[str, bool | None]:
    found = check_findings(offline, _online() if online is None else online, alphas=ALPHAS, k=K)
    return {f.key: f.reproduced for f in found}


def test_the_crafted_summary_passes_every_finding() -> None:
    found = check_findings(_offline(), _online(), alphas=ALPHAS, k=K)
    assert len(found) == 9
    assert {f.key: f.reproduced for f in found} == dict.fromkeys([f.key for f in found], True)
    by_key = {f.key: f for f in found}
    assert by_key["ensemble_exits_less"].verdict == "holds by construction"
    assert "By construction" in by_key["ensemble_exits_less"].evidence
    assert "MFLOPs" in by_key["fewer_flops"].evidence and "ms" in by_key["faster"].evidence
    assert "Kendall τ" in by_key["accuracy_falls"].evidence


# Level 0 is the first, level 1.8 the last: a two-point check (last < first) passes each of these.
NOT_MONOTONE = {0.0: 0.90, 0.5: 0.95, 1.0: 0.97, 1.5: 0.96, 1.8: 0.85}

FAILING: dict[str, Callable[[pd.DataFrame, pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]] = {
    # conventional accuracy flat: no fall (a tie is not a fall)
    "accuracy_falls": lambda off, on: (_set(off, "conventional", "accuracy", 0.9), on),
    "low_blur_match": lambda off, on: (_set(off, "ee", "accuracy_hi", 0.5, level=0.0), on),
    "ensemble_accuracy": lambda off, on: (
        _set(off, "ensemble", "accuracy", lambda r: r["accuracy"] - 0.02),
        on,
    ),
    "ensemble_exits_less": lambda off, on: (
        _set(off, "ensemble", "early_exit_prob", lambda r: r["early_exit_prob"] + 0.15),
        on,
    ),
    # the paper's rule exits MORE often than EE-DNN (a weight sum above 1 lifts the "confidence")
    "unnormalised_exits_less": lambda off, on: (
        _set(off, "ensemble-unnormalised", "early_exit_prob", lambda r: r["early_exit_prob"] + 0.08),
        on,
    ),
    "edge_share": lambda off, on: (_set(off, "ensemble", "early_exit_prob", 0.1, level=1.0), on),
    "fewer_flops": lambda off, on: (_set(off, "ensemble", "mean_macs", lambda r: r["mean_macs"] + 4e6), on),
    # EE-DNN's interval overlaps the conventional one at one level
    "faster": lambda off, on: (off, _set(on, "ee", "mean_time_ms_hi", 24.5, level=1.8)),
    # FLOPs flat: a tie is not a rise
    "flops_rise": lambda off, on: (_set(off, "ee", "mean_macs", 2e6), on),
}


@pytest.mark.parametrize("key", sorted(FAILING))
def test_each_finding_fails_on_a_summary_crafted_against_it(key: str) -> None:
    offline, online = FAILING[key](_offline(), _online())
    verdicts = _verdicts(offline, online)
    assert verdicts[key] is False
    assert all(v for k, v in verdicts.items() if k != key), verdicts  # and only that one


def test_a_trend_read_from_the_two_ends_is_not_a_trend() -> None:
    s = pd.Series(NOT_MONOTONE)
    assert s.iloc[-1] < s.iloc[0]  # the old check (last < first) said "falls"
    ok, text = trend(s, "down")
    assert not ok and "τ = +0.00" in text
    off = _set(_offline(), "ee", "accuracy", lambda r: r["level"].map(NOT_MONOTONE))
    assert _verdicts(off)["accuracy_falls"] is False


def test_trend_needs_three_levels_and_a_significant_rank_correlation() -> None:
    assert trend(pd.Series({0.0: 1.0, 1.0: 2.0}), "up")[0] is False
    assert trend(pd.Series({0.0: 1.0, 0.5: 1.0, 1.0: 1.0}), "up") == (
        False,
        "flat at 1 over 3 levels: no trend",
    )
    ok, text = trend(pd.Series({0.0: 1.0, 0.5: 2.0, 1.0: 3.0, 1.8: 4.0}), "up")  # exact p = 1/24
    assert ok and "p = 0.0417" in text
    assert (
        trend(pd.Series({0.0: 1.0, 0.5: 2.0, 1.0: 3.0}), "up")[0] is False
    )  # p = 1/6: three points are not enough
    assert trend(pd.Series({0.0: 4.0, 0.5: 3.0, 1.0: 2.0, 1.8: 1.0}), "up")[0] is False  # the wrong direction


def test_missing_data_is_no_data_not_a_verdict() -> None:
    off = _offline()
    off = off[(off["strategy"] != "ensemble-unnormalised") & (off["level"] != 1.0)]
    found = {f.key: f for f in check_findings(off, None, alphas=ALPHAS, k=K)}
    for key in ("unnormalised_exits_less", "edge_share", "faster"):
        assert found[key].reproduced is None and found[key].verdict == "no data"


def test_number_formats() -> None:
    assert flops_text(3.5e6) == "7.00 MFLOPs" and flops_text(6e8) == "1.20 GFLOPs"
    assert ms_text(2.345, 1.9, 2.8) == "2.3 ms [1.9, 2.8]" and ms_text(2.0) == "2.0 ms"
