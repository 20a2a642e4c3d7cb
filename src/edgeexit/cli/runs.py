"""Subcommands that build and run the experiment: inspect, train, calibrate, evaluate, reproduce."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgeexit.cli.common import (
    add_choice,
    add_runtime_flag,
    add_set_flag,
    add_threads_flag,
    apply_overrides,
    command,
    run_config,
)
from edgeexit.errors import UserError
from edgeexit.threads import set_threads

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


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="cost table: MACs per block and exit, bytes per split point")
    add_choice(p, "--backbone", default="mobilenet_v2", names="backbone", help="(default: mobilenet_v2)")
    p.add_argument("--input-size", type=int, default=224, help="input side in pixels (default: 224)")
    p.add_argument("--branches", type=int, default=3, help="number of side branches (default: 3)")
    p.add_argument("--classes", type=int, default=257, help="number of classes (default: 257, Caltech-256)")
    add_choice(p, "--placement", default="linear", names="placement", help="branch placement rule")
    p.add_argument("--branch-blocks", type=int, nargs="+", help="explicit block indices instead of a rule")
    add_choice(p, "--head", default="bnpool", names="head", help="exit head type (default: bnpool)")
    p.add_argument("--checkpoint", help="inspect a trained model directory instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --- train / calibrate -------------------------------------------------------------------------------------

# shortcut flag (argparse dest) -> the config key it sets
TRAIN_SHORTCUTS = {
    "dataset": "dataset.name",
    "data_root": "dataset.root",
    "input_size": "dataset.input_size",
    "backbone": "model.backbone",
    "branches": "model.branches",
    "weights": "model.weights",
    "head": "model.head",
    "conventional": "train.conventional",
    "epochs": "train.epochs",
    "device": "train.device",
    "threads": "runtime.threads",
}


@command("train")
def run_train(args: argparse.Namespace) -> None:
    cfg = run_config(args, TRAIN_SHORTCUTS)  # validated before the training stack is imported
    set_threads(cfg.runtime.threads)

    from edgeexit.train.loop import train_model

    which = ["ee", "conventional"] if args.model == "both" else [args.model]
    for model in which:
        spec = train_model(Path(args.out), cfg, model, resume=args.resume)
        acc = spec.metrics.get("test_accuracy")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line per model, not per process
            print(
                f"{model}: checkpoint {Path(args.out) / model} (hash {spec.content_hash}); "
                f"test accuracy per exit: {acc}"
            )


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the EE-DNN (all exits jointly) and/or the conventional DNN")
    p.add_argument("--config", help="TOML config file (default: the built-in defaults, the embedded dataset)")
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--model", default="both", choices=["ee", "conventional", "both"], help="which model(s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    g = p.add_argument_group("config shortcuts", "each sets one config value, like --set; --set comes last")
    g.add_argument("--epochs", type=int, help="train.epochs")
    add_choice(g, "--dataset", names="dataset", help="dataset.name")
    g.add_argument("--data-root", help="dataset.root: dataset directory (caltech256, cifar10, imagefolder)")
    add_choice(g, "--backbone", names="backbone", help="model.backbone")
    g.add_argument("--branches", type=int, help="model.branches")
    g.add_argument("--input-size", type=int, help="dataset.input_size")
    g.add_argument("--weights", help="model.weights: random, imagenet, or a state-dict file")
    add_choice(g, "--head", names="head", help="model.head: exit head type")
    add_choice(g, "--conventional", names="train.conventional", help="how the conventional DNN is made")
    add_choice(g, "--device", names="train.device", help="train.device")
    add_threads_flag(g)
    add_set_flag(p)


@command("calibrate")
def run_calibrate(args: argparse.Namespace) -> None:
    from edgeexit.rundir import RunDir

    run = RunDir(Path(args.run_dir))
    cfg = apply_overrides(run.load_config(), args, {"mode": "calibration.mode", "threads": "runtime.threads"})
    set_threads(cfg.runtime.threads)

    from edgeexit.train.calibrate import calibrate_run

    result = calibrate_run(run.root, cfg)
    print(json.dumps(result, indent=2, default=str))


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit temperatures on the validation split; ensemble weights")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_choice(p, "--mode", names="calibration.mode", help="one temperature per exit (default) or one global")
    add_threads_flag(p)
    add_set_flag(p)


# --- evaluate / reproduce ----------------------------------------------------------------------------------

EVALUATE_SHORTCUTS = {
    "distortion": "experiment.distortion",
    "levels": "experiment.levels",
    "alphas": "experiment.alphas",
    "edge_branches": "experiment.edge_branches",
    "strategies": "experiment.strategies",
    "threads": "runtime.threads",
}


@command("evaluate")
def run_evaluate(args: argparse.Namespace) -> None:
    from edgeexit.rundir import RunDir

    run = RunDir(Path(args.run_dir))
    cfg = apply_overrides(run.load_config(), args, EVALUATE_SHORTCUTS)
    set_threads(cfg.runtime.threads)

    from edgeexit.evaluate.aggregate import format_summary
    from edgeexit.evaluate.sweep import evaluate_run

    _, summary = evaluate_run(run.root, cfg, limit=args.limit)
    print(format_summary(summary))
    print(f"\nrecords: {run.records}; summary: {run.summary}")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="offline sweep: every strategy, alpha and k from one pass per level")
    p.add_argument("run_dir", metavar="RUN_DIR")
    g = p.add_argument_group("config shortcuts", "each sets one [experiment] value of the run's config")
    add_choice(g, "--distortion", names="distortion", help="experiment.distortion")
    g.add_argument("--levels", type=float, nargs="+", help="experiment.levels: distortion levels")
    g.add_argument("--alphas", type=float, nargs="+", help="experiment.alphas: confidence thresholds")
    g.add_argument("--edge-branches", type=int, nargs="+", help="experiment.edge_branches: values of k")
    add_choice(g, "--strategies", nargs="+", names="strategy", help="experiment.strategies")
    add_threads_flag(g)
    add_set_flag(p)
    p.add_argument("--limit", type=int, help="only the first N test images")


@command("reproduce")
def run_reproduce(args: argparse.Namespace) -> None:
    cfg = run_config(args, {"threads": "runtime.threads", "runtime": "runtime.backend"})
    set_threads(cfg.runtime.threads)

    from edgeexit.experiment.pipeline import reproduce

    page = reproduce(cfg, args.out, quick=args.quick)
    print(f"report: {page}  (and {page.with_suffix('.md')})")


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="the paper's whole experiment: train, calibrate, sweep, serve, report"
    )
    p.add_argument(
        "--config", help="TOML config (default: configs/default.toml settings, the embedded dataset)"
    )
    p.add_argument("--out", help="run directory (default: runs/default, or runs/quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (about two minutes on 2 CPU cores)")
    add_runtime_flag(p, default=None, help="runtime.backend: the online run's edge and cloud runtime")
    add_threads_flag(p)
    add_set_flag(p)
