"""Per-sample records: one row per image x configuration, the schema shared by the offline and online paths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from edgeexit.atomic import atomic_write_with
from edgeexit.errors import UserError

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


def _check_columns(df: pd.DataFrame, where: str) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{where} lacks record columns {missing}; expected {list(RECORD_COLUMNS)}")


def write_records(df: pd.DataFrame, path: Path) -> None:
    """Write records as parquet, atomically (temp file in the same folder, then os.replace)."""
    _check_columns(df, "records to write")
    frame = df.reset_index(drop=True)
    atomic_write_with(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


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
