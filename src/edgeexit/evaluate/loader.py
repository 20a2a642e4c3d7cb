"""`edgeexit.evaluate_model`: the offline sweep's answers for a model and the user's own DataLoader.

One forward pass over the loader gives every exit's calibrated probabilities; each edge strategy, alpha and
k is then decided from them by the sweep's own code (`policy_columns`, the same `Policy` as the edge runner)
and summarised with 95% intervals (`aggregate.summarize`). No run directory, no distortion: the loader's
images are evaluated as they come (records say distortion "none", level 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import summarize
from edgeexit.evaluate.sweep import RecordColumns, payload_table, policy_columns
from edgeexit.inference import calibrated_probs
from edgeexit.model.costs import cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.spec import ModelSpec
from edgeexit.policy import CONVENTIONAL, STRATEGIES

__all__ = ["evaluate_model"]


def evaluate_model(
    net: EarlyExitNet,
    spec: ModelSpec,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    strategies: Sequence[str] = ("ee", "ensemble"),
    alphas: Sequence[float] = (0.8, 0.9),
    edge_branches: Sequence[int] | None = None,
    precision: str = "fp32",
    records: bool = False,
) -> pd.DataFrame:
    """Accuracy, share answered at the edge and mean MACs per (strategy, alpha, k) over `loader`'s images.

    One row per configuration with 95% intervals (the columns of summary.csv); `records=True` returns the
    per-sample records instead. `edge_branches` None: every k. Uses the spec's temperatures (uncalibrated:
    plain softmax) and, for `ensemble`, its ensemble weights (`calibrate_model` fits both).
    """
    from edgeexit.train.fit import loader_logits

    bad = [s for s in strategies if s == CONVENTIONAL or s not in STRATEGIES]
    if bad or not strategies:
        edge = ", ".join(s for s in sorted(STRATEGIES) if s != CONVENTIONAL)
        raise UserError(f"strategies {bad or list(strategies)}: expected edge strategies among {edge}")
    ks = list(range(1, spec.num_branches + 1)) if edge_branches is None else list(edge_branches)
    if not ks or any(not 1 <= int(k) <= spec.num_branches for k in ks):
        raise UserError(f"edge branches {ks}: this model accepts k in 1..{spec.num_branches}")
    if "ensemble" in strategies and not spec.ensemble_weights:
        raise UserError("strategy 'ensemble' needs ensemble weights in the spec: run calibrate_model first")
    logits, y = loader_logits(net, spec, loader, desc="evaluate")
    probs = calibrated_probs(logits, spec.temperatures)
    labels = y.numpy().astype(np.int64)
    ids = np.arange(labels.shape[0], dtype=np.int64)
    costs = cost_table(net, spec.input_size)
    payload = payload_table(costs, precision, costs.input_bytes)
    where = {"dataset": spec.dataset or "loader", "distortion": "none", "level": 0.0}
    columns = RecordColumns()
    for s in strategies:
        columns.extend(
            policy_columns(
                probs,
                labels,
                ids,
                costs=costs,
                ee_spec=spec,
                strategy=s,
                alphas=[float(a) for a in alphas],
                edge_branches=[int(k) for k in ks],
                where=where,
                payload_bytes=payload,
            )
        )
    frame = columns.frame()
    return frame if records else summarize(frame)
