"""Run configuration: dataclasses with the paper's settings as defaults, loaded from TOML.

A config file has one table per dataclass below ([dataset], [model], [train], [calibration], [experiment],
[link]); any key left out keeps its default. An unknown table or key is an error that names the accepted ones.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from edgeexit.errors import UserError

__all__ = [
    "DatasetConfig",
    "ModelConfig",
    "TrainConfig",
    "CalibrationConfig",
    "ExperimentConfig",
    "LinkConfig",
    "RunConfig",
    "load_config",
    "default_config",
    "PAPER_BLUR_LEVELS",
]

PAPER_BLUR_LEVELS = [0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.2, 1.5, 1.8]


@dataclass
class DatasetConfig:
    """Which images, and how they are split."""

    name: str = "mnist5k"
    root: str | None = None
    split_seed: int = 0
    input_size: int | None = None  # None: the dataset's default (32 for the small ones, 224 otherwise)


@dataclass
class ModelConfig:
    """The backbone and where its side branches go."""

    backbone: str = "mobilenet_v2"
    branches: int = 3
    placement: str = "linear"  # linear (SPINN, the paper's) | pareto | explicit
    branch_blocks: list[int] | None = None  # explicit block indices (placement = explicit)
    head: str = "bnpool"
    weights: str = "random"  # random | imagenet | path to a state-dict file


@dataclass
class TrainConfig:
    """Joint training of every exit (and of the conventional baseline with the same recipe)."""

    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    patience: int = 5  # early stopping on validation loss
    exit_weights: list[float] | None = None  # loss = sum_i w_i CE_i; None: all 1
    augment: bool = True
    distortion: str | None = None  # train on distorted images only when asked
    distortion_levels: list[float] = field(default_factory=list)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    conventional: str = "separate"  # separate: train its own model | final_exit: use the EE-DNN's final exit


@dataclass
class CalibrationConfig:
    """Temperature scaling on the validation split."""

    mode: str = "per_exit"  # per_exit | global
    max_iter: int = 100
    bins: int = 15


@dataclass
class ExperimentConfig:
    """The offline sweep and the online runs."""

    distortion: str = "gaussian_blur"
    levels: list[float] = field(default_factory=lambda: list(PAPER_BLUR_LEVELS))
    alphas: list[float] = field(default_factory=lambda: [0.8, 0.9])
    edge_branches: list[int] = field(default_factory=lambda: [1, 2, 3])
    strategies: list[str] = field(default_factory=lambda: ["ee", "ensemble", "ensemble-mean", "entropy", "conventional"])
    batch_size: int = 256
    online_k: int = 3
    online_strategies: list[str] = field(default_factory=lambda: ["ee", "ensemble", "conventional"])
    online_images: int = 100  # test images per blur level in the online run; 0 = the whole test split
    precision: str = "fp32"  # wire precision of the offloaded tensor: fp32 | fp16 | int8
    seed: int = 0


@dataclass
class LinkConfig:
    """The edge-cloud link: the paper's measured one, emulated on loopback by default."""

    emulate: bool = True
    rtt_ms: float = 11.91
    bandwidth_mbit: float = 93.9
    cloud_url: str | None = None  # a real remote cloud server instead of a local one


@dataclass
class RunConfig:
    """One whole run: every section."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    link: LinkConfig = field(default_factory=LinkConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from nested dicts; unknown tables or keys raise a UserError naming the accepted ones."""
        return _build(cls, data, source)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        name = f"[{unknown[0]}]" if where == "config" else f"{where}.{unknown[0]}"
        raise UserError(f"unknown config key {name}; accepted: {', '.join(known)}")
    values = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            values[name] = _build(type(default), value, f"{where}.{name}" if where != "config" else name)
        else:
            values[name] = value
    return cls(**values)


def default_config() -> RunConfig:
    """The embedded default run (configs/default.toml): mnist5k at 32 px, MobileNetV2, 3 branches.

    Its exit heads are `pool` rather than the library default `bnpool`: at 32 px the first branch sits on an
    8x8x24 map, where a global average pool leaves 24 features; measured on 2 CPU cores, the first exit reached
    55% test accuracy with `bnpool` and 94% with `pool` (the final exit 97% with either).
    """
    cfg = RunConfig()
    cfg.model.head = "pool"
    return cfg


def load_config(path: str | Path | None = None) -> RunConfig:
    """The embedded default run, or a TOML file over the built-in defaults when given."""
    if path is None:
        return default_config()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    return RunConfig.from_dict(data)
