"""Checkpoints: `weights.safetensors` + `spec.json` in one directory, identified by a content hash.

Loading never unpickles. Both files are written atomically, weights first, so a crash leaves either the old
checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from edgeexit.atomic import atomic_write_bytes
from edgeexit.errors import UserError
from edgeexit.model.build import build_model
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.spec import ModelSpec

__all__ = ["save_checkpoint", "load_checkpoint", "load_spec", "content_hash", "WEIGHTS", "SPEC"]

WEIGHTS = "weights.safetensors"
SPEC = "spec.json"


def content_hash(weights: bytes, spec: ModelSpec) -> str:
    """sha256 over the weight bytes and the spec fields that change what the model computes."""
    h = hashlib.sha256(weights)
    h.update(json.dumps(spec.identity(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _state_bytes(net: EarlyExitNet) -> bytes:
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()})


def save_checkpoint(directory: Path, net: EarlyExitNet, spec: ModelSpec) -> ModelSpec:
    """Write weights and spec into `directory`; returns the spec with its content hash filled in."""
    directory = Path(directory)
    weights = _state_bytes(net)
    spec.content_hash = content_hash(weights, spec)
    atomic_write_bytes(directory / WEIGHTS, weights)
    atomic_write_bytes(directory / SPEC, spec.to_json().encode())
    return spec


def load_spec(directory: Path) -> ModelSpec:
    """Read `spec.json`; a missing or unreadable one is a UserError."""
    path = Path(directory) / SPEC
    if not path.is_file():
        raise UserError(f"no checkpoint in {directory}: expected {WEIGHTS} and {SPEC} (run `edgeexit train`)")
    try:
        return ModelSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt {path}: {exc}") from None


def load_checkpoint(directory: Path) -> tuple[EarlyExitNet, ModelSpec]:
    """The model (eval mode) and spec saved in `directory`, checked against the content hash."""
    directory = Path(directory)
    spec = load_spec(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has {SPEC} but no {WEIGHTS}")
    weights = path.read_bytes()
    if spec.content_hash and content_hash(weights, spec) != spec.content_hash:
        raise UserError(
            f"checkpoint {directory} is corrupt or was modified: content hash does not match {SPEC}"
        )
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError) as exc:
        raise UserError(f"corrupt {path}: {exc}") from None
    net = build_model(spec)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"weights in {path} do not match {SPEC}: {first}") from None
    net.eval()
    return net, spec


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
