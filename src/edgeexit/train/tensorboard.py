"""Optional TensorBoard scalars (`[train] tensorboard = true`, or `fit(..., tensorboard=DIR)`).

Tags, with exits named 1..N and `final`:
    loss/train/exit_<i>, accuracy/train/exit_<i>, loss/val/exit_<i>, accuracy/val/exit_<i>   per epoch
    loss/train, loss/val (the weighted joint loss), lr                                         per epoch
    calibration/ece_before/exit_<i>, calibration/ece_after/exit_<i>, calibration/temperature/exit_<i>

`torch.utils.tensorboard` is imported only when a writer is opened; without the tensorboard package that
is a one-line UserError saying how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeexit.errors import UserError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from edgeexit.train.steps import ExitScores

__all__ = ["open_writer", "log_epoch", "log_calibration"]

INSTALL = "pip install 'edgeexit[tensorboard]' (or pip install tensorboard)"


def open_writer(logdir: Path | str) -> SummaryWriter:
    """A SummaryWriter writing into `logdir`; a UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            f"TensorBoard logging is on ([train] tensorboard = true) but the tensorboard package is not "
            f"installed: {INSTALL}, or set train.tensorboard = false"
        ) from None
    Path(logdir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(logdir))


def _exit(i: int, n: int) -> str:
    return "final" if i == n else str(i)


def _per_exit(writer: SummaryWriter, tag: str, values: Sequence[float], step: int) -> None:
    for i, v in enumerate(values, start=1):
        writer.add_scalar(f"{tag}/exit_{_exit(i, len(values))}", float(v), step)


def log_epoch(
    writer: SummaryWriter, epoch: int, *, train: ExitScores, val: ExitScores | None, lr: float
) -> None:
    """One epoch's scalars: per-exit loss and accuracy (train and validation), joint losses, learning rate."""
    _per_exit(writer, "loss/train", train.exit_loss, epoch)
    _per_exit(writer, "accuracy/train", train.exit_accuracy, epoch)
    writer.add_scalar("loss/train", train.loss, epoch)
    if val is not None:
        _per_exit(writer, "loss/val", val.exit_loss, epoch)
        _per_exit(writer, "accuracy/val", val.exit_accuracy, epoch)
        writer.add_scalar("loss/val", val.loss, epoch)
    writer.add_scalar("lr", float(lr), epoch)
    writer.flush()


def log_calibration(writer: SummaryWriter, exits: Sequence[dict[str, Any]], step: int = 0) -> None:
    """Per exit: ECE before and after temperature scaling, and the temperature (rows of calibration.json)."""
    n = len(exits)
    for i, row in enumerate(exits, start=1):
        name = _exit(i, n)
        writer.add_scalar(f"calibration/ece_before/exit_{name}", float(row["ece_before"]), step)
        writer.add_scalar(f"calibration/ece_after/exit_{name}", float(row["ece_after"]), step)
        writer.add_scalar(f"calibration/temperature/exit_{name}", float(row["temperature"]), step)
    writer.flush()
