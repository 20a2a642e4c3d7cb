"""The `edgeexit` command. Each subcommand parses its flags and calls one function of the package."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeexit.errors import UserError

log = logging.getLogger("edgeexit")

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str) -> Callable:
    """Register the function that runs subcommand `name`."""

    def deco(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return deco


# --- inspect -----------------------------------------------------------------------------------------------


@command("inspect")
def run_inspect(args: argparse.Namespace) -> None:
    from edgeexit.model import load_checkpoint, new_model
    from edgeexit.model.inspection import format_inspection, inspect_model

    if args.checkpoint:
        net, spec = load_checkpoint(Path(args.checkpoint))
    else:
        if args.classes < 2:
            raise UserError(f"--classes must be at least 2, got {args.classes}")
        net, spec = new_model(
            args.backbone,
            num_classes=args.classes,
            input_size=args.input_size,
            branches=args.branches,
            placement=args.placement,
            branch_blocks=args.branch_blocks,
            head=args.head,
        )
    info = inspect_model(net, spec)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="cost table: MACs per block and exit, bytes per split point")
    p.add_argument("--backbone", default="mobilenet_v2", help="torchvision backbone (default: mobilenet_v2)")
    p.add_argument("--input-size", type=int, default=224, help="input side in pixels (default: 224)")
    p.add_argument("--branches", type=int, default=3, help="number of side branches (default: 3)")
    p.add_argument("--classes", type=int, default=257, help="number of classes (default: 257, Caltech-256)")
    p.add_argument("--placement", default="linear", choices=["linear", "pareto"], help="branch placement rule")
    p.add_argument("--branch-blocks", type=int, nargs="+", help="explicit block indices instead of a rule")
    p.add_argument("--head", default="bnpool", help="exit head type (bnpool, pool)")
    p.add_argument("--checkpoint", help="inspect a trained model directory instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --- main --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgeexit",
        description="Early-exit DNNs for distorted images at the edge, with adaptive offloading to the cloud.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeexit` command."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args) or 0
    except UserError as exc:
        print(f"edgeexit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeexit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
