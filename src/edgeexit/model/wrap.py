"""`wrap`: any model whose forward runs its named children in order, as an EarlyExitNet + ModelSpec.

Exits are named by the dotted names of the modules they follow (`"features.3"`, `"layer2.1"`). A name with a
dot cuts inside a container, which must be an `nn.Sequential` (its forward is its children in order); the
model itself is taken to run its top-level children in order, and that is checked, not trusted: the wrapped
network's final exit must give the model's own output on a probe input, in eval mode, or `wrap` refuses.

Blocks are the model's top-level children, with each container named in an exit opened into its children.
The final head is the trailing run of top-level children without a convolution (`avgpool`, `classifier`, `fc`);
`nn.Flatten(1)` goes in front of its first child that starts with an `nn.Linear`, standing for the
`torch.flatten(x, 1)` that torchvision models call between pooling and classifier.

A run directory keeps weights and spec, not Python objects: to rebuild the architecture `load_checkpoint`
calls `source` (`"torchvision:efficientnet_b0"` or an importable `"package.module:factory"`) with the recorded
keyword arguments and wraps the result again. A model wrapped without a `source` trains, calibrates and
evaluates in Python, but its run directory cannot be loaded (nor served) until `source` names a factory.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgeexit.errors import UserError
from edgeexit.model.early_exit import EarlyExitNet, group_stages
from edgeexit.model.heads import HEADS, make_exit_head
from edgeexit.model.placement import place_branches
from edgeexit.model.profile import profile_blocks
from edgeexit.model.spec import ModelSpec

__all__ = ["wrap", "rebuild_wrapped", "build_source"]

NEEDS = (
    "wrap needs a model whose forward runs its named children in order (nn.Sequential, or a class like "
    "torchvision's EfficientNet/RegNet/ResNet whose forward only adds a flatten before its classifier), with "
    "exits named by dotted module names that cut only inside nn.Sequential containers"
)
_CONV = (nn.modules.conv._ConvNd,)
_PASSIVE = (nn.Dropout, nn.Identity)


def _children(module: nn.Module, prefix: str, opened: set[str]) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of the children of `module`, opening every container named in `opened`."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if full in opened:
            out.extend(_children(child, full + ".", opened))
        else:
            out.append((full, child))
    return out


def _containers(model: nn.Module, exits: Sequence[str]) -> set[str]:
    """Every proper prefix of an exit name; each must be an nn.Sequential inside `model`."""
    opened: set[str] = set()
    for name in exits:
        parts = name.split(".")
        for j in range(1, len(parts)):
            prefix = ".".join(parts[:j])
            try:
                sub = model.get_submodule(prefix)
            except AttributeError:
                raise UserError(f"exit {name!r}: the model has no module {prefix!r}; {NEEDS}") from None
            if not isinstance(sub, nn.Sequential):
                raise UserError(
                    f"exit {name!r} cuts inside {prefix!r}, a {type(sub).__name__}, not an nn.Sequential: its "
                    f"forward may not run its children in order; {NEEDS}"
                )
            opened.add(prefix)
    return opened


def _starts_with_linear(m: nn.Module) -> bool:
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            return True
        if isinstance(sub, (nn.Sequential, *_PASSIVE)):
            continue
        return False
    return False


def _split(model: nn.Module, exits: Sequence[str]) -> tuple[list[nn.Module], nn.Module, list[int], list[str]]:
    """Blocks, final head, the block index of each exit, and the blocks' dotted names."""
    if isinstance(exits, str) or not exits:
        raise UserError(f"exits must be a non-empty list of module names, got {exits!r}")
    exits = [str(e) for e in exits]
    if len(set(exits)) != len(exits):
        raise UserError(f"exit names must be distinct, got {exits}")
    named = _children(model, "", _containers(model, exits))
    top = list(model.named_children())
    n_head = 0
    while n_head < len(top) and not any(isinstance(m, _CONV) for m in top[-1 - n_head][1].modules()):
        n_head += 1
    head_names = {name for name, _ in top[len(top) - n_head :]}
    body = [(name, m) for name, m in named if name.split(".")[0] not in head_names]
    head_parts: list[nn.Module] = []
    flattened = False
    for _, m in top[len(top) - n_head :]:
        if not flattened and _starts_with_linear(m):
            head_parts.append(nn.Flatten(1))
            flattened = True
        head_parts.append(m)
    names = [name for name, _ in body]
    positions = []
    for e in exits:
        if e not in names:
            where = "in the classifier head" if e.split(".")[0] in head_names else "not a block"
            raise UserError(f"exit {e!r} is {where}; blocks that can take an exit: {', '.join(names[:-1])}")
        positions.append(names.index(e))
    if len(body) < 2:
        raise UserError(f"found {len(body)} block(s) before the classifier; {NEEDS}")
    if positions != sorted(positions):
        raise UserError(f"exits must be listed in forward order, got {exits}")
    return [m for _, m in body], nn.Sequential(*head_parts), positions, names


def _final_linear(head: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"the model's classifier head has no nn.Linear to resize; {NEEDS}")
    path, layer = linears[-1]
    parent_path, _, attr = path.rpartition(".")
    return (head.get_submodule(parent_path) if parent_path else head), attr, layer


def _check_equal(model: nn.Module, blocks: list[nn.Module], head: nn.Module, input_size: int) -> int:
    """The blocks then the head must compute the model's own output (eval mode, a seeded probe); its classes."""
    was_training = model.training
    model.eval()
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            want = model(x)
            got = x
            for b in blocks:
                got = b(got)
            got = head(got)
    except Exception as exc:
        raise UserError(
            f"running the model's children in order failed ({type(exc).__name__}: {exc}); {NEEDS}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(want, torch.Tensor) or want.ndim != 2:
        raise UserError(f"the model must return logits [batch, classes], got {type(want).__name__}; {NEEDS}")
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise UserError(f"running the model's children in order does not give the model's output; {NEEDS}")
    return int(want.shape[1])


def _check_source(source: str | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if source is not None and (not isinstance(source, str) or source.count(":") != 1):
        raise UserError(f"source must be 'torchvision:NAME' or 'package.module:factory', got {source!r}")
    try:
        return json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError):
        raise UserError(
            f"model_kwargs must be JSON values (they go into spec.json), got {kwargs!r}"
        ) from None


def build_source(source: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The module `source` names, called with `kwargs`: torchvision's `get_model(NAME)` or `module:factory`."""
    _check_source(source, kwargs or {})
    module_name, _, attr = source.partition(":")
    try:
        if module_name == "torchvision":
            import torchvision

            return torchvision.models.get_model(attr, **dict(kwargs or {}))
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(
            f"cannot build model source {source!r} ({exc}); expected 'torchvision:NAME' or an importable "
            "'package.module:factory'"
        ) from None
    model = factory(**dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise UserError(f"model source {source!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _assemble(
    model: nn.Module, exits: Sequence[str], num_classes: int | None, input_size: int, head: str
) -> tuple[EarlyExitNet, list[int], int]:
    HEADS.get(head)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise UserError(f"input_size must be a positive number of pixels, got {input_size!r}")
    if not isinstance(model, nn.Module):
        raise UserError(f"wrap needs an nn.Module, got {type(model).__name__}")
    blocks, final, positions, _ = _split(model, exits)
    classes = _check_equal(model, blocks, final, input_size)
    if num_classes is not None and num_classes != classes:
        if num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes}")
        parent, attr, old = _final_linear(final)
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        classes = num_classes
    profile = profile_blocks(blocks, final, input_size)
    positions = place_branches(profile.block_macs, len(positions), "explicit", positions)
    exit_heads = [make_exit_head(head, profile.block_shapes[b][0], classes) for b in positions]
    return EarlyExitNet(group_stages(blocks, positions), exit_heads, final), positions, classes


def wrap(
    model: nn.Module | str,
    exits: Sequence[str],
    *,
    input_size: int,
    num_classes: int | None = None,
    head: str = "bnpool",
    source: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    resize_size: int | None = None,
) -> tuple[EarlyExitNet, ModelSpec]:
    """`model` with an exit head of type `head` after each module named in `exits`: an EarlyExitNet and its spec.

    `model` is an `nn.Module` (its weights are kept: the net shares its modules) or a source string, built
    with `model_kwargs`. `source` ("torchvision:NAME" or "package.module:factory", called with
    `model_kwargs`) is what lets a saved run be loaded and served again; without it the spec cannot be rebuilt.
    `num_classes` replaces the model's last nn.Linear when it differs. With its exits ignored, the net
    computes the model (checked at `input_size`); see the module docstring for what models qualify.
    """
    kwargs = _check_source(source, model_kwargs or {})
    if isinstance(model, str):
        source = model
        model = build_source(model, kwargs)
    net, positions, classes = _assemble(model, exits, num_classes, input_size, head)
    spec = ModelSpec(
        backbone=source or f"wrapped:{type(model).__name__}",
        num_classes=classes,
        class_names=list(class_names) if class_names is not None else [str(i) for i in range(classes)],
        input_size=input_size,
        resize_size=resize_size or input_size,
        mean=list(mean),
        std=list(std),
        branch_blocks=positions,
        head=head,
        placement="explicit",
        weights_init="module",
        wrapped={"source": source, "model_kwargs": kwargs, "exits": [str(e) for e in exits]},
    )
    return net, spec


def rebuild_wrapped(spec: ModelSpec) -> EarlyExitNet:
    """The architecture of a spec made by `wrap` (random weights): its source, called and wrapped again."""
    w = spec.wrapped or {}
    if not w.get("source"):
        raise UserError(
            f"this model was made by edgeexit.wrap from a {spec.backbone.partition(':')[2] or 'module'} instance "
            "without `source`, so its architecture cannot be rebuilt from the run directory; wrap it again with "
            "source='torchvision:NAME' or an importable 'package.module:factory' (and model_kwargs), then save"
        )
    model = build_source(w["source"], w.get("model_kwargs") or {})
    net, positions, _ = _assemble(model, w["exits"], spec.num_classes, spec.input_size, spec.head)
    if positions != spec.branch_blocks:
        raise UserError(
            f"{w['source']} now places exits {w['exits']} after blocks {positions}, the spec says "
            f"{spec.branch_blocks}: the model's code changed since the run was saved"
        )
    return net
