"""Offline evaluation on a real tiny run: cached sweep == direct re-runs, cache hits/invalidation, MACs, errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reference import direct_records, outcome_records, sweep_records

from edgeexit.config import RunConfig
from edgeexit.data import distort, load_uint8
from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import format_summary
from edgeexit.evaluate.cache import cache_path, cached_probabilities
from edgeexit.evaluate.records import RECORD_COLUMNS, read_records
from edgeexit.evaluate.sweep import Grid, evaluate_run, payload_table
from edgeexit.model import (
    CostTable,
    ModelSpec,
    cost_table,
    load_checkpoint,
    load_spec,
    new_model,
    save_checkpoint,
)
from edgeexit.model.build import settle_batchnorm
from edgeexit.policy import STRATEGIES, apply_policy, make_policy, threshold_for
from edgeexit.rundir import RunDir, prepare_data

LIMIT = 24
LEVELS = [0.0, 1.5]
ALPHAS = [0.3, 0.5]
KS = [1, 2, 3]
STRATS = list(STRATEGIES)


@dataclass
class Tiny:
    """A run directory with a random-weight EE-DNN and conventional DNN on `digits` (input 32)."""

    root: Path
    cfg: RunConfig


def _make_run(root: Path, *, calibrated: bool = True, conventional: bool = True) -> Tiny:
    cfg = RunConfig.from_dict(
        {"dataset": {"name": "digits"}, "experiment": {"batch_size": LIMIT}, "train": {"device": "cpu"}}
    )
    run = RunDir(root)
    run.save_config(cfg)
    ds, split, prep = prepare_data(cfg, run)
    x = prep.normalize(load_uint8(ds, split.train[:64], prep))
    common = dict(num_classes=10, input_size=32, mean=prep.mean, std=prep.std, dataset="digits")
    torch.manual_seed(0)
    net, spec = new_model("mobilenet_v2", branches=3, **common)
    settle_batchnorm(net, x)
    if calibrated:
        # Sharp temperatures spread the confidences of the random net: a mix of exits at alpha 0.5.
        spec.temperatures = [0.12, 0.2, 0.2, 0.3]
        spec.ensemble_weights = [0.2, 0.3, 0.5]
        spec.exit_val_accuracy = [0.4, 0.6, 1.0, 0.9]  # ensemble-unnormalised: weights 0.4, 0.6, 1.0
    save_checkpoint(run.ee, net, spec)
    if conventional:
        conv, cspec = new_model("mobilenet_v2", kind="conventional", **common)
        settle_batchnorm(conv, x)
        if calibrated:
            cspec.temperatures = [0.3]
        save_checkpoint(run.conventional, conv, cspec)
    return Tiny(root, cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return _make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def evaluated(tiny: Tiny) -> tuple[pd.DataFrame, pd.DataFrame]:
    return evaluate_run(
        tiny.root, tiny.cfg, levels=LEVELS, alphas=ALPHAS, edge_branches=KS, strategies=STRATS, limit=LIMIT
    )


@dataclass
class Models:
    """The tiny run's models, cost tables and first LIMIT test images, loaded once."""

    net: torch.nn.Module
    spec: ModelSpec
    conv: torch.nn.Module
    cspec: ModelSpec
    costs: CostTable
    conv_costs: CostTable
    ids: np.ndarray
    labels: np.ndarray
    images: torch.Tensor


@pytest.fixture(scope="module")
def models(tiny: Tiny, evaluated: tuple[pd.DataFrame, pd.DataFrame]) -> Models:
    run = RunDir(tiny.root)
    net, spec = load_checkpoint(run.ee)
    conv, cspec = load_checkpoint(run.conventional)
    ds, split, _ = prepare_data(tiny.cfg, run)
    ids = np.asarray(split.test[:LIMIT])
    images = load_uint8(ds, ids, spec.preprocessing)
    return Models(
        net, spec, conv, cspec, cost_table(net, 32), cost_table(conv, 32), ids, ds.labels[ids], images
    )


def test_cached_sweep_equals_direct_reruns(
    evaluated: tuple[pd.DataFrame, pd.DataFrame], models: Models
) -> None:
    records, _ = evaluated
    m = models
    # The comparison means something: ee at alpha 0.5, k = 3 uses every exit and the cloud at both levels.
    ee = records[(records.strategy == "ee") & (records.alpha == 0.5) & (records.k == 3)]
    for _, rows in ee.groupby("level"):
        assert set(rows["exit"]) == {0, 1, 2, 3}
    assert list(records.columns) == list(RECORD_COLUMNS)
    # Re-running the models per configuration is slow: compare on one level, every strategy and alpha, k = 1, 3.
    grid = Grid("gaussian_blur", (1.5,), tuple(ALPHAS), (1, 3), tuple(STRATS))
    direct = direct_records(
        m.net,
        m.spec,
        m.conv,
        m.cspec,
        m.images,
        m.labels,
        m.ids,
        grid=grid,
        costs=m.costs,
        conv_macs=m.conv_costs.total_macs,
        payload_bytes=payload_table(m.costs, "fp32", m.conv_costs.input_bytes),
        dataset="digits",
        batch_size=LIMIT,  # the batch size of the cached run: bit-identical outputs
    )
    cached = records[(records.level == 1.5) & records.k.isin([1, 3])].reset_index(drop=True)
    assert len(direct) == len(STRATS) * len(ALPHAS) * 2 * LIMIT
    pd.testing.assert_frame_equal(cached, direct, check_exact=True)


def _level_probs(tiny: Tiny, m: Models, level: float) -> list[torch.Tensor]:
    """The EE-DNN's cached probabilities of one evaluated level (a cache hit)."""
    x = distort(m.images, "gaussian_blur", level, seeds=m.ids.tolist())
    key = {"distortion": "gaussian_blur", "level": level, "sample_ids": m.ids}
    return cached_probabilities(RunDir(tiny.root), "ee", m.net, m.spec, x, key, LIMIT)


def test_sweep_rows_match_outcome_records(tiny: Tiny, models: Models) -> None:
    m = models
    probs = _level_probs(tiny, m, 0.0)
    meta = {"dataset": "digits", "distortion": "gaussian_blur", "level": 0.0}
    got = sweep_records(
        probs,
        None,
        m.labels,
        m.ids,
        costs=m.costs,
        conv_macs=None,
        ee_spec=m.spec,
        alphas=[0.5],
        edge_branches=[2],
        strategies=["entropy"],
        meta=meta,
        payload_bytes=payload_table(m.costs, "fp16", 3072),
    )
    outcome = apply_policy(make_policy("entropy", threshold_for("entropy", 0.5)), probs[:2], probs[-1])
    want = outcome_records(
        outcome,
        labels=m.labels,
        sample_ids=m.ids,
        costs=m.costs,
        k=2,
        strategy="entropy",
        alpha=0.5,
        payload_bytes_per_offload=m.costs.split_bytes_at(2, "fp16"),
        **meta,
    )
    assert want.at_edge.any() and not want.at_edge.all()
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_mac_and_payload_accounting_follow_the_cost_table(
    evaluated: tuple[pd.DataFrame, pd.DataFrame], models: Models
) -> None:
    records, _ = evaluated
    costs, conv_total = models.costs, models.conv_costs.total_macs
    ee = records[records.strategy != "conventional"]
    edge = ee[ee.at_edge]
    for (strategy, k, i), rows in edge.groupby(["strategy", "k", "exit"]):
        assert (rows.macs == costs.macs_to_exit(i)).all(), (strategy, k, i)
        assert (rows.payload_bytes == 0).all()
        if strategy.startswith("ensemble"):
            assert i == k  # an ensemble decides once, after all k branches
    cloud = ee[~ee.at_edge]
    assert len(cloud) and len(edge)
    for k, rows in cloud.groupby("k"):
        assert (rows.macs == costs.macs_offloaded(k)).all()
        assert (rows.payload_bytes == costs.split_bytes_at(k, "fp32")).all()
        assert (rows.exit == 0).all()
    conv_rows = records[records.strategy == "conventional"]
    assert (conv_rows.macs == conv_total).all() and not conv_rows.at_edge.any()
    assert (conv_rows.payload_bytes == 3 * 32 * 32).all()  # the raw uint8 image
    assert conv_total == costs.total_macs  # same backbone, no branches
    # Conventional rows are repeated, identical, for every (alpha, k) of a level.
    cols = ["sample_id", "prediction", "confidence"]
    for _, level_rows in conv_rows.groupby("level"):
        per = [g[cols].to_numpy() for _, g in level_rows.groupby(["alpha", "k"])]
        assert len(per) == len(ALPHAS) * len(KS)
        assert all(np.array_equal(per[0], p) for p in per)


def test_written_records_and_summary(tiny: Tiny, evaluated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    records, summary = evaluated
    run = RunDir(tiny.root)
    pd.testing.assert_frame_equal(read_records(run.records), records)
    assert len(records) == len(LEVELS) * len(STRATS) * len(ALPHAS) * len(KS) * LIMIT
    on_disk = pd.read_csv(run.summary)
    assert len(summary) == len(on_disk) == len(LEVELS) * len(STRATS) * len(ALPHAS) * len(KS)
    keys = set(zip(summary.level, summary.strategy, summary.alpha, summary.k, strict=True))
    assert keys == {(lv, s, a, k) for lv in LEVELS for s in STRATS for a in ALPHAS for k in KS}
    assert (summary.n == LIMIT).all()
    row = summary[
        (summary.strategy == "ee") & (summary.alpha == 0.5) & (summary.k == 3) & (summary.level == 0.0)
    ]
    sel = records[
        (records.strategy == "ee") & (records.alpha == 0.5) & (records.k == 3) & (records.level == 0.0)
    ]
    assert row.accuracy.item() == pytest.approx(sel.correct.mean())
    assert row.early_exit_prob.item() == pytest.approx(sel.at_edge.mean())
    text = format_summary(summary)
    lines = text.splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[1].split()[:4] == ["strategy", "alpha", "k", "level"]
    assert "ensemble-mean" in text and "[" in text


def test_alpha_zero_exits_at_the_first_branch(tiny: Tiny, models: Models) -> None:
    m = models
    probs = _level_probs(tiny, m, 1.5)
    records = sweep_records(
        probs,
        None,
        m.labels,
        m.ids,
        costs=m.costs,
        conv_macs=None,
        ee_spec=m.spec,
        alphas=[0.0],
        edge_branches=KS,
        strategies=STRATS[:4],
        meta={"dataset": "digits", "distortion": "gaussian_blur", "level": 1.5},
        payload_bytes=payload_table(m.costs, "fp32", 3072),
    )
    assert len(records) == 4 * len(KS) * LIMIT
    for strategy in ("ee", "entropy"):
        rows = records[records.strategy == strategy]
        assert (rows["exit"] == 1).all() and (rows.macs == m.costs.macs_to_exit(1)).all()
    for strategy in ("ensemble", "ensemble-mean"):
        rows = records[records.strategy == strategy]
        assert (rows["exit"] == rows["k"]).all()  # answered at the edge, after all k branches


def test_cache_hit_miss_and_invalidation(tiny: Tiny, models: Models, tmp_path: Path) -> None:
    m = models
    run = RunDir(tmp_path)
    net, spec = m.net, replace(m.spec)
    ids, images = m.ids[:16], m.images[:16]
    x = distort(images, "gaussian_noise", 20, seeds=ids.tolist())
    key = {"distortion": "gaussian_noise", "level": 20, "sample_ids": ids}
    calls = [0]
    hook = net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        first = cached_probabilities(run, "ee", net, spec, x, key, 16)
        assert calls[0] == 1
        path = cache_path(run, spec, "gaussian_noise", 20)
        assert path.is_file() and path.parent.parent.name == spec.content_hash
        second = cached_probabilities(run, "ee", net, spec, x, key, 16)
        assert calls[0] == 1  # a hit: the model did not run
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        # Noise is seeded by sample id: image 5 distorted alone gives what the cached batch holds.
        x5 = distort(images[5], "gaussian_noise", 20, seeds=[int(ids[5])])
        assert torch.equal(x5, x[5])
        # Other samples at the same level: the metadata differs -> recomputed (and the file replaced).
        cached_probabilities(run, "ee", net, spec, x[:10], {**key, "sample_ids": ids[:10]}, 16)
        assert calls[0] == 2
        # A re-calibrated checkpoint has a new content hash: a new folder, never the stale probabilities.
        recal = replace(spec, temperatures=[1.0, 1.0, 1.0, 1.0])
        save_checkpoint(tmp_path / "ee", net, recal)
        assert recal.content_hash != spec.content_hash
        assert cache_path(run, recal, "gaussian_noise", 20) != path
        fresh = cached_probabilities(run, "ee", net, recal, x, key, 16)
        assert calls[0] == 3
        assert not torch.allclose(fresh[0], first[0])
    finally:
        hook.remove()


def test_evaluate_run_reuses_its_cache(tiny: Tiny, evaluated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    files = sorted(RunDir(tiny.root).cache.rglob("*.safetensors"))
    assert len(files) == 2 * len(LEVELS)  # EE-DNN and conventional, per level
    stamps = [f.stat().st_mtime_ns for f in files]
    again, _ = evaluate_run(
        tiny.root, tiny.cfg, levels=LEVELS, alphas=ALPHAS, edge_branches=KS, strategies=STRATS, limit=LIMIT
    )
    assert [f.stat().st_mtime_ns for f in files] == stamps
    pd.testing.assert_frame_equal(again, evaluated[0])


def test_uncalibrated_run_without_conventional(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tiny = _make_run(tmp_path / "run", calibrated=False, conventional=False)
    with caplog.at_level(logging.WARNING):
        records, summary = evaluate_run(
            tiny.root, tiny.cfg, levels=[0.0], alphas=[0.8], edge_branches=[3], limit=8
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("run not calibrated: calibrating now" in msg for msg in messages)
    assert any("skipping strategy 'conventional'" in msg for msg in messages)
    spec = load_spec(RunDir(tiny.root).ee)
    assert spec.temperatures is not None and len(spec.temperatures) == 4
    assert spec.ensemble_weights is not None and len(spec.ensemble_weights) == 3
    assert sorted(records.strategy.unique()) == [
        "ee",
        "ensemble",
        "ensemble-mean",
        "ensemble-unnormalised",
        "entropy",
    ]
    assert len(summary) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"strategies": ["ee", "greedy"]},
            r"unknown strategy 'greedy' in experiment.strategies\[1\]; known: conv",
        ),
        ({"alphas": [1.5]}, r"experiment.alphas\[0\]: must be <= 1, got 1.5"),
        ({"alphas": [-0.1]}, r"experiment.alphas\[0\]: must be >= 0"),
        ({"alphas": [float("nan")]}, r"experiment.alphas\[0\]: must be a finite number"),
        ({"edge_branches": [4]}, r"experiment.edge_branches\[0\]: must be in 1\.\.3"),
        ({"edge_branches": [0]}, r"experiment.edge_branches\[0\]: must be in 1\.\.3"),
        ({"distortion": "fog"}, "unknown distortion 'fog' in experiment.distortion; known: gaussian_blur"),
        ({"levels": [-1.0]}, "finite number >= 0"),
        ({"limit": 0}, "positive number of test samples"),
        ({"strategies": []}, "experiment.strategies: must not be empty"),
    ],
)
def test_bad_input_is_a_user_error(tiny: Tiny, kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        evaluate_run(tiny.root, tiny.cfg, **{"levels": [0.0], "limit": 4, **kwargs})


def test_evaluate_needs_a_trained_run(tmp_path: Path) -> None:
    cfg = RunConfig.from_dict({"dataset": {"name": "digits"}})
    RunDir(tmp_path).save_config(cfg)
    with pytest.raises(UserError, match="run `edgeexit train`"):
        evaluate_run(tmp_path, cfg)
    with pytest.raises(UserError, match="not a run directory"):
        evaluate_run(tmp_path / "nowhere")
