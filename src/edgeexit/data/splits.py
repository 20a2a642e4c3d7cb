"""Deterministic, stratified, disjoint train/validation/test splits, persisted as JSON."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.atomic import atomic_write_bytes
from edgeexit.errors import UserError

log = logging.getLogger(__name__)

SUBSETS = ("train", "val", "test")
_FORMAT = "edgeexit-split"
_VERSION = 1


def _index_array(values: Any, subset: str) -> np.ndarray:
    """A sorted, read-only int64 copy of `values`; UserError unless they are unique non-negative ints."""
    if isinstance(values, np.ndarray):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise UserError(f"split {subset!r}: indices must be integers, got dtype {values.dtype}")
        arr = values.astype(np.int64).reshape(-1)
    else:
        items = list(values)
        if any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in items):
            raise UserError(f"split {subset!r}: indices must be integers")
        arr = np.asarray(items, dtype=np.int64).reshape(-1)
    arr = np.sort(arr)
    if arr.size and arr[0] < 0:
        raise UserError(f"split {subset!r}: indices must be >= 0, got {int(arr[0])}")
    if np.any(arr[1:] == arr[:-1]):
        raise UserError(f"split {subset!r}: indices must be unique")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays (int64, sorted, disjoint) of the train, validation and test subsets of one dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int

    def __post_init__(self) -> None:
        for name in SUBSETS:
            object.__setattr__(self, name, _index_array(getattr(self, name), name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise UserError(f"split seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        for i, a in enumerate(SUBSETS):
            for b in SUBSETS[i + 1 :]:
                both = np.intersect1d(getattr(self, a), getattr(self, b))
                if both.size:
                    raise UserError(f"split subsets {a!r} and {b!r} overlap ({both.size} shared indices)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return self.seed == other.seed and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in SUBSETS
        )

    def __hash__(self) -> int:
        return hash((self.seed, *(getattr(self, n).tobytes() for n in SUBSETS)))

    def subset(self, name: str) -> np.ndarray:
        """The index array of subset `name` ('train', 'val' or 'test')."""
        if name not in SUBSETS:
            raise UserError(f"unknown split subset {name!r}; known: {', '.join(SUBSETS)}")
        return getattr(self, name)

    def check_size(self, n: int) -> None:
        """Raise a UserError if an index does not fit a dataset of `n` samples (a split of another dataset)."""
        top = max((int(a[-1]) for a in (self.train, self.val, self.test) if a.size), default=-1)
        if top >= n:
            raise UserError(
                f"split refers to index {top} but the dataset has {n} samples; is it another dataset's?"
            )

    def save(self, path: Path) -> None:
        """Write the split as JSON, atomically (temp file in the same directory, then rename)."""
        doc = {"format": _FORMAT, "version": _VERSION, "seed": self.seed}
        doc.update({n: getattr(self, n).tolist() for n in SUBSETS})
        atomic_write_bytes(path, json.dumps(doc).encode())

    @classmethod
    def load(cls, path: Path) -> Split:
        """Read a split written by `save`; a missing, corrupt or inconsistent file raises a UserError."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"split file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"split file {path} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise UserError(f'split file {path} is not an edgeexit split (expected "format": "{_FORMAT}")')
        missing = [k for k in ("seed", *SUBSETS) if k not in doc]
        if missing:
            raise UserError(f"split file {path} lacks {', '.join(missing)}")
        if not all(isinstance(doc[n], list) for n in SUBSETS):
            raise UserError(f"split file {path}: train/val/test must be lists of integers")
        try:
            return cls(doc["train"], doc["val"], doc["test"], doc["seed"])
        except UserError as e:
            raise UserError(f"split file {path}: {e}") from None


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise UserError(f"split fractions must be 3 numbers, got {fractions!r}") from None
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or not math.isclose(sum(fr), 1.0):
        raise UserError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions!r}")
    return fr  # type: ignore[return-value]


def make_split(
    labels: np.ndarray, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Split:
    """Stratified split: each class is permuted with the seed and cut by `fractions` (train, val, test)."""
    fr = _check_fractions(fractions)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise UserError("make_split needs a non-empty 1-D array of labels")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"split seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in SUBSETS}
    for c in np.unique(labels):  # sorted classes, so the draw order is fixed
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = idx.size
        # Each of train and val is rounded independently (error <= 0.5), so test is off by at most 1.
        n_train = round(n * fr[0])
        n_val = min(round(n * fr[1]), n - n_train)
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    for name, f in zip(SUBSETS, fr, strict=True):
        if f > 0 and arrays[name].size == 0:
            raise UserError(
                f"split leaves {name!r} empty: {labels.size} samples are too few for fractions {fractions}"
            )
    split = Split(arrays["train"], arrays["val"], arrays["test"], int(seed))
    log.info(
        "split seed %d: %d train, %d val, %d test", seed, split.train.size, split.val.size, split.test.size
    )
    return split
