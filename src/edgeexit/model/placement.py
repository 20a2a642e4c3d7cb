"""Where side branches go along the backbone, from cumulative MACs (SPINN) or explicit indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeexit.errors import UserError

__all__ = ["PLACEMENTS", "place_branches"]

PLACEMENTS = ("linear", "pareto", "explicit")


def _targets(rule: str, n: int) -> list[float]:
    if rule == "linear":  # SPINN, the paper's: equidistant in MACs
        return [i / (n + 1) for i in range(1, n + 1)]
    if rule == "pareto":  # denser early: 1 - 0.8^i
        return [1 - 0.8**i for i in range(1, n + 1)]
    raise UserError(f"unknown placement {rule!r}; known: {', '.join(PLACEMENTS)}")


def place_branches(
    block_macs: Sequence[int],
    n: int,
    rule: str = "linear",
    explicit: Sequence[int] | None = None,
    head_macs: int = 0,
) -> list[int]:
    """Indices of the blocks after which the `n` branches sit (strictly increasing, never the last block).

    `linear`/`pareto`: branch i follows the block whose cumulative MACs (as a share of the backbone's total,
    head included) is closest to the rule's i-th target. `explicit`: the given block indices.
    """
    n_blocks = len(block_macs)
    if rule == "explicit" or explicit is not None:
        positions = [int(i) for i in (explicit or [])]
        if not positions:
            raise UserError("explicit placement needs at least one block index")
        if any(p < 0 or p >= n_blocks - 1 for p in positions):
            raise UserError(f"branch block indices must lie in 0..{n_blocks - 2}, got {positions}")
        if sorted(set(positions)) != positions:
            raise UserError(f"branch block indices must be strictly increasing, got {positions}")
        return positions
    if n < 0:
        raise UserError(f"the number of branches must be >= 0, got {n}")
    if n >= n_blocks:
        raise UserError(f"{n} branches need more than {n_blocks} blocks: at most {n_blocks - 1} branches fit")
    cumulative = np.cumsum(block_macs) / (sum(block_macs) + head_macs)
    positions: list[int] = []
    for j, target in enumerate(_targets(rule, n)):
        # the last block is excluded (a branch there would duplicate the final exit), and enough blocks
        # must stay free after this one for the branches still to place
        low = positions[-1] + 1 if positions else 0
        high = n_blocks - 1 - (n - 1 - j)
        candidates = np.arange(low, high)
        positions.append(int(candidates[np.argmin(np.abs(cumulative[candidates] - target))]))
    return positions
