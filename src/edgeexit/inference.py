"""The inference core: uint8 images -> logits and calibrated probabilities of every exit.

Training (validation loss, temperature fitting), the offline evaluation (the cached sweep) and serving (the
edge runner, the cloud app) all stand on this module. It is the only place that applies a model's
temperatures (`calibrate`), and it prepares inputs only through the model's own `spec.preprocessing`, so
every path feeds the network the same tensors and reads the same probabilities.

It imports torch and the model layer only: the servers import it without pulling in pandas, matplotlib,
scipy or torchmetrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edgeexit.data.preprocess import Preprocessing
from edgeexit.errors import UserError
from edgeexit.model.spec import ModelSpec
from edgeexit.progress import progress

__all__ = [
    "calibrate",
    "calibrate_numpy",
    "calibrated_probs",
    "eval_mode",
    "batch_logits",
    "exit_probabilities",
    "device_of",
]


def calibrate(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """softmax(logits / T) over the last dimension; T None (an uncalibrated model) -> plain softmax."""
    if temperature is None:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits / float(temperature), dim=-1)


def calibrate_numpy(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    """`calibrate` in numpy (runtime onnx's edge path): the same formula in the logits' precision; it agrees
    with torch's softmax to rounding (~1e-7 in float32), not bit for bit."""
    z = logits if temperature is None else logits / logits.dtype.type(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def calibrated_probs(
    logits: Sequence[torch.Tensor], temperatures: Sequence[float] | None
) -> list[torch.Tensor]:
    """`calibrate` for each exit's logits with its own temperature; None -> plain softmax everywhere."""
    if temperatures is None:
        return [calibrate(z, None) for z in logits]
    if len(temperatures) != len(logits):
        raise UserError(
            f"got {len(logits)} logits tensors but {len(temperatures)} temperatures; need one per exit"
        )
    if any(not math.isfinite(float(t)) or float(t) <= 0 for t in temperatures):
        raise UserError(f"temperatures must be finite and > 0, got {list(temperatures)}")
    return [calibrate(z, t) for z, t in zip(logits, temperatures, strict=True)]


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """`net` in eval mode for the block, then back to the mode it was in."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def device_of(net: nn.Module) -> torch.device:
    """The device of the module's parameters (CPU for a module without any)."""
    p = next(net.parameters(), None)
    return torch.device("cpu") if p is None else p.device


@torch.no_grad()
def batch_logits(net: nn.Module, prep: Preprocessing, images_uint8: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every exit (final last, on the net's device) for one uint8 batch [B, 3, H, W]; no grad."""
    return net(prep.normalize(images_uint8.to(device_of(net))))


def exit_probabilities(
    net: nn.Module, spec: ModelSpec, images_uint8: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Calibrated probabilities [n, C] (CPU) of every exit, final last: batched, in eval mode, no grad."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images_uint8.ndim != 4:
        raise ValueError(f"images must be uint8 [n, 3, H, W], got shape {tuple(images_uint8.shape)}")
    n_exits = spec.num_exits  # a conventional spec has 0 branches: 1 exit
    if spec.temperatures is not None and len(spec.temperatures) != n_exits:
        raise ValueError(f"spec has {len(spec.temperatures)} temperatures for {n_exits} exits")
    if images_uint8.shape[0] == 0:
        return [torch.empty((0, spec.num_classes)) for _ in range(n_exits)]
    prep = spec.preprocessing
    chunks: list[list[torch.Tensor]] = [[] for _ in range(n_exits)]
    with eval_mode(net):
        starts = range(0, images_uint8.shape[0], batch_size)
        for start in progress(starts, desc="forward", unit="batch"):
            logits = batch_logits(net, prep, images_uint8[start : start + batch_size])
            if len(logits) != n_exits:
                raise ValueError(f"model gave {len(logits)} exits, its spec says {n_exits}")
            for i, p in enumerate(calibrated_probs(logits, spec.temperatures)):
                chunks[i].append(p.cpu())
    return [torch.cat(c) for c in chunks]
