"""The `edgeexit` command. Each subcommand parses its flags and calls one function of the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    p.add_argument(
        "--placement", default="linear", choices=["linear", "pareto"], help="branch placement rule"
    )
    p.add_argument("--branch-blocks", type=int, nargs="+", help="explicit block indices instead of a rule")
    p.add_argument("--head", default="bnpool", help="exit head type (bnpool, pool)")
    p.add_argument("--checkpoint", help="inspect a trained model directory instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --- train / calibrate -------------------------------------------------------------------------------------


def _run_config(args: argparse.Namespace):
    """The config file (or the defaults), with the command-line overrides applied."""
    from edgeexit.config import load_config

    cfg = load_config(getattr(args, "config", None))
    overrides = {
        ("dataset", "name"): getattr(args, "dataset", None),
        ("dataset", "root"): getattr(args, "data_root", None),
        ("dataset", "input_size"): getattr(args, "input_size", None),
        ("model", "backbone"): getattr(args, "backbone", None),
        ("model", "branches"): getattr(args, "branches", None),
        ("model", "weights"): getattr(args, "weights", None),
        ("model", "head"): getattr(args, "head", None),
        ("train", "conventional"): getattr(args, "conventional", None),
        ("train", "epochs"): getattr(args, "epochs", None),
        ("train", "device"): getattr(args, "device", None),
    }
    for (section, key), value in overrides.items():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    return cfg


@command("train")
def run_train(args: argparse.Namespace) -> None:
    from edgeexit.train.loop import train_model

    cfg = _run_config(args)
    which = ["ee", "conventional"] if args.model == "both" else [args.model]
    for model in which:
        spec = train_model(Path(args.out), cfg, model, resume=args.resume)
        acc = spec.metrics.get("test_accuracy")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line per model, not per process
            print(
                f"{model}: checkpoint {Path(args.out) / model} (hash {spec.content_hash}); test accuracy per exit: {acc}"
            )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the EE-DNN (all exits jointly) and/or the conventional DNN")
    p.add_argument("--config", help="TOML config file (default: the built-in defaults, the embedded dataset)")
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--model", default="both", choices=["ee", "conventional", "both"], help="which model(s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--dataset", help="mnist5k (default), digits, caltech256, cifar10, imagefolder")
    p.add_argument("--data-root", help="dataset root directory (caltech256, cifar10, imagefolder)")
    p.add_argument("--backbone")
    p.add_argument("--branches", type=int)
    p.add_argument("--input-size", type=int)
    p.add_argument("--weights", help="random, imagenet, or a state-dict file")
    p.add_argument("--head", help="exit head type: bnpool or pool")
    p.add_argument(
        "--conventional", choices=["separate", "final_exit"], help="how the conventional DNN is made"
    )
    p.add_argument("--device", help="auto, cpu or cuda")


@command("calibrate")
def run_calibrate(args: argparse.Namespace) -> None:
    from edgeexit.rundir import RunDir
    from edgeexit.train.calibrate import calibrate_run

    run = RunDir(Path(args.run_dir))
    cfg = run.load_config()
    if args.mode:
        cfg.calibration.mode = args.mode
    result = calibrate_run(run.root, cfg)
    print(json.dumps(result, indent=2, default=str))


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit temperatures on the validation split; ensemble weights")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--mode", choices=["per_exit", "global"], help="one temperature per exit (default) or one")


# --- evaluate / reproduce ----------------------------------------------------------------------------------


def _check_alphas(alphas: Sequence[float] | None) -> None:
    for a in alphas or []:
        if not 0.0 <= a <= 1.0:
            raise UserError(f"alpha {a} is outside [0, 1]: a confidence threshold is a probability")


@command("evaluate")
def run_evaluate(args: argparse.Namespace) -> None:
    from edgeexit.evaluate.sweep import evaluate_run, format_summary

    _check_alphas(args.alphas)
    _, summary = evaluate_run(
        Path(args.run_dir),
        distortion=args.distortion,
        levels=args.levels,
        alphas=args.alphas,
        edge_branches=args.edge_branches,
        strategies=args.strategies,
        limit=args.limit,
    )
    print(format_summary(summary))
    print(
        f"\nrecords: {Path(args.run_dir) / 'records.parquet'}; summary: {Path(args.run_dir) / 'summary.csv'}"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="offline sweep: every strategy, alpha and k from one pass per level")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--distortion", help="gaussian_blur (default), gaussian_noise, jpeg")
    p.add_argument(
        "--levels", type=float, nargs="+", help="distortion levels (default: the paper's sigma grid)"
    )
    p.add_argument("--alphas", type=float, nargs="+", help="confidence thresholds (default: 0.8 0.9)")
    p.add_argument("--edge-branches", type=int, nargs="+", help="values of k (default: 1 2 3)")
    p.add_argument(
        "--strategies", nargs="+", help="ee ensemble ensemble-mean entropy conventional (default: all)"
    )
    p.add_argument("--limit", type=int, help="only the first N test images")


@command("reproduce")
def run_reproduce(args: argparse.Namespace) -> None:
    from edgeexit.experiment.pipeline import reproduce

    page = reproduce(args.config, args.out, quick=args.quick)
    print(f"report: {page}  (and {page.with_suffix('.md')})")


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="the paper's whole experiment: train, calibrate, sweep, serve, report"
    )
    p.add_argument(
        "--config", help="TOML config (default: configs/default.toml settings, the embedded dataset)"
    )
    p.add_argument("--out", help="run directory (default: runs/default, or runs/quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (about two minutes on 2 CPU cores)")


# --- serving -----------------------------------------------------------------------------------------------


@command("serve-cloud")
def run_serve_cloud(args: argparse.Namespace) -> None:
    from edgeexit.serving.cloud import serve_cloud

    serve_cloud(
        Path(args.run_dir),
        host=args.host,
        port=args.port,
        workers=args.workers,
        token=args.token,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
    )


def _add_serve_cloud(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-cloud", help="the cloud server: finishes offloaded inferences, classifies images"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--token", default=None, help="require this bearer token (or set EDGEEXIT_TOKEN)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body accepted (MiB)")


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategy", default="ee", help="ee (default), ensemble, ensemble-mean, entropy, conventional"
    )
    p.add_argument("--alpha", type=float, default=0.8, help="confidence threshold (default: 0.8)")
    p.add_argument("--k", type=int, default=None, help="edge branches (default: all of the model's)")
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="offload wire precision"
    )
    p.add_argument("--cloud-token", default=None, help="bearer token for the cloud server")


@command("serve-edge")
def run_serve_edge(args: argparse.Namespace) -> None:
    from edgeexit.serving.edge import serve_edge

    _check_alphas([args.alpha])
    serve_edge(
        Path(args.run_dir),
        cloud_url=args.cloud,
        strategy=args.strategy,
        alpha=args.alpha,
        k=args.k,
        precision=args.precision,
        host=args.host,
        port=args.port,
        token=args.token,
        cloud_token=args.cloud_token,
    )


def _add_serve_edge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-edge", help="the edge server: classifies images, offloads the hard ones")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--cloud", required=True, help="cloud server URL, e.g. http://10.0.0.2:8000")
    _add_policy_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--token", default=None, help="require this bearer token from clients")


@command("classify")
def run_classify(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from edgeexit.serving.edge import EdgeRunner, classify_files

    _check_alphas([args.alpha])
    runner = EdgeRunner.from_run(
        Path(args.run),
        strategy=args.strategy,
        alpha=args.alpha,
        k=args.k,
        cloud_url=args.cloud,
        precision=args.precision,
        token=args.cloud_token,
    )
    for path, answer in zip(args.images, classify_files([Path(p) for p in args.images], runner), strict=True):
        if args.json:
            print(json.dumps({"image": path, **asdict(answer)}))
        else:
            where = f"exit {answer.exit}" if answer.answered_at == "edge" else "cloud"
            note = "" if answer.outcome == "ok" else f"  [{answer.outcome}: {answer.detail}]"
            print(
                f"{path}: {answer.class_name} ({answer.confidence:.3f}) at {where}, "
                f"{answer.time_ms:.1f} ms, {answer.macs / 1e6:.2f} MMACs, {answer.bytes_sent} B sent{note}"
            )


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify image files at the edge, offloading to a cloud server")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--run", required=True, help="run directory with the trained, calibrated model")
    p.add_argument(
        "--cloud", default=None, help="cloud server URL (without one, offloads fall back to the edge)"
    )
    _add_policy_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image")


@command("link")
def run_link(args: argparse.Namespace) -> None:
    import time

    from edgeexit.serving.link import LinkSpec, run_link_in_thread

    spec = LinkSpec.parse(args.rtt, args.bandwidth)
    handle = run_link_in_thread(args.listen, args.to, spec)
    print(
        f"link emulator: {args.listen} (port {handle.port}) -> {args.to}, RTT {spec.rtt_ms} ms, "
        f"{spec.bandwidth_mbit} Mbit/s each way; Ctrl-C to stop",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    finally:
        handle.close()


def _add_link(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("link", help="a TCP proxy that emulates a link (delay and bandwidth each way)")
    p.add_argument("--listen", required=True, help="address to listen on, e.g. 127.0.0.1:9000")
    p.add_argument("--to", required=True, help="address to forward to, e.g. 127.0.0.1:8000")
    p.add_argument("--rtt", default="11.91ms", help="round-trip time added (default: 11.91ms, the paper's)")
    p.add_argument("--bandwidth", default="93.9mbit", help="rate each way (default: 93.9mbit, the paper's)")


@command("probe-link")
def run_probe_link(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from edgeexit.serving.probe import probe_link

    m = probe_link(args.url, pings=args.pings, transfers=args.transfers, transfer_bytes=args.bytes)
    if args.json:
        print(json.dumps(asdict(m)))
    else:
        print(
            f"RTT {m.rtt_ms_mean:.2f} ms (sd {m.rtt_ms_sd:.2f}); up {m.up_mbit_mean:.1f} Mbit/s "
            f"(sd {m.up_mbit_sd:.1f}); down {m.down_mbit_mean:.1f} Mbit/s (sd {m.down_mbit_sd:.1f})"
        )


def _add_probe_link(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-link", help="measure RTT and throughput to a cloud server (like ping + iPerf3)")
    p.add_argument("url", metavar="URL")
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--transfers", type=int, default=5)
    p.add_argument("--bytes", type=int, default=2_000_000, help="bytes per throughput transfer")
    p.add_argument("--json", action="store_true")


# --- main --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgeexit",
        description="Early-exit DNNs for distorted images at the edge, with adaptive offloading to the cloud.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_reproduce,
        _add_inspect,
        _add_train,
        _add_calibrate,
        _add_evaluate,
        _add_serve_cloud,
        _add_serve_edge,
        _add_classify,
        _add_link,
        _add_probe_link,
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
