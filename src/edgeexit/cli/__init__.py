"""The `edgeexit` command. Each subcommand parses its flags and calls one function of the package.

Importing this package and building the parser stay light: a subcommand imports what it runs inside its
function, and the choices of flags (datasets, backbones, heads, distortions, strategies, precisions) come from
their registries, imported only when argparse checks or prints them. Commands that build a config take
`--set section.key=value` (see cli.common).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from edgeexit.cli import export, plan, runs, serve
from edgeexit.cli.common import COMMANDS, command
from edgeexit.errors import EdgeExitError

__all__ = ["COMMANDS", "build_parser", "command", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgeexit",
        description="Early-exit DNNs for distorted images at the edge, "
        "with adaptive offloading to the cloud.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        runs.add_reproduce,
        runs.add_inspect,
        runs.add_train,
        runs.add_calibrate,
        runs.add_evaluate,
        export.add_export,
        serve.add_serve_cloud,
        serve.add_serve_edge,
        serve.add_classify,
        serve.add_link,
        serve.add_probe_link,
        plan.add_plan,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeexit` command."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so servers and proxies started by a command are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if args.verbose < 2:  # httpx logs every request at INFO: thousands of lines in an online run
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args) or 0
    except EdgeExitError as exc:  # a user error, a bad payload, a failed offload: one line, no traceback
        print(f"edgeexit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeexit: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The `edgeexit` console script and `python -m edgeexit`: `main`, then the process exit."""
    code = main()
    # The interpreter's last garbage collection walks every object torch created: about 0.35 s of a 2-core
    # machine's time at each command's exit. The process is ending, so take them out of its sight first.
    gc.freeze()
    sys.exit(code)
