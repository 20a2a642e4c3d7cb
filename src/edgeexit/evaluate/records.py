"""Per-sample records (one row per image x configuration) and the MACs each sample actually executed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from edgeexit.errors import UserError
from edgeexit.policy import CLOUD, Outcome

if TYPE_CHECKING:
    from edgeexit.model.costs import CostTable

# Column -> dtype. "str" columns hold Python strings; time_ms is NaN for offline records.
RECORD_DTYPES: dict[str, str] = {
    "dataset": "str",
    "distortion": "str",
    "level": "float64",
    "strategy": "str",
    "alpha": "float64",
    "k": "int64",
    "sample_id": "int64",
    "label": "int64",
    "prediction": "int64",
    "confidence": "float64",
    "exit": "int64",  # 1..k at the edge, 0 = cloud (final exit)
    "at_edge": "bool",
    "correct": "bool",
    "macs": "int64",
    "payload_bytes": "int64",  # 0 when answered at the edge
    "time_ms": "float64",
    "outcome": "str",  # "ok" | "offload_failed"
}
RECORD_COLUMNS: tuple[str, ...] = tuple(RECORD_DTYPES)
OUTCOMES = ("ok", "offload_failed")


def _np(x: Any) -> np.ndarray:
    """A 1-D numpy view of a tensor, array or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def executed_macs(
    costs: CostTable, outcome: Outcome, k: int, conventional_macs: int | None = None
) -> np.ndarray:
    """MACs each sample actually executed (int64 [B]); with `conventional_macs` every sample costs that.

    At edge exit i after h heads: stages 1..i + heads 1..h. Offloaded: every stage (edge and cloud) +
    the heads evaluated at the edge + the backbone's final head.
    """
    exits = _np(outcome.exit).astype(np.int64)
    heads = _np(outcome.heads).astype(np.int64)
    if conventional_macs is not None:
        if conventional_macs < 0:
            raise ValueError(f"conventional_macs must be >= 0, got {conventional_macs}")
        return np.full(exits.shape, int(conventional_macs), dtype=np.int64)
    n_exits = len(costs.exit_macs)
    if len(costs.stage_macs) != n_exits + 1:
        raise ValueError(
            f"cost table needs N+1={n_exits + 1} stages for N={n_exits} exits, got {len(costs.stage_macs)}"
        )
    if not 0 <= k <= n_exits:
        raise ValueError(f"k must be in [0, {n_exits}] for this cost table, got {k}")
    if exits.size and (exits.min() < 0 or exits.max() > k or heads.min() < 0 or heads.max() > k):
        raise ValueError(f"outcome exits and heads must lie in [0, k={k}]")
    stage_cum = np.concatenate([[0], np.cumsum(np.asarray(costs.stage_macs, dtype=np.int64))])
    exit_cum = np.concatenate([[0], np.cumsum(np.asarray(costs.exit_macs, dtype=np.int64))])
    edge = stage_cum[exits] + exit_cum[heads]
    cloud = stage_cum[-1] + exit_cum[heads] + np.int64(costs.head_macs)
    return np.where(exits == CLOUD, cloud, edge).astype(np.int64)


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
        macs = executed_macs(costs, outcome, k, conventional_macs)  # type: ignore[arg-type]
    else:
        if costs is None:
            raise ValueError(f"strategy {strategy!r} needs the EE-DNN's cost table")
        macs = executed_macs(costs, outcome, k)
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


def _check_columns(df: pd.DataFrame, where: str) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{where} lacks record columns {missing}; expected {list(RECORD_COLUMNS)}")


def write_records(df: pd.DataFrame, path: Path) -> None:
    """Write records as parquet, atomically (temp file in the same folder, then os.replace)."""
    _check_columns(df, "records to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_records(path: Path) -> pd.DataFrame:
    """Read records written by `write_records`; a missing file or foreign table raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"records file not found: {path} (expected a parquet file written by edgeexit)")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UserError(f"cannot read records parquet {path}: {exc}") from None
    _check_columns(df, f"records file {path}")
    return df


def concat_records(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate record frames into one with a fresh index and the record dtypes."""
    if not frames:
        return empty_records()
    return pd.concat(list(frames), ignore_index=True).astype(RECORD_DTYPES)


def empty_records() -> pd.DataFrame:
    """A records frame with no rows and the record columns/dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in RECORD_DTYPES.items()})
