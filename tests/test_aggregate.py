"""Records (schema, parquet round trip) and their aggregation with confidence intervals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reference import outcome_records
from scipy import stats

from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import GROUP_KEYS, summarize, t_interval, wilson_interval
from edgeexit.evaluate.records import (
    RECORD_COLUMNS,
    concat_records,
    empty_records,
    read_records,
    write_records,
)
from edgeexit.model.costs import CostTable
from edgeexit.policy import CLOUD, Outcome, apply_policy, make_policy

COSTS = CostTable(
    input_shape=[3, 8, 8],
    stage_macs=[10, 20, 30, 40],
    exit_macs=[1, 2, 3],
    head_macs=5,
    split_shapes=[[100], [50], [25]],
    split_bytes=[400, 200, 100],
)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(confidence: float) -> None:
    cases = [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (1, 7), (57, 100), (999, 1000)]
    succ = np.array([s for s, _ in cases])
    n = np.array([m for _, m in cases])
    lo, hi = wilson_interval(succ, n, confidence)
    for (s, m), a, b in zip(cases, lo, hi, strict=True):
        ref = stats.binomtest(s, m).proportion_ci(confidence_level=confidence, method="wilson")
        assert a == pytest.approx(ref.low, abs=1e-12)
        assert b == pytest.approx(ref.high, abs=1e-12)
    one = wilson_interval(3, 10, confidence)
    assert isinstance(one[0], float) and one[0] == pytest.approx(lo[4])


def test_wilson_edge_cases() -> None:
    lo, hi = wilson_interval(np.array([0, 2]), np.array([0, 4]))
    assert math.isnan(lo[0]) and math.isnan(hi[0])
    assert 0 < lo[1] < 0.5 < hi[1] < 1
    with pytest.raises(ValueError, match="in \\[0, n\\]"):
        wilson_interval(5, 4)
    with pytest.raises(UserError, match="\\(0, 1\\)"):
        wilson_interval(1, 4, confidence=95)


def test_t_interval_matches_scipy() -> None:
    values = np.array([3.1, 4.7, 2.2, 5.9, 4.4, 3.8])
    for confidence in (0.9, 0.95):
        mean, lo, hi = t_interval(values, confidence)
        ref = stats.t.interval(confidence, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        assert mean == pytest.approx(values.mean())
        assert (lo, hi) == pytest.approx(ref, abs=1e-12)


def test_t_interval_degenerate_cases() -> None:
    assert t_interval(np.array([7.5])) == (7.5, 7.5, 7.5)  # one value: zero width, not NaN
    assert t_interval(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0, 2.0)
    mean, lo, hi = t_interval(np.array([1.0, np.nan, 3.0]))  # NaN ignored
    ref = stats.t.interval(0.95, 1, loc=2.0, scale=stats.sem([1.0, 3.0]))
    assert mean == 2.0 and (lo, hi) == pytest.approx(ref)
    assert all(math.isnan(x) for x in t_interval(np.array([np.nan])))


def _records(rows: list[dict]) -> pd.DataFrame:
    base = {
        "dataset": "toy",
        "distortion": "blur",
        "level": 0.5,
        "strategy": "ee",
        "alpha": 0.8,
        "k": 3,
        "label": 0,
        "prediction": 0,
        "confidence": 0.9,
        "exit": 1,
        "payload_bytes": 0,
        "time_ms": np.nan,
        "outcome": "ok",
    }
    frame = pd.DataFrame([{**base, "sample_id": i, **r} for i, r in enumerate(rows)])
    return frame[list(RECORD_COLUMNS)]


def _hand_frame() -> pd.DataFrame:
    a = [  # alpha 0.8: 3/4 correct, 2/4 at the edge (1 of them correct), one offload failed
        {"correct": True, "at_edge": True, "macs": 10, "time_ms": 1.0},
        {"correct": True, "at_edge": False, "macs": 20, "time_ms": 2.0},
        {"correct": False, "at_edge": True, "macs": 30},
        {"correct": True, "at_edge": False, "macs": 40, "time_ms": 3.0, "outcome": "offload_failed"},
    ]
    b = [{"correct": False, "at_edge": False, "macs": 50, "alpha": 0.9}]  # alpha 0.9: one cloud answer
    return _records(a + b)


def test_summarize_by_hand() -> None:
    s = summarize(_hand_frame())
    assert list(s[list(GROUP_KEYS)].itertuples(index=False, name=None)) == [
        ("toy", "blur", 0.5, "ee", 0.8, 3),
        ("toy", "blur", 0.5, "ee", 0.9, 3),
    ]
    a, b = s.iloc[0], s.iloc[1]
    assert (a["n"], b["n"]) == (4, 1)
    assert (a["accuracy"], b["accuracy"]) == (0.75, 0.0)
    ci = stats.binomtest(3, 4).proportion_ci(method="wilson")
    assert (a["accuracy_lo"], a["accuracy_hi"]) == pytest.approx((ci.low, ci.high))
    ci = stats.binomtest(2, 4).proportion_ci(method="wilson")
    assert a["early_exit_prob"] == 0.5
    assert (a["early_exit_prob_lo"], a["early_exit_prob_hi"]) == pytest.approx((ci.low, ci.high))
    assert (a["n_edge"], a["edge_accuracy"]) == (2, 0.5)
    ci = stats.binomtest(1, 2).proportion_ci(method="wilson")
    assert (a["edge_accuracy_lo"], a["edge_accuracy_hi"]) == pytest.approx((ci.low, ci.high))
    assert b["n_edge"] == 0 and math.isnan(b["edge_accuracy"]) and math.isnan(b["edge_accuracy_lo"])
    assert b["early_exit_prob"] == 0.0 and b["early_exit_prob_lo"] == 0.0
    ref = stats.t.interval(0.95, 3, loc=25.0, scale=stats.sem([10, 20, 30, 40]))
    assert a["mean_macs"] == 25.0
    assert (a["mean_macs_lo"], a["mean_macs_hi"]) == pytest.approx(ref)
    assert (b["mean_macs"], b["mean_macs_lo"], b["mean_macs_hi"]) == (50.0, 50.0, 50.0)
    assert a["mean_gflops"] == pytest.approx(2 * 25 / 1e9)
    assert a["mean_gflops_hi"] == pytest.approx(2 * ref[1] / 1e9)
    assert (a["offload_failed_share"], b["offload_failed_share"]) == (0.25, 0.0)
    # the t interval of these times would be [-0.48, 4.48] ms: the bootstrap stays within [1, 3]
    assert (a["n_timed"], a["mean_time_ms"]) == (3, 2.0)
    assert 1.0 <= a["mean_time_ms_lo"] < 2.0 < a["mean_time_ms_hi"] <= 3.0
    assert (a["time_p50_ms"], a["time_p99_ms"]) == (2.0, pytest.approx(2.98))
    assert b["n_timed"] == 0 and math.isnan(b["mean_time_ms"]) and math.isnan(b["time_p95_ms"])


def test_bootstrap_mean_interval_matches_scipy_and_is_never_negative() -> None:
    from edgeexit.evaluate.aggregate import bootstrap_mean_interval

    rng = np.random.default_rng(1)
    # skewed times: mostly ~2 ms edge answers, a few ~25 ms round trips (the shape of the online run)
    times = np.concatenate([rng.gamma(2.0, 1.0, 180), 25 + rng.gamma(2.0, 1.0, 20)])
    mean, lo, hi = bootstrap_mean_interval(times)
    ref = stats.bootstrap(
        (times,), np.mean, n_resamples=2000, method="BCa", random_state=np.random.default_rng(0)
    )
    assert mean == pytest.approx(times.mean())
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert bootstrap_mean_interval(times) == (mean, lo, hi)  # seeded
    for n in (2, 3, 5, 20):  # tiny, heavily skewed samples: t intervals go below 0 here, these never do
        for seed in range(20):
            x = np.random.default_rng(seed).exponential(1.0, n) ** 3
            m, a, b = bootstrap_mean_interval(x)
            assert 0 <= x.min() <= a <= m <= b <= x.max()
    assert bootstrap_mean_interval([4.0]) == (4.0, 4.0, 4.0)
    assert bootstrap_mean_interval([3.0, 3.0]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_mean_interval([np.nan]))


def test_deadline_table_counts_misses_with_wilson_intervals() -> None:
    from edgeexit.evaluate.aggregate import deadline_table

    rows = [{"correct": True, "at_edge": True, "macs": 1, "time_ms": t} for t in (1.0, 4.0, 9.0, 30.0)]
    rows.append({"correct": True, "at_edge": True, "macs": 1})  # untimed: left out
    d = deadline_table(_records(rows), [0.5, 4.0, 10.0, 50.0])
    assert d["n_timed"].tolist() == [4] * 4
    assert d["met"].tolist() == [0, 2, 3, 4]  # time <= deadline counts as met
    assert d["miss_prob"].tolist() == [1.0, 0.5, 0.25, 0.0]
    ci = stats.binomtest(1, 4).proportion_ci(method="wilson")
    assert (d["miss_prob_lo"][2], d["miss_prob_hi"][2]) == pytest.approx((ci.low, ci.high))
    assert (d["miss_prob_lo"] >= 0).all() and (d["miss_prob_hi"] <= 1).all()


def test_summarize_other_groupings() -> None:
    frame = _hand_frame()
    s = summarize(frame, by=["strategy"])
    assert list(s["strategy"]) == ["ee"] and s["n"].tolist() == [5] and s["accuracy"].tolist() == [0.6]
    s = summarize(frame, by=())
    assert s["n"].tolist() == [5] and s["early_exit_prob"].tolist() == [0.4]
    offline = frame.assign(time_ms=np.nan)
    assert "mean_time_ms" not in summarize(offline).columns
    with pytest.raises(UserError, match="lack columns"):
        summarize(frame.drop(columns=["correct"]))
    with pytest.raises(UserError, match="lack columns"):
        summarize(frame, by=["nope"])
    assert len(summarize(empty_records())) == 0


def _sweep_records(strategy: str, k: int) -> pd.DataFrame:
    edge = [
        torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7]]),
        torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.45, 0.55]]),
    ]
    final = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1]])
    conventional = strategy == "conventional"
    if conventional:  # the cloud-only DNN: every sample answered by its own final exit
        conf, label = final.max(dim=1)
        out = Outcome(torch.full((3,), CLOUD), torch.zeros(3, dtype=torch.int64), label, conf)
    else:
        out = apply_policy(make_policy(strategy, 0.85), edge[:k], final)
    return outcome_records(
        out,
        labels=torch.tensor([0, 1, 1]),
        sample_ids=np.array([10, 11, 12]),
        costs=None if conventional else COSTS,
        k=k,
        strategy=strategy,
        alpha=0.85,
        dataset="toy",
        distortion="blur",
        level=1.0,
        payload_bytes_per_offload=192 if conventional else COSTS.split_bytes[k - 1],
        conventional_macs=500 if conventional else None,
    )


def test_outcome_records_by_hand() -> None:
    df = _sweep_records("ee", 2)
    assert tuple(df.columns) == RECORD_COLUMNS
    # s0 exits at 1 (0.95); s1 at 2 (0.9); s2 offloaded, the cloud says class 0 (wrong).
    assert df["exit"].tolist() == [1, 2, 0]
    assert df["prediction"].tolist() == [0, 1, 0]
    assert df["correct"].tolist() == [True, True, False]
    assert df["at_edge"].tolist() == [True, True, False]
    assert df["macs"].tolist() == [11, 33, 108]
    assert df["payload_bytes"].tolist() == [0, 0, 200]
    assert df["sample_id"].tolist() == [10, 11, 12]
    assert df["time_ms"].isna().all() and (df["outcome"] == "ok").all()
    assert df["confidence"].tolist() == pytest.approx([0.95, 0.9, 0.9])
    assert str(df["macs"].dtype) == "int64" and df["at_edge"].dtype == bool
    conv = _sweep_records("conventional", 0)
    assert conv["exit"].tolist() == [0, 0, 0] and conv["macs"].tolist() == [500] * 3
    assert conv["payload_bytes"].tolist() == [192] * 3


def test_outcome_records_rejects_bad_arguments() -> None:
    out = Outcome(torch.tensor([CLOUD]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.6]))
    common = {"sample_ids": [0], "k": 0, "alpha": 0.8, "dataset": "d", "distortion": "x", "level": 0.0}
    with pytest.raises(ValueError, match="needs conventional_macs"):
        outcome_records(
            out, labels=[0], costs=None, strategy="conventional", payload_bytes_per_offload=1, **common
        )
    with pytest.raises(ValueError, match="cost table"):
        outcome_records(out, labels=[0], costs=None, strategy="ee", payload_bytes_per_offload=1, **common)
    with pytest.raises(ValueError, match="must match"):
        outcome_records(out, labels=[0, 1], costs=COSTS, strategy="ee", payload_bytes_per_offload=1, **common)


def test_records_parquet_round_trip(tmp_path: Path) -> None:
    df = concat_records([_sweep_records("ee", 2), _sweep_records("conventional", 0)])
    path = tmp_path / "sub" / "records.parquet"
    write_records(df, path)
    assert [p.name for p in path.parent.iterdir()] == ["records.parquet"]  # no temp file left behind
    back = read_records(path)
    pd.testing.assert_frame_equal(back, df)
    # The summary of what was read matches the summary of what was written.
    pd.testing.assert_frame_equal(summarize(back), summarize(df))


def test_read_records_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_records(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(bad)
    with pytest.raises(UserError, match="lacks record columns"):
        read_records(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read"):
        read_records(junk)
    with pytest.raises(UserError, match="lacks record columns"):
        write_records(pd.DataFrame({"x": [1]}), tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
