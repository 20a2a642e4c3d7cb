"""The exit rules compute in numpy for torch and numpy probabilities alike (policy.py): the same decisions bit
for bit whatever the input's array type and batch size, and the same as the rules written in torch (how the
sweep computed them before), on random probabilities with ties and values exactly at the threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeexit.policy import POLICY_NAMES, Decision, apply_policy, make_policy

WEIGHTS = [0.9, 0.8, 0.7]
# Values that make ties, 0 log 0 and probabilities of exactly 0 and 1 common.
GRID = [0.0, 0.125, 0.25, 0.5, 0.7, 0.75, 1.0]


def torch_rule(name: str, threshold: float, probs: list[torch.Tensor], k: int) -> Decision:
    """The rules as torch code (the previous implementation): the reference the numpy rules must match."""
    p = probs[-1]
    if name in ("ee", "entropy") or len(probs) < k:
        conf, label = p.max(dim=1)
        if name == "entropy":
            ent = -torch.special.xlogy(p.double(), p.double()).sum(dim=1)
            norm = ent / math.log(p.shape[1]) if p.shape[1] > 1 else torch.zeros_like(ent)
            stop = norm.clamp(0.0, 1.0) <= threshold
        elif name == "ee":
            # Above 1 in float64: the old code rounded a threshold a hair above 1 to float32's 1.0 and stopped at
            # a probability of exactly 1, against its own rule (alpha > 1 never stops); the numpy rule does not.
            stop = conf >= threshold if threshold <= 1.0 else conf.double() >= threshold
        else:
            stop = torch.zeros_like(label, dtype=torch.bool)
        return Decision(stop, label, conf.to(torch.float32))
    if name == "ensemble":
        weights = [w / sum(WEIGHTS[:k]) for w in WEIGHTS[:k]]
    elif name == "ensemble-unnormalised":
        weights = WEIGHTS[:k]
    else:
        weights = [1.0 / k] * k
    p_e = torch.zeros_like(probs[0], dtype=torch.float64)
    for w, q in zip(weights, probs, strict=True):
        p_e = p_e + w * q.double()
    conf, label = p_e.max(dim=1)
    return Decision(conf >= threshold, label, conf.to(torch.float32))


def policy(name: str, threshold: float):
    return make_policy(name, threshold, WEIGHTS, branch_accuracies=WEIGHTS)


def same(a: Decision, b: Decision) -> bool:
    """Bit-identical decisions (as numpy arrays, dtypes included)."""
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in ((a.stop, b.stop), (a.label, b.label), (a.confidence, b.confidence))
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, float, list[np.ndarray], int]:
    """(policy, threshold, probabilities of exits 1..i, k) with ties and thresholds at the scores."""
    name = draw(st.sampled_from(POLICY_NAMES))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    batch, classes, k = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    i = draw(st.integers(1, k))
    value = st.one_of(st.sampled_from(GRID), st.floats(0.0, 1.0, width=32))
    probs = [
        np.array(
            draw(st.lists(value, min_size=batch * classes, max_size=batch * classes)), dtype=dtype
        ).reshape(batch, classes)
        for _ in range(i)
    ]
    # The threshold: a score of the batch exactly (or a float64 a hair from a float32 score, which rounds to
    # it), a grid value, or anything.
    d = policy(name, 0.5).decide(probs, k)
    score = float(np.asarray(d.confidence)[draw(st.integers(0, batch - 1))])
    if name == "entropy":
        score = draw(st.floats(0.0, 1.0))
    threshold = draw(
        st.one_of(
            st.just(score),
            st.just(float(np.nextafter(score, 2.0))),
            st.sampled_from(GRID),
            st.floats(0.0, 1.5),
        )
    )
    return name, min(threshold, 1.0) if name == "entropy" else threshold, probs, k


@settings(max_examples=400, deadline=None)
@given(cases())
def test_numpy_and_torch_inputs_decide_alike_and_as_the_torch_rules(case: tuple) -> None:
    name, threshold, probs, k = case
    rule = policy(name, threshold)
    on_numpy = rule.decide(probs, k)
    on_torch = rule.decide([torch.from_numpy(p) for p in probs], k)
    assert isinstance(on_numpy.stop, np.ndarray) and isinstance(on_torch.stop, torch.Tensor)
    assert on_numpy.stop.dtype == np.bool_ and on_numpy.label.dtype == np.int64
    assert on_numpy.confidence.dtype == np.float32
    assert same(on_numpy, on_torch)
    # Against the torch rules: ensembles and ee bit for bit (the same IEEE operations, the threshold rounded to
    # the probabilities' dtype); entropy's log and sum round differently in torch, so away from the threshold.
    ref = torch_rule(name, rule.threshold, [torch.from_numpy(p) for p in probs], k)
    assert np.array_equal(on_numpy.label, ref.label.numpy())
    assert np.array_equal(on_numpy.confidence, ref.confidence.numpy())
    if name == "entropy":
        p = torch.from_numpy(probs[-1]).double()
        norm = (-torch.special.xlogy(p, p).sum(dim=1) / max(math.log(p.shape[1]), 1e-300)).clamp(0, 1)
        far = (norm - rule.threshold).abs().numpy() > 1e-12
        assert np.array_equal(on_numpy.stop[far], ref.stop.numpy()[far])
    else:
        assert np.array_equal(on_numpy.stop, ref.stop.numpy())


@settings(max_examples=200, deadline=None)
@given(cases())
def test_one_row_at_a_time_decides_as_the_whole_batch(case: tuple) -> None:
    # What online == offline rests on: the edge decides on [1, C] rows, the sweep on [B, C] batches.
    name, threshold, probs, k = case
    rule = policy(name, threshold)
    whole = rule.decide(probs, k)
    for b in range(probs[0].shape[0]):
        row = rule.decide([p[b : b + 1] for p in probs], k)
        assert same(row, Decision(whole.stop[b : b + 1], whole.label[b : b + 1], whole.confidence[b : b + 1]))


def test_threshold_compared_in_the_probabilities_dtype() -> None:
    # 0.7 is not a float32: torch rounds it to float32(0.7) before comparing a float32 tensor, so a probability
    # of exactly float32(0.7) stops at threshold 0.7; in float64 it would be below it.
    p32 = np.array([[np.float32(0.7), np.float32(0.3)]], dtype=np.float32)
    assert float(p32[0, 0]) < 0.7
    assert policy("ee", 0.7).decide([p32], 1).stop.tolist() == [True]
    assert policy("ee", 0.7).decide([p32.astype(np.float64)], 1).stop.tolist() == [False]
    assert bool((torch.from_numpy(p32).max(dim=1).values >= 0.7)[0])  # what torch does
    # A threshold past float32's range does not overflow the comparison (alpha above 1 never stops).
    with np.errstate(all="raise"):
        assert policy("ee", 1e40).decide([p32], 1).stop.tolist() == [False]
        assert policy("ee", math.inf).decide([p32], 1).stop.tolist() == [False]


def test_entropy_takes_zero_log_zero_as_zero_without_warnings() -> None:
    one_hot = np.array([[0.0, 1.0, 0.0]], dtype=np.float32)
    with np.errstate(all="raise"):
        d = policy("entropy", 0.0).decide([one_hot], 1)
    assert d.stop.tolist() == [True] and d.label.tolist() == [1]


def test_apply_policy_still_takes_and_gives_tensors() -> None:
    gen = torch.Generator().manual_seed(5)
    edge = [torch.softmax(2 * torch.randn(32, 4, generator=gen), dim=1) for _ in range(3)]
    final = torch.softmax(torch.randn(32, 4, generator=gen), dim=1)
    out = apply_policy(policy("ee", 0.9), edge, final)
    assert out.exit.dtype == out.heads.dtype == out.label.dtype == torch.int64
    assert out.confidence.dtype == torch.float32
    cloud = out.exit == 0
    assert cloud.any() and (~cloud).any()
    assert torch.equal(out.label[cloud], final.argmax(dim=1)[cloud])
    with pytest.raises(ValueError, match="same"):
        policy("ee", 0.9).decide([edge[0].numpy(), edge[1][:2].numpy()], 2)
