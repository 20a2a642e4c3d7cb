"""Training and calibration from Python with the user's own DataLoaders (`edgeexit.fit`, `edgeexit.calibrate_model`).

The same steps as `edgeexit train` and `edgeexit calibrate` (`train.steps`, `train.calibrate.fit_exits`), without
a run directory, a dataset registry or DDP: the loaders give (images, labels) batches, uint8 (normalised with
`spec.preprocessing`) or float (already normalised with the spec's mean and std); augmentation is the
loader's business. The best-validation-loss weights are kept, as in `edgeexit train`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgeexit.config import TrainConfig
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.inference import calibrated_probs, device_of
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.spec import ModelSpec
from edgeexit.train.steps import ExitScores, as_input, batch_sums, batches_logits, scores, train_epoch

__all__ = ["fit", "calibrate_model", "loader_logits"]

log = logging.getLogger(__name__)

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]


def loader_logits(
    net: EarlyExitNet, spec: ModelSpec, loader: Loader, desc: str = "logits"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every exit (float32, CPU, final last) and the labels over `loader`, in eval mode."""
    device = device_of(net)
    return batches_logits(net, loader, lambda x: as_input(x, spec.preprocessing, device), desc)


def _len(loader: Loader) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def fit(
    net: EarlyExitNet,
    spec: ModelSpec,
    train_loader: Loader,
    val_loader: Loader | None = None,
    *,
    epochs: int | None = None,
    config: TrainConfig | None = None,
    tensorboard: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train every exit of `net` jointly on `train_loader`; returns one dict per epoch.

    `config` holds the recipe (optimizer, lr, schedule, patience, exit_weights, seed, device; augmentation and
    distortion settings are not used here), `epochs` overrides its epoch count. With `val_loader`, `net` ends
    with the weights of the epoch of lowest validation loss and `spec.metrics` records it; `tensorboard` is a
    directory for TensorBoard scalars. `net` is left in eval mode on the config's device.
    """
    from edgeexit.train.loop import exit_weights, make_optimizer, warn_chance_accuracy

    t = (config or TrainConfig()).model_copy()
    if epochs is not None:
        t.epochs = epochs  # validated on assignment
    device = resolve_device(t.device)
    weights = exit_weights(t, spec.num_exits, spec.kind)
    if len(weights) != spec.num_exits:
        raise UserError(f"train.exit_weights has {len(weights)} weights for {spec.num_exits} exits")
    torch.manual_seed(t.seed)
    net.to(device)
    opt = make_optimizer(net.parameters(), t)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs) if t.schedule == "cosine" else None
    )
    board = None
    if tensorboard is not None:
        from edgeexit.train.tensorboard import open_writer

        board = open_writer(tensorboard)
    prep = spec.preprocessing

    def to_input(x: torch.Tensor) -> torch.Tensor:
        return as_input(x, prep, device)

    history: list[dict[str, Any]] = []
    best_loss, best_epoch, bad = math.inf, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    val: ExitScores | None = None
    try:
        for epoch in range(1, t.epochs + 1):
            started = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            sums = train_epoch(
                net,
                train_loader,
                opt=opt,
                weights=weights,
                to_input=to_input,
                device=device,
                desc=f"fit epoch {epoch}/{t.epochs}",
                total=_len(train_loader),
            )
            if sched is not None:
                sched.step()
            train = scores(sums)
            if train.n == 0:
                raise UserError("the training loader gave no batch of 2 or more images")
            val = None
            if val_loader is not None:
                logits, y = batches_logits(net, val_loader, to_input, desc="validate")
                val = scores(batch_sums([z.to(device) for z in logits], y.to(device), weights))
            row = {
                "epoch": epoch,
                "train_loss": train.loss,
                "train_acc": train.exit_accuracy,
                "val_loss": val.loss if val else None,
                "val_acc": val.exit_accuracy if val else None,
                "lr": lr,
                "seconds": time.perf_counter() - started,
            }
            history.append(row)
            log.info(
                "fit epoch %d/%d: train loss %.4f%s",
                epoch,
                t.epochs,
                train.loss,
                f", val loss {val.loss:.4f}, val acc per exit "
                + " ".join(f"{a:.4f}" for a in val.exit_accuracy)
                if val
                else "",
            )
            if board is not None:
                from edgeexit.train.tensorboard import log_epoch

                log_epoch(board, epoch, train=train, val=val, lr=lr)
            if val is not None:
                if math.isfinite(val.loss) and val.loss < best_loss:
                    best_loss, best_epoch, bad = val.loss, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= t.patience:
                        log.info("early stopping after epoch %d: no better validation loss", epoch)
                        break
    finally:
        if board is not None:
            board.close()
    if best_state is not None:
        net.load_state_dict(best_state, strict=True)
    net.eval()
    spec.training = {**t.model_dump(), "exit_weights_used": weights, "source": "edgeexit.fit"}
    spec.metrics = {"epochs_run": len(history), "best_epoch": best_epoch or None}
    if val is not None and best_state is not None:
        spec.metrics["best_val_loss"] = best_loss
        spec.metrics["val_accuracy"] = history[best_epoch - 1]["val_acc"]
        warn_chance_accuracy(spec.metrics["val_accuracy"], spec.num_classes, "validation accuracy")
    return history


def calibrate_model(
    net: EarlyExitNet,
    spec: ModelSpec,
    val_loader: Loader,
    *,
    mode: str = "per_exit",
    bins: int = 15,
    max_iter: int = 100,
    tensorboard: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Fit per-exit temperatures and ensemble weights on `val_loader`, into `spec`; one row per exit.

    Rows: exit, temperature, val_accuracy, nll_before/after, ece_before/after (`bins` confidence bins), as in
    RUN_DIR/calibration/calibration.json. `tensorboard`: a directory for the ECE scalars.
    """
    from edgeexit.train.calibrate import expected_calibration_error, fit_exits, warn_wild_temperatures

    logits, y = loader_logits(net, spec, val_loader, desc="calibrate")
    if len(logits) != spec.num_exits:
        raise UserError(f"the model gave {len(logits)} exits, its spec says {spec.num_exits}")
    temps, ens, acc = fit_exits(logits, y, mode, max_iter)
    before, after = calibrated_probs(logits, None), calibrated_probs(logits, temps)
    rows = []
    for i, (z, t) in enumerate(zip(logits, temps, strict=True), start=1):
        rows.append(
            {
                "exit": "final" if i == len(logits) else str(i),
                "temperature": t,
                "val_accuracy": acc[i - 1],
                "nll_before": float(F.cross_entropy(z, y)),
                "nll_after": float(F.cross_entropy(z / t, y)),
                "ece_before": expected_calibration_error(before[i - 1], y, bins),
                "ece_after": expected_calibration_error(after[i - 1], y, bins),
            }
        )
    warn_wild_temperatures(temps)
    spec.temperatures, spec.ensemble_weights, spec.exit_val_accuracy = temps, ens, acc
    if tensorboard is not None:
        from edgeexit.train.tensorboard import log_calibration, open_writer

        with open_writer(tensorboard) as writer:
            log_calibration(writer, rows)
    return rows
