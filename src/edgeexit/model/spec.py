"""ModelSpec: everything needed to rebuild, preprocess for and calibrate a model; travels with its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgeexit.data.preprocess import Preprocessing
from edgeexit.errors import UserError

__all__ = ["ModelSpec", "KINDS"]

KINDS = ("early_exit", "conventional")


@dataclass
class ModelSpec:
    """The architecture, preprocessing and calibration of one model (weights live beside it)."""

    backbone: str
    num_classes: int
    class_names: list[str]
    input_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    branch_blocks: list[int]  # index of the backbone block after which each side branch sits
    head: str = "bnpool"
    placement: str = "linear"
    kind: str = "early_exit"  # "conventional": no side branches, runs whole in the cloud
    weights_init: str = "random"
    dataset: str = ""
    data_root: str | None = None
    split_seed: int = 0
    temperatures: list[float] | None = None  # one per exit (final last), fitted on the validation split
    ensemble_weights: list[float] | None = None  # branch validation accuracies, normalised to sum to 1
    exit_val_accuracy: list[float] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    # made by `edgeexit.wrap`: {"source": "torchvision:NAME" | "module:factory" | None, "model_kwargs": {...},
    # "exits": [dotted module names]}; None for the built-in backbones
    wrapped: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown model kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.input_size <= 0:
            raise UserError(f"input size must be positive, got {self.input_size}")
        if len(self.class_names) != self.num_classes:
            raise UserError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def num_branches(self) -> int:
        """N, the number of side branches."""
        return len(self.branch_blocks)

    @property
    def num_exits(self) -> int:
        """N + 1: the side branches and the final exit."""
        return self.num_branches + 1

    @property
    def preprocessing(self) -> Preprocessing:
        """How this model's inputs are prepared (resize, crop, mean/std): the facts travel with the weights."""
        return Preprocessing(self.input_size, self.resize_size, tuple(self.mean), tuple(self.std))

    def temperature(self, i: int) -> float | None:
        """The fitted temperature of exit i (1-based; `num_exits` is the final exit), None before calibration."""
        if not 1 <= i <= self.num_exits:
            raise ValueError(f"exit i must be in 1..{self.num_exits}, got {i}")
        return None if self.temperatures is None else float(self.temperatures[i - 1])

    @property
    def calibrated(self) -> bool:
        """Whether temperatures have been fitted."""
        return self.temperatures is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `wrapped` only when set, so an ordinary spec.json reads as it did before `wrap`
        existed (older edgeexit versions load it)."""
        d = asdict(self)
        if d["wrapped"] is None:
            del d["wrapped"]
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal specs serialise to equal bytes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild from `to_dict` output; unknown or missing keys are a UserError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown model spec keys {unknown}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"incomplete model spec: {exc}") from None

    def identity(self) -> dict[str, Any]:
        """The fields that change what the model computes (hashed with the weights)."""
        drop = {"training", "metrics", "content_hash", "data_root"}  # to_dict leaves out an unset `wrapped`,
        return {k: v for k, v in self.to_dict().items() if k not in drop}  # so older specs keep their hashes
