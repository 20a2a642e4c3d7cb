"""Build an EarlyExitNet: a new one from a backbone name and branch rule, or one described by a ModelSpec."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgeexit.errors import UserError
from edgeexit.model.adapters import load_backbone
from edgeexit.model.early_exit import EarlyExitNet, group_stages
from edgeexit.model.heads import HEADS, make_exit_head
from edgeexit.model.placement import place_branches
from edgeexit.model.profile import BlockProfile, profile_blocks
from edgeexit.model.spec import ModelSpec

__all__ = ["new_model", "build_model", "settle_batchnorm"]


def _assemble(
    backbone: str,
    num_classes: int,
    input_size: int,
    weights: str | None,
    head: str,
    branch_blocks: Sequence[int] | None,
    branches: int = 0,
    placement: str = "linear",
) -> tuple[EarlyExitNet, list[int], BlockProfile]:
    HEADS.get(head)  # fail on an unknown head before building anything
    if input_size <= 0:
        raise UserError(f"input size must be a positive number of pixels, got {input_size}")
    bb = load_backbone(backbone, num_classes, weights)
    profile = profile_blocks(bb.blocks, bb.head, input_size)
    if branch_blocks is None:
        branch_blocks = place_branches(profile.block_macs, branches, placement, head_macs=profile.head_macs)
    else:
        branch_blocks = place_branches(
            profile.block_macs, len(branch_blocks), "explicit", list(branch_blocks)
        )
    exits = [make_exit_head(head, profile.block_shapes[b][0], num_classes) for b in branch_blocks]
    net = EarlyExitNet(group_stages(bb.blocks, branch_blocks), exits, bb.head)
    return net, list(branch_blocks), profile


def new_model(
    backbone: str,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    input_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    branches: int = 3,
    placement: str = "linear",
    branch_blocks: Sequence[int] | None = None,
    head: str = "bnpool",
    weights: str | None = None,
    kind: str = "early_exit",
    **spec_fields,
) -> tuple[EarlyExitNet, ModelSpec]:
    """A fresh model and its spec. `kind="conventional"` gives the backbone with no side branches."""
    if kind == "conventional":
        branches, branch_blocks = 0, None
    net, blocks, _ = _assemble(
        backbone, num_classes, input_size, weights, head, branch_blocks, branches, placement
    )
    spec = ModelSpec(
        backbone=backbone,
        num_classes=num_classes,
        class_names=list(class_names) if class_names is not None else [str(i) for i in range(num_classes)],
        input_size=input_size,
        resize_size=resize_size or input_size,
        mean=list(mean),
        std=list(std),
        branch_blocks=blocks,
        head=head,
        placement="explicit" if branch_blocks is not None else placement,
        kind=kind,
        weights_init=weights or "random",
        **spec_fields,
    )
    return net, spec


def build_model(spec: ModelSpec) -> EarlyExitNet:
    """The architecture a spec describes, randomly initialised (load its weights next)."""
    if spec.wrapped is not None:
        from edgeexit.model.wrap import rebuild_wrapped

        return rebuild_wrapped(spec)
    net, _, _ = _assemble(
        spec.backbone, spec.num_classes, spec.input_size, None, spec.head, spec.branch_blocks or None
    )
    return net


def settle_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics from one batch of real inputs, then leave `net` in eval mode.

    For untrained (random-weight) models in tests and benchmarks: with the default statistics their outputs
    barely depend on the input.
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: over this one batch exactly
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
