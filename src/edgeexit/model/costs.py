"""Cost table: MACs per stage and exit, cumulative MACs to reach each exit, bytes at each split point."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
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

    def executed_macs(self, exits: np.ndarray, heads: np.ndarray, k: int) -> np.ndarray:
        """MACs each sample actually executed (int64), given where it was answered and how many heads ran.

        `exits[j]` is 1..k for an answer at that edge exit, 0 for the cloud (the final exit); `heads[j]` the
        edge exit heads evaluated. At edge exit i after h heads: stages 1..i + heads 1..h. Offloaded: every
        stage (edge and cloud) + the heads evaluated at the edge + the backbone's final head. One rule for
        the offline records and the edge runner.
        """
        exits = np.asarray(exits, dtype=np.int64).reshape(-1)
        heads = np.asarray(heads, dtype=np.int64).reshape(-1)
        n_exits = len(self.exit_macs)
        if len(self.stage_macs) != n_exits + 1:
            raise ValueError(
                f"cost table needs N+1={n_exits + 1} stages for N={n_exits} exits, got {len(self.stage_macs)}"
            )
        if not 0 <= k <= n_exits:
            raise ValueError(f"k must be in [0, {n_exits}] for this cost table, got {k}")
        if exits.size and (exits.min() < 0 or exits.max() > k or heads.min() < 0 or heads.max() > k):
            raise ValueError(f"exits and heads must lie in [0, k={k}]")
        stage_cum = np.concatenate([[0], np.cumsum(np.asarray(self.stage_macs, dtype=np.int64))])
        exit_cum = np.concatenate([[0], np.cumsum(np.asarray(self.exit_macs, dtype=np.int64))])
        edge = stage_cum[exits] + exit_cum[heads]
        cloud = stage_cum[-1] + exit_cum[heads] + np.int64(self.head_macs)
        return np.where(exits == 0, cloud, edge).astype(np.int64)

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
        p = next(net.parameters(), None)  # the probe goes where the net is
        x = torch.zeros(1, 3, input_size, input_size, device=p.device if p is not None else None)
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
