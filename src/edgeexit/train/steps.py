"""The steps every training shares, from `edgeexit train` (run directory, DDP, resume) and from `edgeexit.fit`
(the user's own DataLoader): one pass of joint training, logits over batches, per-exit loss and accuracy sums.

Batches are (images, labels). uint8 images are normalised with the model's `spec.preprocessing`, as every
other path does (the servers, the sweep); float images are taken as already normalised with the spec's mean
and std (torchvision's `ToTensor()` then `Normalize(spec.mean, spec.std)`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.data.preprocess import Preprocessing
from edgeexit.errors import UserError
from edgeexit.progress import progress

__all__ = ["ExitScores", "as_input", "batch_sums", "scores", "train_epoch", "batches_logits", "weighted_ce"]

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def as_input(x: torch.Tensor, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """Network input from a batch: uint8 normalised by `prep`, float taken as already normalised."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise UserError(f"expected image batches as tensors [B, 3, H, W], got {getattr(x, 'shape', type(x))}")
    x = x.to(device)
    return prep.normalize(x) if x.dtype == torch.uint8 else x.float()


def weighted_ce(
    logits: list[torch.Tensor], y: torch.Tensor, w: list[float], reduction: str = "mean"
) -> torch.Tensor:
    """sum_i w_i CE(logits_i, y): the joint training loss."""
    total = None
    for wi, z in zip(w, logits, strict=True):
        term = wi * F.cross_entropy(z, y, reduction=reduction)
        total = term if total is None else total + term
    assert total is not None
    return total


@torch.no_grad()
def batch_sums(logits: list[torch.Tensor], y: torch.Tensor, w: list[float]) -> torch.Tensor:
    """float64 CPU [weighted loss sum, n, CE sum per exit..., correct per exit...] of one batch (summable)."""
    ce = [F.cross_entropy(z.float(), y, reduction="sum").double().cpu() for z in logits]
    correct = [(z.argmax(1) == y).sum().double().cpu() for z in logits]
    weighted = sum(wi * c for wi, c in zip(w, ce, strict=True))
    return torch.stack(
        [torch.as_tensor(weighted, dtype=torch.float64), torch.tensor(y.numel()), *ce, *correct]
    )


@dataclass(frozen=True)
class ExitScores:
    """Mean weighted loss, and per exit (final last) the mean cross-entropy and the accuracy."""

    loss: float
    exit_loss: list[float]
    exit_accuracy: list[float]
    n: int


def scores(sums: torch.Tensor) -> ExitScores:
    """`ExitScores` from summed `batch_sums` (over batches, and over ranks)."""
    n_exits = (sums.numel() - 2) // 2
    n = max(float(sums[1]), 1.0)
    return ExitScores(
        float(sums[0]) / n,
        [float(v) / n for v in sums[2 : 2 + n_exits]],
        [float(v) / n for v in sums[2 + n_exits :]],
        int(sums[1]),
    )


def train_epoch(
    model: nn.Module,
    batches: Batches,
    *,
    opt: torch.optim.Optimizer,
    weights: list[float],
    to_input: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
) -> torch.Tensor:
    """One pass of joint training over `batches`; returns their summed `batch_sums` (float64, CPU).

    A batch of one sample is skipped (BatchNorm cannot normalise it in training), logged once.
    """
    model.train()
    sums = torch.zeros(2 + 2 * len(weights), dtype=torch.float64)
    skipped = False
    bar = progress(batches, total=total, desc=desc, unit="batch", enabled=enabled)
    for x, y in bar:
        if y.numel() == 1:
            if not skipped:
                log.info("%s: skipped a training batch of 1 sample (BatchNorm needs at least 2)", desc)
            skipped = True
            continue
        y = y.to(device)
        logits = model(to_input(x))
        loss = weighted_ce(logits, y, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += batch_sums(logits, y, weights)
        bar.set_postfix(loss=f"{sums[0].item() / max(sums[1].item(), 1.0):.4f}", refresh=False)
    bar.close()
    return sums


@torch.no_grad()
def batches_logits(
    net: nn.Module, batches: Batches, to_input: Callable[[torch.Tensor], torch.Tensor], desc: str = "logits"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every exit (float32, CPU, final last) and the labels over `batches`, in eval mode."""
    net.eval()
    chunks: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    for x, y in progress(batches, desc=desc, unit="batch"):
        chunks.append([z.float().cpu() for z in net(to_input(x))])
        labels.append(torch.as_tensor(y).cpu())
    if not chunks:
        raise UserError("no images to compute logits on: the loader is empty")
    return [torch.cat(c) for c in zip(*chunks, strict=True)], torch.cat(labels).long()
