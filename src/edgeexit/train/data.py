"""Training data: uint8 subsets (in memory or lazy), logits of every exit over a subset, seeded augmentation.

Every random draw of an epoch comes from generators seeded by (seed, epoch, rank, stream) through `seed_of`,
so an epoch's batch order and augmentation depend only on the seed, never on what ran before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.config import TrainConfig
from edgeexit.data import ImageDataset, Preprocessing, SplitImages, distort, load_uint8
from edgeexit.errors import UserError
from edgeexit.inference import batch_logits
from edgeexit.progress import progress

__all__ = [
    "SplitData",
    "load_split_data",
    "drop_lone_last",
    "collect_logits",
    "augment",
    "seed_of",
    "generator",
    "DIGIT_DATASETS",
]

DIGIT_DATASETS = frozenset({"mnist5k", "digits"})  # shift augmentation only: a flipped digit is another digit


# ---- subsets -------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """uint8 images of one subset: preloaded in memory (small datasets) or read through a DataLoader (large)."""

    labels: torch.Tensor  # int64 [n]
    images: torch.Tensor | None = None  # uint8 [n, 3, H, W] when in memory
    lazy: SplitImages | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches in the given order of positions 0..n-1."""
        if self.images is not None:
            for s in range(0, order.numel(), batch_size):
                idx = order[s : s + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        assert self.lazy is not None
        groups = [order[s : s + batch_size].tolist() for s in range(0, order.numel(), batch_size)]
        loader = torch.utils.data.DataLoader(self.lazy, batch_sampler=groups, num_workers=self.num_workers)
        yield from loader


def load_split_data(
    ds: ImageDataset, indices: np.ndarray, prep: Preprocessing, num_workers: int = 0
) -> SplitData:
    """In-memory datasets are preloaded as one uint8 tensor (fast batching); file-backed ones stay lazy."""
    labels = torch.as_tensor(ds.labels[np.asarray(indices, dtype=np.int64)], dtype=torch.int64)
    if ds.arrays is not None:
        return SplitData(labels, images=load_uint8(ds, indices, prep))
    return SplitData(labels, lazy=SplitImages(ds, indices, prep), num_workers=num_workers)


def drop_lone_last(order: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`order` without its last position when that would make a last batch of exactly one sample.

    BatchNorm cannot normalise a training batch of one (one value per channel after a global pool); every
    other order is returned as it is, so batches and random draws stay those of a run without the rule.
    """
    n = order.numel()
    if batch_size > 1 and n % batch_size == 1:
        if n == 1:
            raise UserError(
                "the training split (per process) holds 1 image: BatchNorm needs batches of at least 2; "
                "add images or use fewer processes"
            )
        return order[:-1]
    return order


def collect_logits(
    net: nn.Module,
    data: SplitData,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int = 256,
    order: torch.Tensor | None = None,
    desc: str = "logits",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every exit (float32, CPU, final last) and the labels, in eval mode, for `order` (default all)."""
    net.eval()
    order = torch.arange(len(data)) if order is None else order
    chunks: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    n_batches = math.ceil(order.numel() / batch_size)
    for x, y in progress(data.batches(order, batch_size), total=n_batches, desc=desc, unit="batch"):
        chunks.append([z.float().cpu() for z in batch_logits(net, prep, x.to(device))])
        labels.append(y)
    if not chunks:
        raise UserError("no images to compute logits on: the subset is empty")
    return [torch.cat(c) for c in zip(*chunks, strict=True)], torch.cat(labels)


# ---- seeds and augmentation ----------------------------------------------------------------------------


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, rank, stream): independent streams, no collisions."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def generator(*parts: int) -> torch.Generator:
    """A torch generator seeded with `seed_of(*parts)`."""
    return torch.Generator().manual_seed(seed_of(*parts))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad 2-4 px and crop back at a random offset per image (small translations, no flip)."""
    b, _, h, w = x.shape
    p = max(2, min(4, round(min(h, w) / 8)))
    padded = F.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def _crop_box(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (scale 0.35-1, aspect 3/4-4/3) drawn from `gen`; centre crop fallback."""
    area = h * w
    for _ in range(10):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = area * (0.35 + 0.65 * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    return 0, 0, h, w


def _resized_crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop and horizontal flip per image (natural images)."""
    from torchvision.transforms.v2 import functional as TF

    b, _, h, w = x.shape
    out = torch.empty_like(x)
    flips = (torch.rand(b, generator=gen) < 0.5).tolist()
    for i in range(b):
        top, left, ch, cw = _crop_box(h, w, gen)
        img = TF.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=True)
        out[i] = img.flip(-1) if flips[i] else img
    return out


def augment(
    x: torch.Tensor, dataset: str, cfg: TrainConfig, levels: list[float], gen: torch.Generator
) -> torch.Tensor:
    """Training-only augmentation on a uint8 batch, then (when asked) a distortion at a random level."""
    if cfg.augment:
        x = _shift(x, gen) if dataset in DIGIT_DATASETS else _resized_crop_flip(x, gen)
    if cfg.distortion:
        level = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        seeds = torch.randint(0, 2**31 - 1, (x.shape[0],), generator=gen).tolist()
        x = distort(x, cfg.distortion, level, seeds)
    return x
