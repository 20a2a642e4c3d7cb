"""EarlyExitNet: a backbone cut into stages, one exit head after each stage but the last, and the final head.

One loop over stages and exits serves every use: `forward` (all exits, for training and the offline cache),
`edge_part`/`cloud_part` (the split deployment), and `run_stage`/`run_exit` (the edge runner's stepwise
inference, which calls the policy between exits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["EarlyExitNet", "group_stages"]


def group_stages(blocks: Sequence[nn.Module], branch_blocks: Sequence[int]) -> list[nn.Sequential]:
    """Group backbone blocks into stages ending after each branch block; the last stage holds the rest."""
    bounds = [b + 1 for b in branch_blocks] + [len(blocks)]
    stages, start = [], 0
    for end in bounds:
        stages.append(nn.Sequential(*blocks[start:end]))
        start = end
    return stages


class EarlyExitNet(nn.Module):
    """`stages[i]` feeds `exits[i]` (for i < N) and `stages[i+1]`; `head` follows the last stage."""

    def __init__(self, stages: Sequence[nn.Module], exits: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        if len(stages) != len(exits) + 1:
            raise ValueError(
                f"need one more stage than exits, got {len(stages)} stages and {len(exits)} exits"
            )
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.head = head

    @property
    def num_branches(self) -> int:
        """N, the number of side branches (the final exit not counted)."""
        return len(self.exits)

    def _check_k(self, k: int) -> None:
        if not 0 <= k <= self.num_branches:
            raise ValueError(f"split point k must be in 0..{self.num_branches}, got {k}")

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i (1-based, 1..N+1)."""
        return self.stages[i - 1](x)

    def run_exit(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of side branch i (1-based, 1..N) on the output of stage i."""
        return self.exits[i - 1](h)

    def edge_part(self, x: torch.Tensor, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stages 1..k with exits 1..k: the exit logits and the intermediate tensor sent on offload."""
        self._check_k(k)
        logits = []
        for i in range(1, k + 1):
            x = self.run_stage(i, x)
            logits.append(self.run_exit(i, x))
        return logits, x

    def cloud_part(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Stages k+1..N+1 and the final head on the intermediate tensor after stage k: the final logits."""
        self._check_k(k)
        for i in range(k + 1, len(self.stages) + 1):
            h = self.run_stage(i, h)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, the final exit last."""
        logits, h = self.edge_part(x, self.num_branches)
        return [*logits, self.cloud_part(h, self.num_branches)]
