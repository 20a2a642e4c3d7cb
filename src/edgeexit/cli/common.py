"""What the subcommands share: the command table, registry choices, config overrides (`--set`, shortcuts).

A command that builds a config reads the config file (or the run's config.json, or the defaults), applies
its shortcut flags (`--epochs 3` is `--set train.epochs=3`), then every `--set section.key=value` in order,
and validates the result as a whole: a bad key or value is a one-line UserError (exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str) -> Callable:
    """Register the function that runs subcommand `name`."""

    def deco(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return deco


class Choices(Sequence[str]):
    """argparse `choices` read from a registry only when argparse looks at them (checks a value, prints help).

    So `edgeexit --help`, `edgeexit link` or a command given without these flags never imports the registries
    (and torch with them).
    """

    def __init__(self, which: str) -> None:
        self.which = which
        self._names: list[str] | None = None

    def _load(self) -> list[str]:
        if self._names is None:
            self._names = _names(self.which)
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i: Any) -> Any:
        return self._load()[i]


def add_choice(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, names: str, **kwargs: Any
) -> argparse.Action:
    """`add_argument` whose choices are `Choices(names)`: a registry, or a fixed-choice config key.

    The choices are set after `add_argument`, which would otherwise list them at once to check the metavar.
    """
    action = p.add_argument(*flags, **kwargs)
    action.choices = Choices(names)
    return action


def _names(which: str) -> list[str]:
    if which == "dataset":
        from edgeexit.data.sources import DATASETS

        return DATASETS.names()
    if which == "backbone":
        from edgeexit.model.adapters import BACKBONES

        return BACKBONES.names()
    if which == "head":
        from edgeexit.model.heads import HEADS

        return HEADS.names()
    if which == "distortion":
        from edgeexit.data.distortions import DISTORTIONS

        return DISTORTIONS.names()
    if which == "strategy":
        from edgeexit.policy import STRATEGIES

        return list(STRATEGIES)
    if which == "precision":
        from edgeexit.model.costs import PRECISION_BYTES

        return list(PRECISION_BYTES)
    if which == "placement":
        from edgeexit.model.placement import PLACEMENTS

        return list(PLACEMENTS)
    from edgeexit.config import choices  # a fixed-choice config key, e.g. train.device

    return list(choices(which))


def probability(text: str) -> float:
    """argparse type of a confidence threshold alpha: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"alpha {text} is outside [0, 1]: a confidence threshold is a probability"
        )
    return value


def add_threads_flag(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None = None
) -> None:
    """`--threads N`: intra-op CPU threads of this process (checked by `edgeexit.threads.check_threads`)."""
    p.add_argument(
        "--threads",
        type=int,
        default=default,
        metavar="N",
        help=f"CPU threads per process (default: {default or 'one per physical core'}); see edgeexit.threads",
    )


def add_runtime_flag(p: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """`--runtime torch|onnx`: the backend that runs the model's pieces (edgeexit.runtime.RUNTIMES)."""
    add_choice(p, "--runtime", default=default, names="runtime.backend", help=help)


def add_set_flag(p: argparse.ArgumentParser) -> None:
    """`--set section.key=value`, repeatable; the value is read as TOML (a bare word stays a string)."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.lr=0.01 --set experiment.alphas=[0.5] (repeatable)",
    )


def apply_overrides(cfg: Any, args: argparse.Namespace, shortcuts: Mapping[str, str]) -> Any:
    """`cfg` with the shortcut flags given in `args` (dest -> 'section.key'), then each --set, validated."""
    from edgeexit.config import parse_override

    pairs = [
        (key, getattr(args, dest)) for dest, key in shortcuts.items() if getattr(args, dest, None) is not None
    ]
    pairs += [parse_override(text) for text in getattr(args, "overrides", None) or []]
    return cfg.updated(pairs) if pairs else cfg


def run_config(args: argparse.Namespace, shortcuts: Mapping[str, str]) -> Any:
    """The config file (or the built-in defaults) with the command line's overrides applied and validated."""
    from edgeexit.config import load_config

    return apply_overrides(load_config(getattr(args, "config", None)), args, shortcuts)
