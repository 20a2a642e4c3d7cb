"""Side-branch exit heads, chosen by name in the config."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgeexit.registry import Registry

__all__ = ["HEADS", "make_exit_head"]

HEADS: Registry[Callable[[int, int], nn.Module]] = Registry("exit head")


@HEADS.register("bnpool")
def bnpool_head(in_channels: int, num_classes: int) -> nn.Module:
    """BatchNorm, ReLU, global average pool, Linear: cheap and trains well jointly (the default)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(in_channels, num_classes),
    )


@HEADS.register("pool")
def pool_head(in_channels: int, num_classes: int) -> nn.Module:
    """2x2 adaptive average pool and a Linear over the 4 cells (keeps coarse spatial layout)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(in_channels * 4, num_classes))


def make_exit_head(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """An exit head of type `name` for a feature map with `in_channels` channels."""
    return HEADS.get(name)(in_channels, num_classes)
