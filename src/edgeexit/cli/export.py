"""`edgeexit export`: a trained run's models in another format for another runtime (ONNX for `--runtime onnx`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeexit.cli.common import command

FORMATS = ("onnx",)


@command("export")
def run_export(args: argparse.Namespace) -> None:
    from edgeexit.onnx_export import export_onnx
    from edgeexit.onnx_runtime import MANIFEST

    out = export_onnx(Path(args.run_dir), Path(args.out) if args.out else None)
    manifest = json.loads((out / MANIFEST).read_text())
    graphs = [*manifest["edge_stages"], *manifest["cloud_parts"], *filter(None, [manifest["conventional"]])]
    print(f"exported {len(graphs)} ONNX graphs to {out}: {', '.join(graphs)} (+ {MANIFEST})")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the run's models as ONNX graphs (one per edge stage, per cloud split point, conventional)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="(default: onnx, the only one)")
    p.add_argument(
        "--out", metavar="DIR", help="output folder (default: RUN_DIR/onnx, where runtime onnx looks)"
    )
