"""Exit rules of an early-exit net at the edge: one implementation for the offline sweep and the edge runner.

A `Policy` looks at the calibrated softmax outputs of edge exits 1..i and says, per sample, whether the
edge answers now. The offline path (`apply_policy`) calls it for i = 1..k on a whole cached batch; the
edge runner calls it after each branch with batch size 1 and stops at the first stop. Decisions are
row-independent, so both paths take the same decisions for the same inputs.

The rules compute in numpy whatever the inputs: torch tensors (the sweep) are viewed as numpy arrays without a
copy and the decision comes back as tensors; numpy arrays (the edge runner) stay numpy. One implementation
on one library is what makes the two paths bit-identical (torch and numpy round log and sums differently),
and on the edge's [1, C] arrays a numpy decision costs about a third of a torch one.

Deviation from the paper's Eq. 1: the ensemble weights (each branch's *validation* accuracy) are
renormalised to sum to 1 over the k branches used, so the ensemble's confidence is a probability
and can be compared with alpha in [0, 1]. The paper's own rule, p_E = sum_i Acc_i p_i with the raw
validation accuracies (a "confidence" that can exceed 1), is kept as the ablation `ensemble-unnormalised`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from edgeexit.errors import UserError
from edgeexit.registry import Registry

CLOUD = 0
# The conventional DNN is a model role, not a policy: it runs whole in the cloud and never decides at the edge.
# It is still a strategy a user compares against (records, configs, figures), under this name.
CONVENTIONAL = "conventional"
POLICY_NAMES = ("ee", "ensemble", "ensemble-unnormalised", "ensemble-mean", "entropy")
# the policies that need per-branch weights (`policy_for`'s ensemble_weights / branch_accuracies)
WEIGHTED = ("ensemble", "ensemble-unnormalised")
STRATEGIES = (*POLICY_NAMES, CONVENTIONAL)


# What the policies take and give: torch tensors (the sweep) or numpy arrays (the edge runner).
Array: TypeAlias = torch.Tensor | np.ndarray


@dataclass
class Decision:
    """Per-sample decision after one edge exit: stop there or not, with the label and confidence it gives.

    Numpy arrays when the probabilities were numpy arrays, torch tensors (on the CPU) when they were tensors.
    """

    stop: Array  # bool [B]: answer at the edge now
    label: Array  # int64 [B]
    confidence: Array  # float32 [B]


@dataclass
class Outcome:
    """Where each sample of a batch was answered, after how many edge heads, with which label/confidence."""

    exit: torch.Tensor  # int64 [B]: 1..k = answered at that edge exit; 0 (CLOUD) = answered by the final exit
    heads: torch.Tensor  # int64 [B]: edge exit heads evaluated
    label: torch.Tensor  # int64 [B]
    confidence: torch.Tensor  # float32 [B]

    @property
    def at_edge(self) -> torch.Tensor:
        """bool [B]: answered by an edge exit."""
        return self.exit != CLOUD


def _check_probs(probs: Sequence[Array], k: int) -> None:
    # Programming errors of the caller (sweep or edge runner), not user input: plain ValueError.
    if k < 1:
        raise ValueError(f"k (edge branches) must be >= 1, got {k}")
    if not 1 <= len(probs) <= k:
        raise ValueError(
            f"decide needs the probabilities of exits 1..i with 1 <= i <= k={k}, got {len(probs)}"
        )
    shape = probs[0].shape
    if len(shape) != 2:
        raise ValueError(f"exit probabilities must be [B, C], got shape {tuple(shape)}")
    for p in probs[1:]:
        if p.shape != shape:
            raise ValueError(
                f"all exits must have the same [B, C] shape, got {tuple(shape)} and {tuple(p.shape)}"
            )


def as_numpy(p: Array) -> np.ndarray:
    """`p` as a numpy array: itself, or a CPU tensor's memory without a copy (others are copied to the CPU)."""
    if isinstance(p, np.ndarray):
        return p
    return p.numpy(force=True)


def top_label(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax as int64, max in p's own dtype) of [B, C] probabilities; ties go to the lowest class index."""
    return p.argmax(axis=1).astype(np.int64, copy=False), p.max(axis=1)


def _decision(stop: np.ndarray, label: np.ndarray, conf: np.ndarray) -> Decision:
    # The threshold was compared in the probabilities' own precision; only the reported value is float32.
    return Decision(stop=stop, label=label, confidence=conf.astype(np.float32, copy=False))


def _at_least(x: np.ndarray, threshold: float) -> np.ndarray:
    """x >= threshold in x's own dtype (the threshold rounded to it, as torch compares with a Python float)."""
    # Above 1 no probability reaches it whatever the rounding, and rounding a huge one to float32 overflows:
    # compare in float64 there.
    return x >= (x.dtype.type(threshold) if threshold <= 1.0 else np.float64(threshold))


class Policy(ABC):
    """An exit rule; `decide` is called after edge exit i with the probabilities of exits 1..i."""

    name: str = ""
    threshold: float
    decides_every_exit: bool = True

    def __init__(self, threshold: float) -> None:
        self.threshold = _check_threshold(self.name, threshold)

    def decide(self, probs: Sequence[Array], k: int) -> Decision:
        """Decision after edge exit i = len(probs) (1 <= i <= k) from the probabilities [B, C] of exits 1..i:
        numpy arrays for numpy probabilities, torch tensors for tensors."""
        _check_probs(probs, k)
        if isinstance(probs[0], np.ndarray):
            return self.rule(probs, k)  # type: ignore[arg-type]
        d = self.rule([as_numpy(p) for p in probs], k)
        return Decision(*(torch.from_numpy(a) for a in (d.stop, d.label, d.confidence)))

    @abstractmethod
    def rule(self, probs: Sequence[np.ndarray], k: int) -> Decision:
        """The rule itself, in numpy, on checked probabilities [B, C] of exits 1..i (see `decide`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


def _check_threshold(name: str, threshold: float) -> float:
    t = float(threshold)
    if math.isnan(t) or t < 0:
        raise UserError(f"threshold of strategy {name!r} must be a number >= 0, got {threshold!r}")
    return t


PolicyFactory = Callable[..., Policy]
POLICIES: Registry[PolicyFactory] = Registry("strategy")


@POLICIES.register("ee")
class MaxProbPolicy(Policy):
    """EE-DNN (paper Sec. 3.1): stop at exit i when max_c p_i,c >= alpha. alpha > 1 never stops."""

    name = "ee"
    decides_every_exit = True

    def rule(self, probs: Sequence[np.ndarray], k: int) -> Decision:
        """Stop where the current exit's top probability reaches the threshold."""
        label, conf = top_label(probs[-1])
        return _decision(_at_least(conf, self.threshold), label, conf)


@POLICIES.register("entropy")
class EntropyPolicy(Policy):
    """BranchyNet: stop at exit i when the normalised entropy H(p_i) / log(C) <= threshold (in [0, 1])."""

    name = "entropy"
    decides_every_exit = True

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        if self.threshold > 1:
            raise UserError(f"entropy threshold must be in [0, 1] (normalised entropy), got {threshold!r}")

    def rule(self, probs: Sequence[np.ndarray], k: int) -> Decision:
        """Stop where the current exit's normalised entropy is at most the threshold; confidence = max p."""
        p = probs[-1]
        label, conf = top_label(p)
        num_classes = p.shape[1]
        p64 = p.astype(np.float64)
        # p log p with 0 log 0 = 0 (as torch.special.xlogy): the log only where p != 0, 0 elsewhere.
        log_p = np.log(p64, out=np.zeros_like(p64), where=p64 != 0)
        entropy = -(p64 * log_p).sum(axis=1)
        # One class: no uncertainty possible; the normalised entropy is 0 by convention.
        norm = entropy / math.log(num_classes) if num_classes > 1 else np.zeros_like(entropy)
        return _decision(np.clip(norm, 0.0, 1.0) <= self.threshold, label, conf)


class _EnsemblePolicy(Policy):
    """Branch ensemble (paper Sec. 3.2): decide once, after branch k, on p_E = sum_j w_j p_j (w sums to 1)."""

    decides_every_exit = False

    def _weights(self, k: int) -> list[float]:
        raise NotImplementedError

    def rule(self, probs: Sequence[np.ndarray], k: int) -> Decision:
        """Before exit k: never stop (current exit's label); at exit k: stop if max p_E >= threshold."""
        if len(probs) < k:
            label, conf = top_label(probs[-1])
            return _decision(np.zeros(label.shape, dtype=np.bool_), label, conf)
        weights = self._weights(k)
        # Accumulate exit by exit (elementwise) in float64 so a batch and a single sample give bit-identical sums.
        p_e = np.zeros(probs[0].shape, dtype=np.float64)
        for w, p in zip(weights, probs, strict=True):
            p_e = p_e + w * p.astype(np.float64)
        label, conf = top_label(p_e)
        return _decision(_at_least(conf, self.threshold), label, conf)


@POLICIES.register("ensemble")
class WeightedEnsemblePolicy(_EnsemblePolicy):
    """Eq. 1 with each branch weighted by its validation accuracy, renormalised over the k branches used."""

    name = "ensemble"

    def __init__(self, threshold: float, ensemble_weights: Sequence[float] | None = None) -> None:
        super().__init__(threshold)
        if ensemble_weights is None or len(ensemble_weights) == 0:
            raise UserError("strategy 'ensemble' needs ensemble_weights (each branch's validation accuracy)")
        ws = [float(w) for w in ensemble_weights]
        if any(not math.isfinite(w) or w < 0 for w in ws):
            raise UserError(f"ensemble weights must be finite and >= 0, got {list(ensemble_weights)}")
        self.ensemble_weights = ws

    def _weights(self, k: int) -> list[float]:
        if len(self.ensemble_weights) < k:
            raise UserError(
                f"strategy 'ensemble' with k={k} needs {k} ensemble weights, got {len(self.ensemble_weights)}"
            )
        first = self.ensemble_weights[:k]
        total = sum(first)
        if total <= 0:
            raise UserError(f"the first k={k} ensemble weights must not all be zero, got {first}")
        return [w / total for w in first]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, ensemble_weights={self.ensemble_weights})"


@POLICIES.register("ensemble-unnormalised")
class UnnormalisedEnsemblePolicy(_EnsemblePolicy):
    """The paper's Eq. 1 as written: p_E = sum_i Acc_i p_i with each branch's raw validation accuracy Acc_i.

    The weights are not normalised, so max p_E can exceed 1 and passes alpha more easily than a probability
    would: an ablation that shows the paper's finding under the paper's own rule. The accuracies come from the
    validation split (the spec's `exit_val_accuracy`), never from the test set.
    """

    name = "ensemble-unnormalised"

    def __init__(self, threshold: float, branch_accuracies: Sequence[float] | None = None) -> None:
        super().__init__(threshold)
        if branch_accuracies is None or len(branch_accuracies) == 0:
            raise UserError(
                "strategy 'ensemble-unnormalised' needs each branch's validation accuracy "
                "(exit_val_accuracy in the spec): run `edgeexit calibrate`"
            )
        ws = [float(w) for w in branch_accuracies]
        if any(not math.isfinite(w) or not 0 <= w <= 1 for w in ws):
            raise UserError(f"branch accuracies must be in [0, 1], got {list(branch_accuracies)}")
        self.branch_accuracies = ws

    def _weights(self, k: int) -> list[float]:
        if len(self.branch_accuracies) < k:
            raise UserError(
                f"strategy 'ensemble-unnormalised' with k={k} needs {k} branch accuracies, "
                f"got {len(self.branch_accuracies)}"
            )
        return self.branch_accuracies[:k]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold}, branch_accuracies={self.branch_accuracies})"
        )


@POLICIES.register("ensemble-mean")
class MeanEnsemblePolicy(_EnsemblePolicy):
    """Branch ensemble with equal weights 1/k (Qendro et al.)."""

    name = "ensemble-mean"

    def _weights(self, k: int) -> list[float]:
        return [1.0 / k] * k


def threshold_for(strategy: str, alpha: float) -> float:
    """The policy threshold for strictness alpha in [0, 1]: 1 - alpha for `entropy` (a normalised entropy
    bound), alpha for the others (a probability bound)."""
    return 1.0 - alpha if strategy == "entropy" else alpha


def make_policy(
    name: str,
    threshold: float,
    ensemble_weights: Sequence[float] | None = None,
    *,
    branch_accuracies: Sequence[float] | None = None,
) -> Policy:
    """The policy registered as `name` with its threshold; only 'ensemble' uses `ensemble_weights` and only
    'ensemble-unnormalised' `branch_accuracies` (each side branch's validation accuracy)."""
    if name == CONVENTIONAL:
        raise UserError(
            "'conventional' is the cloud-only DNN, not an edge policy; known policies: "
            + ", ".join(POLICIES.names())
        )
    factory = POLICIES.get(name)
    if name == "ensemble":
        return factory(threshold, ensemble_weights)
    if name == "ensemble-unnormalised":
        return factory(threshold, branch_accuracies)
    return factory(threshold)


def policy_for(
    strategy: str,
    alpha: float,
    ensemble_weights: Sequence[float] | None = None,
    *,
    branch_accuracies: Sequence[float] | None = None,
) -> Policy:
    """The policy of `strategy` at strictness alpha (see `threshold_for`)."""
    return make_policy(
        strategy, threshold_for(strategy, alpha), ensemble_weights, branch_accuracies=branch_accuracies
    )


def spec_policy(strategy: str, alpha: float, spec: object) -> Policy:
    """`policy_for` with the weights a calibrated model spec holds: `ensemble_weights` (normalised validation
    accuracies) and the side branches' raw validation accuracies (`exit_val_accuracy` without the final exit).
    The one way the sweep and the edge runner build a policy from a model."""
    val = getattr(spec, "exit_val_accuracy", None)
    return policy_for(
        strategy,
        alpha,
        getattr(spec, "ensemble_weights", None),
        branch_accuracies=list(val[:-1]) if val else None,
    )


def apply_policy(policy: Policy, edge_probs: Sequence[torch.Tensor], final_probs: torch.Tensor) -> Outcome:
    """Vectorised offline path: run `policy` over k = len(edge_probs) exits; unstopped samples go to the cloud."""
    k = len(edge_probs)
    if final_probs.dim() != 2:
        raise ValueError(f"final_probs must be [B, C], got shape {tuple(final_probs.shape)}")
    if k < 1:
        raise ValueError(f"strategy {policy.name!r} needs at least one edge exit's probabilities")
    elif edge_probs[0].shape[0] != final_probs.shape[0]:
        raise ValueError(
            f"edge and final batch sizes differ: {edge_probs[0].shape[0]} vs {final_probs.shape[0]}"
        )

    batch = final_probs.shape[0]
    device = final_probs.device
    label, confidence = (torch.from_numpy(a).to(device) for a in top_label(as_numpy(final_probs)))
    confidence = confidence.to(torch.float32)
    exit_ = torch.full((batch,), CLOUD, dtype=torch.int64, device=device)
    heads = torch.full((batch,), k, dtype=torch.int64, device=device)
    pending = torch.ones(batch, dtype=torch.bool, device=device)
    for i in range(1, k + 1):
        decision = policy.decide(edge_probs[:i], k)
        take = pending & decision.stop.to(device)
        exit_[take] = i
        heads[take] = i
        label[take] = decision.label.to(device)[take]
        confidence[take] = decision.confidence.to(device)[take]
        pending &= ~take
    return Outcome(exit=exit_, heads=heads, label=label, confidence=confidence)
