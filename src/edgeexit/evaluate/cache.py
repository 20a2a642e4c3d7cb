"""Calibrated probabilities of every exit, computed once per (checkpoint, distortion, level) and cached.

Layout: RUN_DIR/cache/<spec.content_hash>/<distortion>/<level>.safetensors, one tensor `exit_<i>` per exit
(final last, float as computed), the sample ids, and string metadata (distortion, level, sample-id digest,
preprocessing, exit count, content hash). The content hash covers the weights and the temperatures, so a
retrained or re-calibrated checkpoint looks in a fresh folder and never reuses stale probabilities.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from edgeexit.atomic import atomic_write_bytes
from edgeexit.inference import exit_probabilities
from edgeexit.model.spec import ModelSpec
from edgeexit.rundir import RunDir

__all__ = ["cached_probabilities", "cache_path", "is_cached", "load_cached", "sample_digest", "CACHE_FORMAT"]

log = logging.getLogger(__name__)

# v2: blur through scipy.ndimage (equal to v1 up to float rounding); v1 entries are never reused.
CACHE_FORMAT = "edgeexit-probs-v2"


def sample_digest(sample_ids: Any) -> str:
    """sha256 (16 hex digits) of the sample ids as int64, in order."""
    ids = np.ascontiguousarray(np.asarray(sample_ids, dtype=np.int64).reshape(-1))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def cache_path(run: RunDir, spec: ModelSpec, distortion: str, level: float) -> Path:
    """RUN_DIR/cache/<content hash>/<distortion>/<level>.safetensors (level as repr(float): exact)."""
    return run.cache / spec.content_hash / distortion / f"{float(level)!r}.safetensors"


def _metadata(which: str, spec: ModelSpec, level_key: dict, n_exits: int) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "model": which,
        "content_hash": spec.content_hash,
        "distortion": str(level_key["distortion"]),
        "level": repr(float(level_key["level"])),
        "samples": sample_digest(level_key["sample_ids"]),
        "n": str(len(np.asarray(level_key["sample_ids"]).reshape(-1))),
        "exits": str(n_exits),
        "preprocessing": json.dumps(spec.preprocessing.to_dict(), sort_keys=True),
    }


def _load_hit(path: Path, meta: dict[str, str], n_exits: int) -> list[torch.Tensor] | None:
    """The cached probabilities when `path` exists with exactly `meta`; None on a miss."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        stored = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError) as exc:
        log.warning("unreadable cache file %s (%s): recomputing", path, exc)
        return None
    if stored != meta:
        log.info("cache %s is for other inputs: recomputing", path)
        return None
    probs = [tensors.get(f"exit_{i}") for i in range(1, n_exits + 1)]
    n = int(meta["n"])
    if any(p is None or p.ndim != 2 or p.shape[0] != n for p in probs):
        log.warning("cache file %s lacks some exits: recomputing", path)
        return None
    return probs  # type: ignore[return-value]


def _check_key(level_key: dict) -> None:
    missing = [key for key in ("distortion", "level", "sample_ids") if key not in level_key]
    if missing:
        raise ValueError(f"level_key lacks {missing}; needs distortion, level and sample_ids")


def is_cached(run: RunDir, which: str, spec: ModelSpec, level_key: dict) -> bool:
    """Whether the cache holds these probabilities: metadata and every exit's shape, read from the header alone."""
    _check_key(level_key)
    meta = _metadata(which, spec, level_key, spec.num_exits)
    path = cache_path(run, spec, meta["distortion"], float(level_key["level"]))
    try:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError):
        return False
    n = int(meta["n"])
    shapes = [header.get(f"exit_{i}", {}).get("shape") for i in range(1, spec.num_exits + 1)]
    return header.get("__metadata__") == meta and all(
        isinstance(s, list) and len(s) == 2 and s[0] == n for s in shapes
    )


def load_cached(run: RunDir, which: str, spec: ModelSpec, level_key: dict) -> list[torch.Tensor] | None:
    """The cached probabilities of every exit (final last) for `level_key`; None when the cache lacks them."""
    _check_key(level_key)
    meta = _metadata(which, spec, level_key, spec.num_exits)
    return _load_hit(
        cache_path(run, spec, meta["distortion"], float(level_key["level"])), meta, spec.num_exits
    )


def cached_probabilities(
    run: RunDir,
    which: str,
    net: nn.Module,
    spec: ModelSpec,
    images_uint8: torch.Tensor,
    level_key: dict,
    batch_size: int,
) -> list[torch.Tensor]:
    """`inference.exit_probabilities` of already-distorted images, loaded from the run's cache when it holds them.

    `level_key` = {"distortion": name, "level": float, "sample_ids": ids of the images, in order}; a file
    whose metadata (content hash, distortion, level, sample-id digest, preprocessing, exits) differs is
    recomputed and overwritten. Written atomically.
    """
    if not spec.content_hash:
        raise ValueError("the model spec has no content hash: save the checkpoint before caching its outputs")
    _check_key(level_key)
    n_ids = len(np.asarray(level_key["sample_ids"]).reshape(-1))
    if n_ids != images_uint8.shape[0]:
        raise ValueError(f"{n_ids} sample ids for {images_uint8.shape[0]} images")
    n_exits = spec.num_exits  # a conventional spec has 0 branches: 1 exit
    meta = _metadata(which, spec, level_key, n_exits)
    path = cache_path(run, spec, meta["distortion"], float(level_key["level"]))
    hit = _load_hit(path, meta, n_exits)
    if hit is not None:
        log.debug("cache hit %s", path)
        return hit
    probs = exit_probabilities(net, spec, images_uint8, batch_size)
    tensors = {f"exit_{i}": p.contiguous() for i, p in enumerate(probs, start=1)}
    tensors["sample_ids"] = torch.from_numpy(np.array(level_key["sample_ids"], dtype=np.int64).reshape(-1))
    atomic_write_bytes(path, save_safetensors(tensors, metadata=meta))
    log.debug("cached %s", path)
    return probs
