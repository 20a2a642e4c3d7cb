"""Backbone adapters: a torchvision classifier as an ordered list of blocks plus its final head.

Running the blocks in order and then the head computes exactly what the torchvision model's own
`forward` computes; nothing is dropped (the authors' code silently removed the block at each exit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeexit.errors import UserError
from edgeexit.registry import Registry

__all__ = ["BACKBONES", "Backbone", "load_backbone", "WEIGHT_CHOICES"]

log = logging.getLogger(__name__)

WEIGHT_CHOICES = "'random', 'imagenet', or a path to a .pth/.pt/.safetensors state dict"


@dataclass
class Backbone:
    """A torchvision model cut into `blocks` (run in order) and `head` (pool, flatten, classifier)."""

    name: str
    model: nn.Module
    blocks: list[nn.Module]
    head: nn.Module


@dataclass(frozen=True)
class _Adapter:
    builder: str  # the torchvision.models builder; torchvision is imported only when a model is built
    split: Callable[[nn.Module], tuple[list[nn.Module], nn.Module]]
    classifier_path: str  # dotted path of the final nn.Linear, replaced for another class count


BACKBONES: Registry[_Adapter] = Registry("backbone")


def _split_features(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    # mobilenet_v2 / mobilenet_v3: features -> global average pool -> flatten -> classifier
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
    return list(model.features), head


def _split_resnet(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks: list[nn.Module] = [stem]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        blocks.extend(layer)  # one block per residual unit: finer placement granularity
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return blocks, head


BACKBONES.register("mobilenet_v2")(_Adapter("mobilenet_v2", _split_features, "classifier.1"))
BACKBONES.register("mobilenet_v3_large")(_Adapter("mobilenet_v3_large", _split_features, "classifier.3"))
BACKBONES.register("resnet18")(_Adapter("resnet18", _split_resnet, "fc"))
BACKBONES.register("resnet50")(_Adapter("resnet50", _split_resnet, "fc"))


def _replace_classifier(model: nn.Module, path: str, num_classes: int) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    if old.out_features != num_classes:
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, OSError, HTTP errors: all mean "could not fetch"
        raise UserError(
            f"could not download ImageNet weights {weights} for {name} ({type(exc).__name__}); on a machine "
            f"without internet, fetch {weights.url} elsewhere and pass its path as the weights"
        ) from None


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; expected {WEIGHT_CHOICES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise UserError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return state


def load_backbone(name: str, num_classes: int, weights: str | None = None) -> Backbone:
    """Build torchvision backbone `name` for `num_classes`, with random, ImageNet or file weights."""
    adapter = BACKBONES.get(name)
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    import torchvision  # heavy (about 2 s, 170 MB): only when a model is built

    model = getattr(torchvision.models, adapter.builder)(weights=None)
    source = weights or "random"
    if source != "random":
        state = _imagenet_state_dict(name) if source == "imagenet" else _file_state_dict(Path(source))
        # A 1000-class ImageNet classifier (or any other count) is dropped when the class count differs.
        cls_weight = state.get(f"{adapter.classifier_path}.weight")
        if cls_weight is not None and cls_weight.shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith(adapter.classifier_path + ".")}
            _replace_classifier(model, adapter.classifier_path, num_classes)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise UserError(
                f"weights {source} do not fit {name}: {str(exc).splitlines()[1].strip()}"
            ) from None
        missing = [k for k in missing if not k.startswith(adapter.classifier_path + ".")]
        if missing or unexpected:
            raise UserError(
                f"weights {source} do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        log.info("loaded %s weights for %s", source, name)
    _replace_classifier(model, adapter.classifier_path, num_classes)
    blocks, head = adapter.split(model)
    return Backbone(name=name, model=model, blocks=blocks, head=head)
