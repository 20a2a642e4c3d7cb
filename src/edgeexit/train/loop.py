"""Joint training of every exit (sum of weighted cross-entropies): the epoch loop, validation, the final step.

Layout inside RUN_DIR/<which>/:
    weights.safetensors + spec.json     the best-validation-loss weights so far (the model checkpoint)
    metrics.jsonl                       one line per completed epoch
    train_state/                        the resumable state of the last completed epoch (see train.state)

Determinism: the model is initialised from `train.seed`; every epoch reseeds the global RNGs (torch, numpy,
python) and draws its batch order and augmentation from generators seeded by (seed, epoch, rank). An epoch's
randomness therefore depends only on the seed and the weights it starts from, so a run resumed after
epoch e continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from edgeexit import threads
from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig, TrainConfig
from edgeexit.data import DEFAULT_LEVELS, ImageDataset, Preprocessing, Split
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.model import EarlyExitNet, ModelSpec, load_spec, new_model, save_checkpoint
from edgeexit.model.checkpoint import WEIGHTS
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.train import distributed as ddp
from edgeexit.train.conventional import conventional_from_final_exit
from edgeexit.train.data import (
    SplitData,
    augment,
    collect_logits,
    drop_lone_last,
    generator,
    load_split_data,
    seed_of,
)
from edgeexit.train.state import (
    TrainState,
    check_resumable,
    commit_state,
    fingerprint,
    load_state,
    progress_metrics,
    restore_state,
)
from edgeexit.train.steps import ExitScores, batch_sums, scores, train_epoch
from edgeexit.train.tensorboard import log_epoch, open_writer

__all__ = ["train_model", "warn_chance_accuracy", "exit_name", "exit_weights", "make_optimizer"]

log = logging.getLogger(__name__)
log.addFilter(ddp.MainRankOnly())


def train_model(
    run_dir: Path,
    cfg: RunConfig,
    which: str = "ee",
    resume: bool = False,
    *,
    epoch_callback: Callable[[int], None] | None = None,
) -> ModelSpec:
    """Train the EE-DNN (`ee`) or the conventional DNN into RUN_DIR/<which>; returns the final checkpoint's spec.

    `resume=True` continues from the last completed epoch (fresh start, logged, when there is none).
    `epoch_callback(epoch)` runs on every rank after each epoch's state is committed (a hook for tests and
    progress reporting). Launched by torchrun, trains with DistributedDataParallel.
    """
    run = RunDir(Path(run_dir))
    run.model_dir(which)  # validates `which`
    cfg.check()  # fields assigned one by one since the config was built must still agree with each other
    levels = _distortion_levels(cfg.train)
    device = resolve_device(cfg.train.device)
    info = ddp.setup(device.type)
    ok = False
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if info.is_main:
            _record_config(run, cfg)
        if which == "conventional" and cfg.train.conventional == "final_exit":
            spec = conventional_from_final_exit(run, info)
        else:
            spec = _train(run, cfg, which, resume, levels, device, info, epoch_callback)
        ok = True
        return spec
    finally:
        ddp.teardown(info, ok)


def _distortion_levels(t: TrainConfig) -> list[float]:
    """The levels a training distortion is drawn from: the config's, else the distortion's defaults."""
    if not t.distortion:
        return []
    return [float(v) for v in (t.distortion_levels or DEFAULT_LEVELS[t.distortion])]


def _record_config(run: RunDir, cfg: RunConfig) -> None:
    if not run.config.is_file():
        run.save_config(cfg)
        return
    try:
        old = fingerprint(run.load_config())
    except UserError:
        return
    diff = sorted(k for k, v in fingerprint(cfg).items() if old.get(k) != v)
    if diff:
        log.warning("%s was recorded with other values for %s; keeping it", run.config, ", ".join(diff))


def exit_weights(t: TrainConfig, num_exits: int, which: str) -> list[float]:
    """Loss weights per exit: all 1 by default; the conventional model uses the final exit's weight."""
    if t.exit_weights is None:
        return [1.0] * num_exits
    w = [float(v) for v in t.exit_weights]
    return w[-1:] if which == "conventional" else w


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimizer(params: Any, t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


@torch.no_grad()
def _evaluate(
    net: nn.Module,
    data: SplitData,
    prep: Preprocessing,
    device: torch.device,
    w: list[float],
    info: ddp.DistInfo,
) -> ExitScores:
    """Weighted validation loss (mean per sample), every exit's loss and accuracy, summed over ranks."""
    order = ddp.shard(torch.arange(len(data)), info, pad=False)
    sums = torch.zeros(2 + 2 * len(w), dtype=torch.float64)
    if order.numel():
        logits, y = collect_logits(net, data, prep, device, order=order, desc="validate")
        sums = batch_sums(logits, y, w)
    return scores(ddp.all_reduce_sum(sums.to(device), info).cpu())


def _build(
    cfg: RunConfig, which: str, ds: ImageDataset, split: Split, prep: Preprocessing
) -> tuple[EarlyExitNet, ModelSpec]:
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    return new_model(
        m.backbone,
        num_classes=len(ds.class_names),
        class_names=ds.class_names,
        input_size=prep.input_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        branches=m.branches,
        placement=m.placement,
        branch_blocks=m.branch_blocks,
        head=m.head,
        weights=m.weights,
        kind="conventional" if which == "conventional" else "early_exit",
        dataset=ds.name,
        data_root=cfg.dataset.root,
        split_seed=split.seed,
    )


@dataclass
class _Job:
    """What one training works on, fixed before the first epoch."""

    run: RunDir
    cfg: RunConfig
    which: str
    ds: ImageDataset
    split: Split
    prep: Preprocessing
    weights: list[float]
    device: torch.device
    info: ddp.DistInfo


def _train(
    run: RunDir,
    cfg: RunConfig,
    which: str,
    resume: bool,
    levels: list[float],
    device: torch.device,
    info: ddp.DistInfo,
    epoch_callback: Callable[[int], None] | None,
) -> ModelSpec:
    t = cfg.train
    out_dir = run.model_dir(which)
    state_dir = out_dir / "train_state"
    ds, split, prep = prepare_data(cfg, run, save=info.is_main)
    num_classes = len(ds.class_names)

    loaded = load_state(state_dir) if resume else None
    if resume and loaded is None:
        log.info("nothing to resume in %s: starting fresh", out_dir)
    if loaded is not None:
        check_resumable(loaded[1], cfg, num_classes, state_dir)
    elif info.is_main:
        # a fresh start: a crash before its first epoch must not leave an older run's state to resume
        (state_dir / "state.json").unlink(missing_ok=True)

    net, spec = _build(cfg, which, ds, split, prep)
    weights = exit_weights(t, net.num_branches + 1, which)
    spec.training = {**t.model_dump(), "exit_weights_used": weights, "world_size": info.world_size}
    net.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels nondeterministically
    opt = make_optimizer(net.parameters(), t)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs) if t.schedule == "cosine" else None
    )

    st = TrainState(history=[])
    best_state: dict[str, torch.Tensor] | None = None
    if loaded is not None:
        st, doc = loaded
        st.history = list(st.history or [])
        restore_state(state_dir, doc, net, opt, sched)
        if st.best_epoch and (out_dir / WEIGHTS).is_file():
            best_state = load_safetensors((out_dir / WEIGHTS).read_bytes())
        elif st.best_epoch:
            log.warning("best checkpoint %s is missing: the final model will hold the last weights", out_dir)
        log.info("resuming %s after epoch %d (best epoch %d)", which, st.epoch, st.best_epoch)
        if st.finished:
            log.info("%s training already complete in %s", which, out_dir)
            return load_spec(out_dir)

    train_data = load_split_data(ds, split.train, prep, t.num_workers)
    val_data = load_split_data(ds, split.val, prep, t.num_workers)
    model = ddp.wrap(net, info, device)
    per_rank_batch = max(1, t.batch_size // info.world_size)  # keep the global batch size of the config
    record = {"config": fingerprint(cfg), "num_classes": num_classes, "which": which}
    dropped_logged = False
    board = open_writer(run.tensorboard / which) if t.tensorboard and info.is_main else None

    while not st.done(t):
        epoch = st.epoch + 1
        threads.adapt()  # on a shared machine, fewer threads than cores (edgeexit.threads)
        started = time.perf_counter()
        _seed_globals(seed_of(t.seed, epoch, info.rank, 0))
        order = ddp.shard(torch.randperm(len(train_data), generator=generator(t.seed, epoch, 0, 1)), info)
        kept = drop_lone_last(order, per_rank_batch)  # BatchNorm cannot train on a batch of one
        if kept.numel() < order.numel() and not dropped_logged:
            dropped_logged = True
            log.info(
                "each epoch drops its last training batch: it would hold 1 sample, too few for BatchNorm"
            )
        order = kept
        gen = generator(t.seed, epoch, info.rank, 2)
        lr = opt.param_groups[0]["lr"]

        def to_input(x: torch.Tensor, gen: torch.Generator = gen) -> torch.Tensor:
            return prep.normalize(augment(x.to(device), ds.name, t, levels, gen))

        sums = train_epoch(
            model,
            train_data.batches(order, per_rank_batch),
            opt=opt,
            weights=weights,
            to_input=to_input,
            device=device,
            desc=f"{which} epoch {epoch}/{t.epochs}",
            total=math.ceil(order.numel() / per_rank_batch),
            enabled=info.is_main,
        )
        if sched is not None:
            sched.step()
        train = scores(ddp.all_reduce_sum(sums.to(device), info).cpu())
        train_loss = train.loss
        val = _evaluate(net, val_data, prep, device, weights, info)
        val_loss, val_acc = val.loss, val.exit_accuracy
        seconds = time.perf_counter() - started

        improved = math.isfinite(val_loss) and val_loss < st.best_val_loss
        st.epoch = epoch
        st.train_seconds += seconds
        st.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "seconds": seconds,
            }
        )
        if improved:
            st.best_val_loss, st.best_epoch, st.bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}
        else:
            st.bad_epochs += 1
        log.info(
            "%s epoch %d/%d: train loss %.4f, val loss %.4f%s, val acc per exit %s",
            which,
            epoch,
            t.epochs,
            train_loss,
            val_loss,
            " (best)" if improved else "",
            " ".join(f"{a:.4f}" for a in val_acc),
        )
        if info.is_main:
            if improved:
                spec.metrics = progress_metrics(st)
                save_checkpoint(out_dir, net, spec)
            lines = "".join(json.dumps(h) + "\n" for h in st.history)
            atomic_write_bytes(out_dir / "metrics.jsonl", lines.encode())
            commit_state(state_dir, st, net, opt, sched, record)
        if board is not None:
            log_epoch(board, epoch, train=train, val=val, lr=lr)
        ddp.barrier(info)
        if epoch_callback is not None:
            epoch_callback(epoch)

    if board is not None:
        board.close()
    if st.bad_epochs >= t.patience and st.epoch < t.epochs:
        log.info(
            "early stopping after epoch %d: no better validation loss for %d epochs", st.epoch, t.patience
        )
    job = _Job(run, cfg, which, ds, split, prep, weights, device, info)
    return _finish(job, net, spec, st, best_state, opt, sched, record)


def exit_name(i: int, num_exits: int) -> str:
    """The name of exit `i` (1-based) among `num_exits`: its number, or "final" for the last."""
    return "final" if i == num_exits else str(i)


def warn_chance_accuracy(accuracy: list[float], num_classes: int, what: str = "accuracy") -> list[str]:
    """Log (and return) a WARNING for every exit whose accuracy is at or near chance: <= 1.5 / num_classes."""
    limit = 1.5 / num_classes
    messages = [
        f"{what} of exit {exit_name(i, len(accuracy))} is {a:.4f}, at or near chance (1/{num_classes} = "
        f"{1 / num_classes:.4f}): the model has barely learned; train for more epochs (train.epochs) "
        "or check the data"
        for i, a in enumerate(accuracy, start=1)
        if a <= limit
    ]
    for m in messages:
        log.warning("%s", m)
    return messages


def _finish(
    job: _Job,
    net: EarlyExitNet,
    spec: ModelSpec,
    st: TrainState,
    best_state: dict[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    sched: Any,
    record: dict[str, Any],
) -> ModelSpec:
    """Load the best weights, measure test accuracy per exit, write the final checkpoint and mark the state done."""
    out_dir = job.run.model_dir(job.which)
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state, strict=True)
    else:
        log.warning("no epoch reached a finite validation loss: keeping the last weights")
    test_data = load_split_data(job.ds, job.split.test, job.prep, job.cfg.train.num_workers)
    test_acc = _evaluate(net, test_data, job.prep, job.device, job.weights, job.info).exit_accuracy
    spec.metrics = {
        **progress_metrics(st),
        "test_accuracy": test_acc,
        "stopped_early": st.epoch < job.cfg.train.epochs,
        "train_seconds": round(st.train_seconds, 3),
    }
    log.info("%s test accuracy per exit: %s", job.which, " ".join(f"{a:.4f}" for a in test_acc))
    warn_chance_accuracy(test_acc, spec.num_classes, f"{job.which} test accuracy")
    if job.info.is_main:
        save_checkpoint(out_dir, net, spec)
        st.finished = True
        net.load_state_dict(current, strict=True)  # the resume state keeps the last epoch's weights
        commit_state(out_dir / "train_state", st, net, opt, sched, record)
    ddp.barrier(job.info)
    return load_spec(out_dir)
