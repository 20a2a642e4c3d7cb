"""Reference implementations used only by the tests and the benchmarks (never shipped in the package).

- `direct_records`: the authors' way of evaluating: distort, re-run the model and decide anew for every
  configuration, exit by exit, MACs from the cost table; the sweep must equal it.
- `outcome_records`: one configuration's records built row-wise with pandas from a policy outcome.
- `sweep_records`: the sweep's columns of one level as a DataFrame, the way `evaluate_run` makes them.
- `json_list_payload` / `decode_json_list`: the authors' wire format (a JSON list of floats), the baseline of
  the wire benchmark.
- `edge_probs` / `policy_scores`: one image's calibrated probabilities at exits 1..k through a runtime, and the
  quantities a policy compares with alpha there (to tell a decision that flips within a tolerance of alpha
  between two backends from a real disagreement).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from edgeexit.data.distortions import distort
from edgeexit.data.preprocess import Preprocessing
from edgeexit.evaluate.records import RECORD_DTYPES, concat_records
from edgeexit.evaluate.sweep import Grid, RecordColumns, conventional_columns, policy_columns
from edgeexit.inference import calibrate, calibrated_probs
from edgeexit.model.costs import CostTable
from edgeexit.model.spec import ModelSpec
from edgeexit.policy import CLOUD, CONVENTIONAL, Outcome, policy_for


def _np(x: Any) -> np.ndarray:
    """A 1-D numpy view of a tensor, array or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def outcome_records(
    outcome: Outcome,
    *,
    labels: Any,
    sample_ids: Any,
    costs: CostTable | None,
    k: int,
    strategy: str,
    alpha: float,
    dataset: str,
    distortion: str,
    level: float,
    payload_bytes_per_offload: int,
    conventional_macs: int | None = None,
) -> pd.DataFrame:
    """Offline records of one configuration from a policy outcome (time_ms NaN, outcome 'ok').

    For strategy 'conventional', `conventional_macs` is required and `costs` unused; otherwise
    `conventional_macs` is ignored. `payload_bytes_per_offload` is what one offload sends (the split
    tensor, or the raw image for 'conventional').
    """
    label_arr = _np(labels).astype(np.int64)
    ids = _np(sample_ids).astype(np.int64)
    exits = _np(outcome.exit).astype(np.int64)
    pred = _np(outcome.label).astype(np.int64)
    n = exits.shape[0]
    if label_arr.shape[0] != n or ids.shape[0] != n:
        raise ValueError(
            f"labels ({label_arr.shape[0]}) and sample_ids ({ids.shape[0]}) must match the batch ({n})"
        )
    if payload_bytes_per_offload < 0:
        raise ValueError(f"payload_bytes_per_offload must be >= 0, got {payload_bytes_per_offload}")
    if strategy == "conventional":
        if conventional_macs is None:
            raise ValueError(
                "strategy 'conventional' needs conventional_macs (the whole conventional network)"
            )
        macs = np.full(n, int(conventional_macs), dtype=np.int64)
    else:
        if costs is None:
            raise ValueError(f"strategy {strategy!r} needs the EE-DNN's cost table")
        macs = costs.executed_macs(exits, _np(outcome.heads), k)
    at_edge = exits != CLOUD
    df = pd.DataFrame(
        {
            "dataset": dataset,
            "distortion": distortion,
            "level": float(level),
            "strategy": strategy,
            "alpha": float(alpha),
            "k": int(k),
            "sample_id": ids,
            "label": label_arr,
            "prediction": pred,
            "confidence": _np(outcome.confidence).astype(np.float64),
            "exit": exits,
            "at_edge": at_edge,
            "correct": pred == label_arr,
            "macs": macs,
            "payload_bytes": np.where(at_edge, 0, int(payload_bytes_per_offload)).astype(np.int64),
            "time_ms": np.nan,
            "outcome": "ok",
        },
        index=pd.RangeIndex(n),
    )
    return df.astype(RECORD_DTYPES)


def sweep_records(
    ee_probs: list[torch.Tensor],
    conv_probs: torch.Tensor | None,
    labels: Any,
    sample_ids: Any,
    *,
    costs: CostTable,
    conv_macs: int | None,
    ee_spec: ModelSpec,
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    strategies: Sequence[str],
    meta: dict,
    payload_bytes: Sequence[int],
) -> pd.DataFrame:
    """Records of every (strategy, alpha, k) of one level, as `evaluate_run` builds them from probabilities."""
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    where = {"dataset": meta["dataset"], "distortion": meta["distortion"], "level": float(meta["level"])}
    out = RecordColumns()
    for strategy in strategies:
        if strategy == CONVENTIONAL:
            if conv_probs is None or conv_macs is None:
                raise ValueError("strategy 'conventional' needs conv_probs and conv_macs")
            out.extend(
                conventional_columns(
                    conv_probs,
                    label_arr,
                    ids,
                    conv_macs=conv_macs,
                    alphas=alphas,
                    edge_branches=edge_branches,
                    where=where,
                    payload_bytes=payload_bytes[0],
                )
            )
        else:
            out.extend(
                policy_columns(
                    ee_probs,
                    label_arr,
                    ids,
                    costs=costs,
                    ee_spec=ee_spec,
                    strategy=strategy,
                    alphas=alphas,
                    edge_branches=edge_branches,
                    where=where,
                    payload_bytes=payload_bytes,
                )
            )
    return out.frame()


def json_list_payload(tensor: torch.Tensor) -> bytes:
    """The authors' format (`tensor.tolist()` in JSON), kept ONLY as the benchmark's baseline."""
    return json.dumps({"data": tensor.detach().cpu().tolist(), "shape": list(tensor.shape)}).encode()


def decode_json_list(body: bytes) -> torch.Tensor:
    """Decode `json_list_payload` back to a float32 tensor (benchmark baseline only)."""
    return torch.tensor(json.loads(body)["data"], dtype=torch.float32)


def _split_probs(
    net: nn.Module, spec: ModelSpec, images: torch.Tensor, prep: Preprocessing, k: int, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Calibrated probabilities of edge exits 1..k and the final exit, run as edge_part(k) + cloud_part(k)."""
    device = next(net.parameters()).device
    temps = None if spec.temperatures is None else [*spec.temperatures[:k], spec.temperatures[-1]]
    edge: list[list[torch.Tensor]] = [[] for _ in range(k)]
    final: list[torch.Tensor] = []
    net.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = prep.normalize(images[start : start + batch_size].to(device))
            logits, h = net.edge_part(x, k)
            probs = calibrated_probs([*logits, net.cloud_part(h, k)], temps)
            for i in range(k):
                edge[i].append(probs[i].cpu())
            final.append(probs[-1].cpu())
    return [torch.cat(e) for e in edge], torch.cat(final)


def direct_records(
    net: nn.Module,
    spec: ModelSpec,
    conv_net: nn.Module | None,
    conv_spec: ModelSpec | None,
    images: torch.Tensor,
    labels: Any,
    sample_ids: Any,
    *,
    grid: Grid,
    costs: CostTable,
    conv_macs: int | None,
    payload_bytes: Sequence[int],
    dataset: str,
    batch_size: int,
    conv_images: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Reference records the authors' way: distort, run the model and decide anew for every configuration.

    No cache and no `apply_policy`/`executed_macs`: exits are decided step by step with `Policy.decide`
    and MACs come from the cost table (`macs_to_exit(i)`, `macs_offloaded(k)`). `images` are the
    undistorted uint8 test images (`conv_images` for the conventional DNN when its input size differs).
    Rows come in `evaluate_run`'s order: level, strategy, alpha, k, sample.
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    prep = spec.preprocessing
    frames: list[pd.DataFrame] = []
    configs = list(itertools.product(grid.levels, grid.strategies, grid.alphas, grid.edge_branches))
    for level, strategy, alpha, k in tqdm(configs, desc="direct", unit="config", disable=None, leave=False):
        if strategy == "conventional":
            if conv_net is None or conv_spec is None or conv_macs is None:
                raise ValueError("strategy 'conventional' needs conv_net, conv_spec and conv_macs")
            src = images if conv_images is None else conv_images
            x = distort(src, grid.distortion, level, seeds=ids.tolist())
            _, final = _split_probs(conv_net, conv_spec, x, conv_spec.preprocessing, 0, batch_size)
            conf, pred = final.max(dim=1)
            exit_ = np.full(ids.shape, CLOUD, dtype=np.int64)
            macs = np.full(ids.shape, conv_macs, dtype=np.int64)
            payload = payload_bytes[0]
        else:
            x = distort(images, grid.distortion, level, seeds=ids.tolist())
            edge, final = _split_probs(net, spec, x, prep, k, batch_size)
            val = spec.exit_val_accuracy
            policy = policy_for(
                strategy, alpha, spec.ensemble_weights, branch_accuracies=val[:-1] if val else None
            )
            conf, pred = final.max(dim=1)
            exit_t = torch.full(pred.shape, CLOUD, dtype=torch.int64)
            pending = torch.ones(pred.shape, dtype=torch.bool)
            for i in range(1, k + 1):  # as the edge runner does: decide after each branch
                d = policy.decide(edge[:i], k)
                take = pending & d.stop
                exit_t[take] = i
                pred[take] = d.label[take]
                conf = torch.where(take, d.confidence, conf.to(torch.float32))
                pending &= ~take
            exit_ = exit_t.numpy()
            to_exit = np.array([0] + [costs.macs_to_exit(i) for i in range(1, k + 1)], dtype=np.int64)
            macs = np.where(exit_ == CLOUD, costs.macs_offloaded(k), to_exit[exit_])
            payload = payload_bytes[k]
        pred_np = pred.numpy().astype(np.int64)
        at_edge = exit_ != CLOUD
        frames.append(
            pd.DataFrame(
                {
                    "dataset": dataset,
                    "distortion": grid.distortion,
                    "level": float(level),
                    "strategy": strategy,
                    "alpha": float(alpha),
                    "k": int(k),
                    "sample_id": ids,
                    "label": label_arr,
                    "prediction": pred_np,
                    "confidence": conf.to(torch.float32).numpy().astype(np.float64),
                    "exit": exit_,
                    "at_edge": at_edge,
                    "correct": pred_np == label_arr,
                    "macs": macs,
                    "payload_bytes": np.where(at_edge, 0, payload),
                    "time_ms": np.nan,
                    "outcome": "ok",
                }
            ).astype(RECORD_DTYPES)
        )
    return concat_records(frames)


def edge_probs(runtime: Any, x_uint8: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Calibrated probabilities [1, C] of exits 1..k for one uint8 image, stage by stage through `runtime`."""
    spec = runtime.spec
    h = spec.preprocessing.normalize(x_uint8).unsqueeze(0)
    probs = []
    with torch.inference_mode():
        for i in range(1, k + 1):
            h, logits = runtime.edge_stage(i, h)
            probs.append(calibrate(logits, spec.temperature(i)))
    return probs


def policy_scores(
    strategy: str, probs: Sequence[torch.Tensor], k: int, ensemble_weights: Sequence[float] | None
) -> list[float]:
    """What the policy compares with alpha at each exit where it may stop (stop iff score >= alpha): the top
    probability (ee), 1 - the normalised entropy (entropy), the ensemble's top probability at exit k."""
    if strategy == "ee":
        return [float(p.max()) for p in probs[:k]]
    if strategy == "entropy":
        out = []
        for p in probs[:k]:
            entropy = -torch.special.xlogy(p.double(), p.double()).sum()
            out.append(1.0 - float(entropy) / float(np.log(p.shape[-1])))
        return out
    if strategy in ("ensemble", "ensemble-mean"):
        if strategy == "ensemble":
            assert ensemble_weights is not None
            w = [float(v) for v in ensemble_weights[:k]]
            w = [v / sum(w) for v in w]
        else:
            w = [1.0 / k] * k
        p_e = sum(wi * p.double() for wi, p in zip(w, probs[:k], strict=True))
        return [float(p_e.max())]
    raise ValueError(f"no alpha score for strategy {strategy!r}")
