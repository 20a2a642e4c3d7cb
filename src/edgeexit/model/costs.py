"""Cost table: MACs per stage and exit, cumulative MACs to reach each exit, bytes at each split point."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.profile import module_macs

__all__ = ["CostTable", "cost_table", "PRECISION_BYTES"]

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class CostTable:
    """MACs (multiply-accumulates; FLOPs = 2 x MACs) of each part of an EarlyExitNet, per sample."""

    input_shape: list[int]
    stage_macs: list[int]  # N+1 stages
    exit_macs: list[int]  # N side-branch heads
    head_macs: int  # the final head
    split_shapes: list[list[int]]  # intermediate tensor after stage k, k = 1..N
    split_bytes: list[int]  # fp32 bytes of that tensor

    @property
    def total_macs(self) -> int:
        """The backbone alone: every stage and the final head, no side branches."""
        return sum(self.stage_macs) + self.head_macs

    @property
    def input_bytes(self) -> int:
        """Bytes of the raw uint8 input image."""
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    def macs_to_exit(self, i: int) -> int:
        """Cumulative MACs to reach side exit i: stages 1..i and exit heads 1..i evaluated on the way."""
        return sum(self.stage_macs[:i]) + sum(self.exit_macs[:i])

    def macs_offloaded(self, k: int) -> int:
        """MACs of a sample offloaded after k edge exits: every stage, k exit heads and the final head."""
        return self.total_macs + sum(self.exit_macs[:k])

    def split_bytes_at(self, k: int, precision: str = "fp32") -> int:
        """Bytes of the intermediate tensor after stage k at a wire precision."""
        return self.split_bytes[k - 1] // 4 * PRECISION_BYTES[precision]

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def cost_table(net: EarlyExitNet, input_size: int) -> CostTable:
    """Measure every stage, exit head and the final head with one 1-image probe in eval mode."""
    was_training = net.training
    net.eval()
    try:
        x = torch.zeros(1, 3, input_size, input_size)
        input_shape = list(x.shape[1:])
        stage_macs, exit_macs, shapes = [], [], []
        for i in range(1, len(net.stages) + 1):
            m, x = module_macs(net.stages[i - 1], x)
            stage_macs.append(m)
            if i <= net.num_branches:
                exit_macs.append(module_macs(net.exits[i - 1], x)[0])
                shapes.append(list(x.shape[1:]))
        head_macs = module_macs(net.head, x)[0]
    finally:
        net.train(was_training)
    split_bytes = [4 * int(torch.Size(s).numel()) for s in shapes]
    return CostTable(input_shape, stage_macs, exit_macs, head_macs, shapes, split_bytes)
