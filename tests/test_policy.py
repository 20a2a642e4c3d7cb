"""Exit policies on hand-built probabilities, offline/online agreement, and executed MACs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeexit.errors import UserError
from edgeexit.model.costs import CostTable
from edgeexit.policy import (
    CLOUD,
    CONVENTIONAL,
    POLICIES,
    POLICY_NAMES,
    STRATEGIES,
    Outcome,
    Policy,
    apply_policy,
    make_policy,
    policy_for,
    threshold_for,
)

# 4 samples, 3 classes, 3 edge exits. Normalised entropies (H / ln 3), by hand:
#   exit 1: 0.2113 0.9372 0.7298 0.9835
#   exit 2: 0.3590 0.4717 0.8173 0.9912
#   exit 3: 0.5817 0.5817 0.3019 0.9545
EDGE = [
    torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.4, 0.35, 0.25]]),
    torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]),
    torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.05, 0.92, 0.03], [0.45, 0.2, 0.35]]),
]
FINAL = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]])
WEIGHTS = [0.9, 0.8, 0.7]


def run(name: str, threshold: float, k: int, weights: list[float] | None = None) -> Outcome:
    return apply_policy(make_policy(name, threshold, weights), EDGE[:k], FINAL)


def check(out: Outcome, exit_: list[int], heads: list[int], label: list[int], conf: list[float]) -> None:
    assert out.exit.tolist() == exit_
    assert out.heads.tolist() == heads
    assert out.label.tolist() == label
    assert out.exit.dtype == out.heads.dtype == out.label.dtype == torch.int64
    assert out.confidence.dtype == torch.float32
    assert out.confidence.tolist() == pytest.approx(conf, abs=1e-5)


def test_strategies_match_registry() -> None:
    assert sorted(POLICY_NAMES) == POLICIES.names()
    assert STRATEGIES == (*POLICY_NAMES, CONVENTIONAL)


@pytest.mark.parametrize(
    ("alpha", "k", "expected"),
    [
        # s0 confident at exit 1; s1 at exit 2 (0.85); s2 at exit 3 (0.92); s3 never -> cloud (final).
        (0.8, 3, ([1, 2, 3, 0], [1, 2, 3, 3], [0, 1, 1, 2], [0.95, 0.85, 0.92, 0.8])),
        # alpha 0.9: s1 (0.5, 0.85, 0.8) is offloaded and the cloud says class 1 with 0.7.
        (0.9, 3, ([1, 0, 3, 0], [1, 3, 3, 3], [0, 1, 1, 2], [0.95, 0.7, 0.92, 0.8])),
        # k = 2: s2 no longer reaches exit 3 and the cloud's answer (class 2) is taken.
        (0.8, 2, ([1, 2, 0, 0], [1, 2, 2, 2], [0, 1, 2, 2], [0.95, 0.85, 0.7, 0.8])),
        # Equality counts as confident (>=).
        (0.95, 1, ([1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 2], [0.95, 0.7, 0.7, 0.8])),
    ],
)
def test_ee_by_hand(alpha: float, k: int, expected: tuple) -> None:
    check(run("ee", alpha, k), *expected)


def test_ee_alpha_zero_exits_at_branch_one() -> None:
    out = run("ee", 0.0, 3)
    check(out, [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0.95, 0.5, 0.7, 0.4])


def test_alpha_above_one_always_offloads_and_matches_final_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    edge = [torch.softmax(3 * torch.randn(200, 10, generator=gen), dim=1) for _ in range(3)]
    final = torch.softmax(3 * torch.randn(200, 10, generator=gen), dim=1)
    labels = torch.randint(0, 10, (200,), generator=gen)
    for name, weights in (("ee", None), ("ensemble", WEIGHTS), ("ensemble-mean", None)):
        out = apply_policy(make_policy(name, 1.01, weights), edge, final)
        assert (out.exit == CLOUD).all()
        assert (out.heads == 3).all()
        acc = (out.label == labels).float().mean().item()
        assert acc == (final.argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize(
    ("alpha", "k", "expected"),
    [
        # w = [0.9, 0.8, 0.7] / 2.4. p_E top: s0 0.889583 (c0), s1 0.629167 (c1), s2 0.730833 (c1), s3 0.38125 (c0)
        (0.8, 3, ([3, 0, 0, 0], [3, 3, 3, 3], [0, 1, 2, 2], [0.889583, 0.7, 0.7, 0.8])),
        (0.7, 3, ([3, 0, 3, 0], [3, 3, 3, 3], [0, 1, 1, 2], [0.889583, 0.7, 0.730833, 0.8])),
        # k = 2 renormalises the FIRST TWO weights: [0.9, 0.8] / 1.7 -> s0 0.926471 (normalising over all
        # three weights would give 0.65625 and offload s0).
        (0.9, 2, ([2, 0, 0, 0], [2, 2, 2, 2], [0, 1, 2, 2], [0.926471, 0.7, 0.7, 0.8])),
        (0.55, 2, ([2, 2, 2, 0], [2, 2, 2, 2], [0, 1, 1, 2], [0.926471, 0.558824, 0.652941, 0.8])),
    ],
)
def test_weighted_ensemble_by_hand(alpha: float, k: int, expected: tuple) -> None:
    check(run("ensemble", alpha, k, WEIGHTS), *expected)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        # Equal weights: s0 0.883333, s1 0.65, s2 0.74, s3 0.383333 (c0). 0.735 separates it from the
        # weighted ensemble, whose s2 is 0.730833.
        (0.735, ([3, 0, 3, 0], [3, 3, 3, 3], [0, 1, 1, 2], [0.883333, 0.7, 0.74, 0.8])),
        (0.0, ([3, 3, 3, 3], [3, 3, 3, 3], [0, 1, 1, 0], [0.883333, 0.65, 0.74, 0.383333])),
    ],
)
def test_mean_ensemble_by_hand(alpha: float, expected: tuple) -> None:
    check(run("ensemble-mean", alpha, 3), *expected)
    assert run("ensemble", 0.735, 3, WEIGHTS).exit.tolist() == [3, 0, 0, 0]


def test_ensemble_confidence_never_exceeds_one() -> None:
    # Unnormalised weights [0.9, 0.8, 0.7] would give s0 a "confidence" of 2.135.
    gen = torch.Generator().manual_seed(1)
    edge = [torch.softmax(10 * torch.randn(100, 5, generator=gen), dim=1) for _ in range(3)]
    edge[0][0] = edge[1][0] = edge[2][0] = torch.tensor([1.0, 0, 0, 0, 0])
    policy = make_policy("ensemble", 0.0, WEIGHTS)
    for k in (1, 2, 3):
        d = policy.decide(edge[:k], k)
        assert d.confidence.max().item() <= 1.0
        assert d.confidence[0].item() == pytest.approx(1.0)


def test_ensemble_decides_only_at_k() -> None:
    policy = make_policy("ensemble", 0.0, WEIGHTS)
    assert not policy.decides_every_exit
    d = policy.decide(EDGE[:1], 3)
    assert not d.stop.any()
    assert d.label.tolist() == [0, 0, 1, 0]  # the current exit's own argmax
    assert policy.decide(EDGE, 3).stop.all()


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.5, ([1, 2, 3, 0], [1, 2, 3, 3], [0, 1, 1, 2], [0.95, 0.85, 0.92, 0.8])),
        (0.3, ([1, 0, 0, 0], [1, 3, 3, 3], [0, 1, 2, 2], [0.95, 0.7, 0.7, 0.8])),
        (0.0, ([0, 0, 0, 0], [3, 3, 3, 3], [0, 1, 2, 2], [0.7, 0.7, 0.7, 0.8])),
        (1.0, ([1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0.95, 0.5, 0.7, 0.4])),
    ],
)
def test_entropy_by_hand(threshold: float, expected: tuple) -> None:
    check(run("entropy", threshold, 3), *expected)


def test_entropy_extremes() -> None:
    policy = make_policy("entropy", 0.0)
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert policy.decide([probs], 1).stop.tolist() == [True, False]  # one-hot has zero entropy
    assert make_policy("entropy", 1.0).decide([probs], 1).stop.tolist() == [True, True]
    assert make_policy("entropy", 0.999).decide([probs], 1).stop.tolist() == [True, False]


def test_conventional_is_a_model_role_not_a_policy() -> None:
    # The cloud-only DNN is a strategy to compare against, but no edge policy: asking for one says so.
    assert CONVENTIONAL in STRATEGIES and CONVENTIONAL not in POLICIES
    with pytest.raises(UserError, match="cloud-only DNN, not an edge policy"):
        make_policy(CONVENTIONAL, 0.8)


def test_threshold_for_is_one_strictness_knob() -> None:
    assert threshold_for("ee", 0.8) == 0.8 and threshold_for("ensemble", 0.3) == 0.3
    assert threshold_for("entropy", 0.8) == pytest.approx(0.2)  # stricter alpha: lower entropy bound
    assert policy_for("entropy", 0.8).threshold == pytest.approx(0.2)
    assert policy_for("ee", 0.8).threshold == 0.8


def _online(policy: Policy, edge: list[torch.Tensor], final: torch.Tensor) -> Outcome:
    """The edge runner's use: one sample at a time, decide after each exit, stop at the first stop."""
    k = len(edge)
    exits, heads, labels, confs = [], [], [], []
    for b in range(final.shape[0]):
        for i in range(1, k + 1):
            d = policy.decide([p[b : b + 1] for p in edge[:i]], k)
            if d.stop.item():
                exits.append(i), heads.append(i), labels.append(d.label.item()), confs.append(d.confidence)
                break
        else:
            exits.append(CLOUD), heads.append(k), labels.append(final[b].argmax().item())
            confs.append(final[b].max().reshape(1).float())
    return Outcome(torch.tensor(exits), torch.tensor(heads), torch.tensor(labels), torch.cat(confs))


def test_online_stepwise_equals_offline() -> None:
    gen = torch.Generator().manual_seed(2)
    for trial in range(40):
        k = 1 + trial % 3
        classes = 2 + trial % 5
        scale = 0.5 + trial % 4
        edge = [torch.softmax(scale * torch.randn(16, classes, generator=gen), dim=1) for _ in range(k)]
        final = torch.softmax(scale * torch.randn(16, classes, generator=gen), dim=1)
        threshold = float(torch.rand(1, generator=gen))
        weights = torch.rand(3, generator=gen).tolist()
        for name in ("ee", "ensemble", "ensemble-mean", "entropy"):
            policy = make_policy(name, threshold, weights)
            offline, online = apply_policy(policy, edge, final), _online(policy, edge, final)
            for field in ("exit", "heads", "label", "confidence"):
                assert torch.equal(getattr(offline, field), getattr(online, field)), (trial, name, field)


@pytest.mark.parametrize(
    ("name", "threshold", "weights", "match"),
    [
        ("nope", 0.8, None, "unknown strategy"),
        ("ee", -0.1, None, ">= 0"),
        ("ee", float("nan"), None, ">= 0"),
        ("entropy", 1.5, None, r"\[0, 1\]"),
        ("ensemble", 0.8, None, "needs ensemble_weights"),
        ("ensemble", 0.8, [0.9, -0.1, 0.5], "finite and >= 0"),
    ],
)
def test_bad_policy_arguments(name: str, threshold: float, weights: list[float] | None, match: str) -> None:
    with pytest.raises(UserError, match=match):
        make_policy(name, threshold, weights)


def test_bad_ensemble_weights_for_k() -> None:
    with pytest.raises(UserError, match="must not all be zero"):
        run("ensemble", 0.8, 2, [0.0, 0.0, 0.7])
    with pytest.raises(UserError, match="needs 3 ensemble weights"):
        run("ensemble", 0.8, 3, [0.9, 0.8])
    assert run("ensemble", 0.8, 1, [0.9, 0.0]).exit.tolist() == [1, 0, 0, 0]


def test_bad_decide_calls() -> None:
    policy = make_policy("ee", 0.8)
    with pytest.raises(ValueError, match=">= 1"):
        policy.decide(EDGE[:1], 0)
    with pytest.raises(ValueError, match="1 <= i <= k"):
        policy.decide(EDGE, 2)
    with pytest.raises(ValueError, match="same"):
        policy.decide([EDGE[0], EDGE[1][:2]], 2)
    with pytest.raises(ValueError, match="at least one"):
        apply_policy(policy, [], FINAL)
    with pytest.raises(ValueError, match="batch sizes"):
        apply_policy(policy, EDGE, FINAL[:2])


COSTS = CostTable(
    input_shape=[3, 8, 8],
    stage_macs=[10, 20, 30, 40],
    exit_macs=[1, 2, 3],
    head_macs=5,
    split_shapes=[[100], [50], [25]],
    split_bytes=[400, 200, 100],
)


def executed_macs(costs: CostTable, outcome: tuple[list[int], list[int]] | Outcome, k: int) -> np.ndarray:
    exits, heads = (outcome.exit, outcome.heads) if isinstance(outcome, Outcome) else outcome
    return costs.executed_macs(np.asarray(exits), np.asarray(heads), k)


def _outcome(exit_: list[int], heads: list[int]) -> tuple[list[int], list[int]]:
    return exit_, heads


def test_executed_macs_by_hand() -> None:
    # ee, k = 3: exit 1 = 10+1; exit 2 = 30+3; exit 3 = 60+6; cloud = 100 stages + 6 heads + 5 final head.
    macs = executed_macs(COSTS, _outcome([1, 2, 3, 0], [1, 2, 3, 3]), 3)
    assert macs.dtype == np.int64
    assert macs.tolist() == [11, 33, 66, 111]
    # ee, k = 2: offloaded after two heads = 100 + 3 + 5.
    assert executed_macs(COSTS, _outcome([1, 0], [1, 2]), 2).tolist() == [11, 108]
    # ensemble, k = 2: every sample evaluated both heads; at the edge = 30 + 3.
    assert executed_macs(COSTS, _outcome([2, 0], [2, 2]), 2).tolist() == [33, 108]
    # k = 0: the backbone alone (the conventional DNN of the same backbone).
    assert executed_macs(COSTS, _outcome([0], [0]), 0).tolist() == [COSTS.total_macs]


def test_executed_macs_rejects_inconsistent_outcomes() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        executed_macs(COSTS, _outcome([1], [1]), 4)
    with pytest.raises(ValueError, match="lie in"):
        executed_macs(COSTS, _outcome([3], [3]), 2)


def test_executed_macs_of_a_real_sweep() -> None:
    out = run("ee", 0.8, 3)  # exits [1, 2, 3, cloud]
    assert executed_macs(COSTS, out, 3).tolist() == [11, 33, 66, 111]
    out = run("ensemble", 0.8, 3, WEIGHTS)  # exits [3, cloud, cloud, cloud]
    assert executed_macs(COSTS, out, 3).tolist() == [66, 111, 111, 111]


def test_unnormalised_ensemble_is_the_papers_eq1_by_hand() -> None:
    # p_E = 0.9 p1 + 0.8 p2 + 0.7 p3 (no normalisation): the top "confidences" are 2.4x the weighted
    # ensemble's: s0 2.135, s1 1.51, s2 1.754, s3 0.915 -- all pass alpha = 0.9, though none is a probability.
    out = apply_policy(make_policy("ensemble-unnormalised", 0.9, branch_accuracies=WEIGHTS), EDGE, FINAL)
    check(out, [3, 3, 3, 3], [3, 3, 3, 3], [0, 1, 1, 0], [2.135, 1.51, 1.754, 0.915])
    # k = 1: one branch weighted by its accuracy 0.9 -> s0 0.855 passes 0.8, s2 0.63 does not
    out = apply_policy(make_policy("ensemble-unnormalised", 0.8, branch_accuracies=WEIGHTS), EDGE[:1], FINAL)
    assert out.exit.tolist() == [1, 0, 0, 0]


def test_unnormalised_ensemble_exits_whenever_the_normalised_one_does_if_weights_sum_past_one() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        edge = [torch.softmax(2 * torch.randn(64, 5, generator=gen), dim=1) for _ in range(3)]
        acc = (0.4 + 0.6 * torch.rand(3, generator=gen)).tolist()  # sum > 1
        norm = apply_policy(make_policy("ensemble", 0.8, acc), edge, FINAL[:1].repeat(64, 1))
        raw = apply_policy(
            make_policy("ensemble-unnormalised", 0.8, branch_accuracies=acc), edge, FINAL[:1].repeat(64, 1)
        )
        assert bool((raw.at_edge | ~norm.at_edge).all())
        assert torch.equal(raw.label[norm.at_edge], norm.label[norm.at_edge])  # same argmax


def test_spec_policy_takes_validation_accuracies_of_the_side_branches() -> None:
    from types import SimpleNamespace

    from edgeexit.policy import spec_policy

    spec = SimpleNamespace(ensemble_weights=[0.5, 0.3, 0.2], exit_val_accuracy=[0.9, 0.8, 0.7, 0.99])
    assert spec_policy("ensemble-unnormalised", 0.8, spec).branch_accuracies == [0.9, 0.8, 0.7]
    assert spec_policy("ensemble", 0.8, spec).ensemble_weights == [0.5, 0.3, 0.2]
    with pytest.raises(UserError, match="validation accuracy"):
        spec_policy(
            "ensemble-unnormalised", 0.8, SimpleNamespace(ensemble_weights=None, exit_val_accuracy=None)
        )
    with pytest.raises(UserError, match="in \\[0, 1\\]"):
        make_policy("ensemble-unnormalised", 0.8, branch_accuracies=[1.5])
