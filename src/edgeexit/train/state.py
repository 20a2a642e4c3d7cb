"""The resumable training state in RUN_DIR/<which>/train_state/: committed after every epoch, atomically.

    state.json                          the commit record of the last completed epoch (written last)
    weights-eNNNN.safetensors           that epoch's current weights
    optim-eNNNN.pt                      its optimizer and scheduler state

state.json also holds the fingerprint of the config that determines the result: a resumption with another
config (or another class count) is refused.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig, TrainConfig
from edgeexit.errors import UserError

__all__ = [
    "STATE_FORMAT",
    "TrainState",
    "load_state",
    "commit_state",
    "restore_state",
    "fingerprint",
    "check_resumable",
    "progress_metrics",
]

STATE_FORMAT = "edgeexit-train-state"
# Config keys that may differ between an interrupted run and its resumption (they do not change the result).
RESUME_FREE = {"train.device", "train.num_workers", "train.conventional", "train.tensorboard"}


@dataclass
class TrainState:
    """What a completed epoch commits (state.json); tensors live in the files it names."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] | None = None
    finished: bool = False

    def done(self, t: TrainConfig) -> bool:
        """Finished, out of epochs, or out of patience."""
        return self.finished or self.epoch >= t.epochs or self.bad_epochs >= t.patience


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config entries that determine a training's result, flattened to 'section.key'."""
    out = {}
    for section in ("dataset", "model", "train"):
        for k, v in getattr(cfg, section).model_dump().items():
            if f"{section}.{k}" not in RESUME_FREE:
                out[f"{section}.{k}"] = v
    return out


def progress_metrics(st: TrainState) -> dict[str, Any]:
    """The best epoch so far, its validation loss and the epochs run (a checkpoint's metrics mid-training)."""
    return {"best_epoch": st.best_epoch, "best_val_loss": st.best_val_loss, "epochs_run": st.epoch}


def load_state(state_dir: Path) -> tuple[TrainState, dict[str, Any]] | None:
    """The last committed state and its whole record, or None when nothing was committed."""
    path = state_dir / "state.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError("not an edgeexit training state")
        fields = {k: doc[k] for k in TrainState.__dataclass_fields__}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt training state {path}: {exc}; start afresh without --resume") from None
    st = TrainState(**fields)
    st.best_val_loss = float(st.best_val_loss) if st.best_val_loss is not None else math.inf
    return st, doc


def commit_state(
    state_dir: Path,
    st: TrainState,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    extra: dict[str, Any],
) -> None:
    """Write this epoch's weights and optimizer files, then state.json naming them, then drop older files."""
    tag = f"e{st.epoch:04d}"
    weights_name, optim_name = f"weights-{tag}.safetensors", f"optim-{tag}.pt"
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write_bytes(state_dir / weights_name, save_safetensors(state))
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None}, buf)
    atomic_write_bytes(state_dir / optim_name, buf.getvalue())
    doc = {"format": STATE_FORMAT, "version": 1, **asdict(st), **extra}
    doc.update(weights_file=weights_name, optim_file=optim_name)
    if not math.isfinite(st.best_val_loss):
        doc["best_val_loss"] = None
    atomic_write_bytes(state_dir / "state.json", json.dumps(doc, indent=1).encode())
    for p in state_dir.iterdir():  # older epochs' files (and temp files of a crashed write)
        if p.name not in ("state.json", weights_name, optim_name) and p.is_file():
            p.unlink(missing_ok=True)


def restore_state(
    state_dir: Path, doc: dict[str, Any], net: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> None:
    """Load the current weights and optimizer/scheduler state an epoch committed."""
    wpath, opath = state_dir / str(doc.get("weights_file")), state_dir / str(doc.get("optim_file"))
    try:
        net.load_state_dict(load_safetensors(wpath.read_bytes()), strict=True)
        blob = torch.load(opath, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        opt.load_state_dict(blob["optimizer"])
        if sched is not None:
            sched.load_state_dict(blob["scheduler"])
    except (OSError, SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot resume from {state_dir}: {first}; start afresh without --resume") from None


def check_resumable(doc: dict[str, Any], cfg: RunConfig, num_classes: int, state_dir: Path) -> None:
    """Refuse to resume a state recorded with another class count or a config that changes the result."""
    if doc.get("num_classes") != num_classes:
        raise UserError(
            f"cannot resume {state_dir}: the checkpoint has {doc.get('num_classes')} classes but dataset "
            f"{cfg.dataset.name!r} has {num_classes}"
        )
    old = doc.get("config") or {}
    new = fingerprint(cfg)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserError(
            f"cannot resume {state_dir}: the config differs from the interrupted run's in {', '.join(diff)}; "
            "resume with the same config, or train afresh without --resume"
        )
