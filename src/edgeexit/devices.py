"""Which torch device a run uses."""

from __future__ import annotations

import torch

from edgeexit.errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; accepted: auto, cpu, cuda")
    return torch.device(name)
