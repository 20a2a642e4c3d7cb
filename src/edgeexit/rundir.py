"""The run directory: one place per run for its config, split, checkpoints, caches, records and report.

RUN_DIR/config.json        the RunConfig the run was started with
RUN_DIR/split.json         the persisted train/val/test split (shared by every model of the run)
RUN_DIR/ee/                the EE-DNN checkpoint (weights.safetensors + spec.json) and its training state
RUN_DIR/conventional/      the conventional DNN checkpoint
RUN_DIR/onnx/              the ONNX export for runtime "onnx" (`edgeexit export RUN_DIR --format onnx`)
RUN_DIR/calibration/       reliability diagrams and calibration.json
RUN_DIR/cache/             cached calibrated probabilities of every exit, per distortion level
RUN_DIR/records.parquet    offline per-sample records; summary.csv the aggregates
RUN_DIR/online/            online (served) records
RUN_DIR/tensorboard/       TensorBoard event files per model, when [train] tensorboard = true
RUN_DIR/figures/, report.md, report.html
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig
from edgeexit.data.preprocess import Preprocessing, preprocessing_for
from edgeexit.data.sources import ImageDataset, load_dataset
from edgeexit.data.splits import Split, make_split
from edgeexit.errors import UserError

if TYPE_CHECKING:
    from edgeexit.model.early_exit import EarlyExitNet
    from edgeexit.model.spec import ModelSpec

__all__ = ["RunDir", "prepare_data", "save_run", "load_run"]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def ee(self) -> Path:
        return self.root / "ee"

    @property
    def conventional(self) -> Path:
        return self.root / "conventional"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def records(self) -> Path:
        return self.root / "records.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def online(self) -> Path:
        return self.root / "online"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def model_dir(self, which: str) -> Path:
        """`ee` or `conventional`."""
        if which not in ("ee", "conventional"):
            raise UserError(f"unknown model {which!r}; known: ee, conventional")
        return self.root / which

    def save_config(self, cfg: RunConfig) -> None:
        """Record the config the run uses (atomically)."""
        atomic_write_bytes(self.config, json.dumps(cfg.to_dict(), indent=2, sort_keys=True).encode())

    def load_config(self) -> RunConfig:
        """The config recorded in the run directory."""
        if not self.config.is_file():
            raise UserError(
                f"{self.root} is not a run directory: no config.json (run `edgeexit train` first)"
            )
        return RunConfig.from_dict(json.loads(self.config.read_text()))


def prepare_data(
    cfg: RunConfig, run: RunDir, *, save: bool = True
) -> tuple[ImageDataset, Split, Preprocessing]:
    """The dataset, the run's persisted split (made from the split seed and saved if absent) and preprocessing."""
    ds = load_dataset(cfg.dataset.name, cfg.dataset.root)
    if run.split.is_file():
        split = Split.load(run.split)
        split.check_size(len(ds))
        if split.seed != cfg.dataset.split_seed:
            raise UserError(
                f"{run.split} was made with split seed {split.seed} but the config asks for "
                f"{cfg.dataset.split_seed}; use the run's seed or a new run directory"
            )
    else:
        split = make_split(ds.labels, cfg.dataset.split_seed)
        if save:
            split.save(run.split)
    return ds, split, preprocessing_for(ds, cfg.dataset.input_size)


def save_run(run_dir: Path | str, net: EarlyExitNet, spec: ModelSpec) -> ModelSpec:
    """Save `net` and `spec` as RUN_DIR/ee, the EE-DNN that `load_runner` and the cloud server load; returns the
    spec with its content hash. A model made by `wrap` needs a `source` to be loaded again."""
    from edgeexit.model.checkpoint import save_checkpoint

    return save_checkpoint(RunDir(Path(run_dir)).ee, net, spec)


def load_run(run_dir: Path | str) -> tuple[EarlyExitNet, ModelSpec]:
    """The EE-DNN of RUN_DIR (eval mode, CPU) and its spec, checked against its content hash."""
    from edgeexit.model.checkpoint import load_checkpoint

    return load_checkpoint(RunDir(Path(run_dir)).ee)
