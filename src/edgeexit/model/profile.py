"""MAC profiling with torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 x MACs).

FlopCounterMode counts matrix multiplications and convolutions; element-wise work (BatchNorm, activations,
pooling) is not counted, as in the usual published MAC figures (torchvision: MobileNetV2 = 0.30 GMACs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["module_macs", "BlockProfile", "profile_blocks"]


def module_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """MACs of one forward of `module` on `x` (per sample if x has batch 1), and its output."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = module(x)
    return counter.get_total_flops() // 2, y


@dataclass(frozen=True)
class BlockProfile:
    """Per-block MACs and output shapes (batch dimension excluded) at one input size."""

    input_shape: tuple[int, ...]
    block_macs: list[int]
    block_shapes: list[tuple[int, ...]]
    head_macs: int

    @property
    def total_macs(self) -> int:
        """The whole backbone: every block and the final head."""
        return sum(self.block_macs) + self.head_macs


def profile_blocks(blocks: Sequence[nn.Module], head: nn.Module, input_size: int) -> BlockProfile:
    """Run a 1-image probe through the blocks in eval mode, recording each block's MACs and output shape."""
    was_training = [b.training for b in blocks] + [head.training]
    for m in [*blocks, head]:
        m.eval()
    x = torch.zeros(1, 3, input_size, input_size)
    macs, shapes = [], []
    try:
        for block in blocks:
            m, x = module_macs(block, x)
            macs.append(m)
            shapes.append(tuple(x.shape[1:]))
        head_macs, _ = module_macs(head, x)
    finally:
        for m, flag in zip([*blocks, head], was_training, strict=True):
            m.train(flag)
    return BlockProfile((3, input_size, input_size), macs, shapes, head_macs)
