"""Run configuration: pydantic models with the paper's settings as defaults, loaded from TOML, validated once.

A config file has one table per section ([dataset], [model], [train], [calibration], [experiment], [link],
[runtime]);
any key left out keeps its default. Every value is checked when a config is built (from a file, a dict or
command-line overrides) and when a field is assigned; a bad value or unknown key raises a one-line UserError
that names `section.key` and, where it applies, the accepted values. Names of datasets, backbones, heads,
distortions and strategies are checked against their registries, imported only when a value is validated.
Rules that relate two fields (levels and their distortion, edge branches and model.branches, ...) run when a
whole RunConfig is built or on `RunConfig.check()`, so that related fields can be assigned one at a time.
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgeexit.errors import UserError

__all__ = [
    "DatasetConfig",
    "ModelConfig",
    "TrainConfig",
    "CalibrationConfig",
    "ExperimentConfig",
    "LinkConfig",
    "RuntimeConfig",
    "RunConfig",
    "load_config",
    "default_config",
    "choices",
    "parse_override",
    "PAPER_BLUR_LEVELS",
]

PAPER_BLUR_LEVELS = [0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.2, 1.5, 1.8]

# ---- value types -----------------------------------------------------------------------------------------

Real = Annotated[float, Strict(), AllowInfNan(False)]  # a finite number; a TOML integer is accepted
Count = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[StrictInt, Field(ge=0)]


def _registry(which: str) -> tuple[str, list[str]]:
    """(kind, known names) of a registry, imported here so that importing this module stays light."""
    if which == "dataset":
        from edgeexit.data.sources import DATASETS as reg
    elif which == "backbone":
        from edgeexit.model.adapters import BACKBONES as reg
    elif which == "head":
        from edgeexit.model.heads import HEADS as reg
    elif which == "distortion":
        from edgeexit.data.distortions import DISTORTIONS as reg
    else:
        from edgeexit.policy import STRATEGIES

        return "strategy", sorted(STRATEGIES)
    return reg.kind, reg.names()


def _registered(which: str) -> AfterValidator:
    def check(value: str) -> str:
        kind, known = _registry(which)
        if value not in known:
            raise PydanticCustomError(
                "unknown_name", "unknown {kind}", {"kind": kind, "known": ", ".join(known)}
            )
        return value

    return AfterValidator(check)


def _not_all_zero(weights: list[float] | None) -> list[float] | None:
    if weights is not None and not any(weights):
        raise PydanticCustomError("config_value", "{detail}", {"detail": "must not be all 0"})
    return weights


DatasetName = Annotated[StrictStr, _registered("dataset")]
BackboneName = Annotated[StrictStr, _registered("backbone")]
HeadName = Annotated[StrictStr, _registered("head")]
DistortionName = Annotated[StrictStr, _registered("distortion")]
StrategyName = Annotated[StrictStr, _registered("strategy")]


# ---- sections --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    """Strict, closed, validated on assignment (a bad value: a one-line UserError); build with from_dict."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _section: ClassVar[str] = ""  # the TOML table name, prefixed to the keys named in errors

    def __setattr__(self, name: str, value: Any) -> None:
        before = dict(self.__dict__)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            # a rule across fields fails after pydantic has stored the value: put the old one back
            object.__setattr__(self, "__dict__", before)
            raise _user_error(exc, self._section) from None


class DatasetConfig(_Model):
    """Which images, and how they are split."""

    _section: ClassVar[str] = "dataset"
    name: DatasetName = "mnist5k"
    root: StrictStr | None = None
    split_seed: NonNegative = 0
    input_size: Count | None = None  # None: the dataset's default (32 for the small ones, 224 otherwise)


class ModelConfig(_Model):
    """The backbone and where its side branches go."""

    _section: ClassVar[str] = "model"
    backbone: BackboneName = "mobilenet_v2"
    branches: Count = 3
    placement: Literal["linear", "pareto", "explicit"] = "linear"  # linear: SPINN's, the paper's
    branch_blocks: Annotated[list[NonNegative], Field(min_length=1)] | None = None  # placement = explicit
    head: HeadName = "bnpool"
    weights: StrictStr = "random"  # random | imagenet | path to a state-dict file


class TrainConfig(_Model):
    """Joint training of every exit (and of the conventional baseline with the same recipe)."""

    _section: ClassVar[str] = "train"
    epochs: Count = 12
    batch_size: Count = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[Real, Field(gt=0)] = 2e-3
    momentum: Annotated[Real, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[Real, Field(ge=0)] = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: Count = 5  # early stopping on validation loss
    # loss = sum_i w_i CE_i, one weight per exit (model.branches + 1); None: all 1
    exit_weights: Annotated[list[Annotated[Real, Field(ge=0)]] | None, AfterValidator(_not_all_zero)] = None
    augment: StrictBool = True
    distortion: DistortionName | None = None  # train on distorted images only when asked
    distortion_levels: list[Real] = Field(default_factory=list)  # empty: the distortion's default levels
    seed: NonNegative = 0
    num_workers: NonNegative = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # separate: train its own model | final_exit: use the EE-DNN's final exit
    conventional: Literal["separate", "final_exit"] = "separate"
    # TensorBoard scalars in RUN_DIR/tensorboard/<model>: per-exit loss and accuracy, lr, calibration ECE
    # (needs the tensorboard package: pip install 'edgeexit[tensorboard]')
    tensorboard: StrictBool = False


class CalibrationConfig(_Model):
    """Temperature scaling on the validation split."""

    _section: ClassVar[str] = "calibration"
    mode: Literal["per_exit", "global"] = "per_exit"
    max_iter: Count = 100
    bins: Count = 15


class ExperimentConfig(_Model):
    """The offline sweep and the online runs."""

    _section: ClassVar[str] = "experiment"
    distortion: DistortionName = "gaussian_blur"
    levels: Annotated[list[Real], Field(min_length=1)] = Field(
        default_factory=lambda: list(PAPER_BLUR_LEVELS)
    )
    alphas: Annotated[list[Annotated[Real, Field(ge=0, le=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [0.8, 0.9]
    )
    edge_branches: Annotated[list[StrictInt], Field(min_length=1)] = Field(default_factory=lambda: [1, 2, 3])
    strategies: Annotated[list[StrategyName], Field(min_length=1)] = Field(
        default_factory=lambda: [
            "ee",
            "ensemble",
            "ensemble-unnormalised",
            "ensemble-mean",
            "entropy",
            "conventional",
        ]
    )
    batch_size: Count = 256
    online_k: StrictInt = 3
    online_strategies: Annotated[list[StrategyName], Field(min_length=1)] = Field(
        default_factory=lambda: ["ee", "ensemble", "ensemble-unnormalised", "conventional"]
    )
    online_images: NonNegative = 200  # test images per blur level in the online run; 0 = the whole test split
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # wire precision of the offloaded tensor
    seed: NonNegative = 0


class LinkConfig(_Model):
    """The edge-cloud link: the paper's measured one, emulated on loopback by default."""

    _section: ClassVar[str] = "link"
    emulate: StrictBool = True
    rtt_ms: Annotated[Real, Field(ge=0)] = 11.91
    bandwidth_mbit: Annotated[Real, Field(gt=0)] = 93.9
    cloud_url: StrictStr | None = None  # a real remote cloud server instead of a local one
    # How the edge uses the link, here rather than in [experiment] because serve-edge and classify take the same
    # settings (--offload-deadline-ms, --breaker-failures, --breaker-cooldown-s) and they belong to the link and
    # the cloud behind it, not to what the experiment measures. One offload's whole time (connecting, retries,
    # backoff, reading): 5000 ms, 3.7x the slowest offload seen in the online runs on a loaded 2-core machine
    # and 50-100x a real one at 224 px over the paper's link (serving.client.DEFAULT_DEADLINE says how).
    offload_deadline_ms: Annotated[Real, Field(gt=0)] = 5000.0
    breaker_failures: NonNegative = (
        5  # consecutive failed offloads that open the circuit breaker; 0: no breaker
    )
    breaker_cooldown_s: Annotated[Real, Field(gt=0)] = (
        10.0  # the open breaker's wait before one probe offload
    )


class RuntimeConfig(_Model):
    """How inference runs: the backend that serves the online run, and CPU threads (see edgeexit.threads)."""

    _section: ClassVar[str] = "runtime"
    # the edge runner's and the cloud server's runtime in the online run (onnx: the run is exported first)
    backend: Literal["torch", "onnx"] = "onnx"
    # intra-op threads of training, calibration and the sweep; None: torch's default (one per physical core).
    # The servers of the online run use edgeexit.threads.SERVER_THREADS each.
    threads: Count | None = None


class RunConfig(_Model):
    """One whole run: every section."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _across_fields(self) -> RunConfig:
        problem = _cross_field_problem(self)
        if problem is not None:
            key, detail = problem
            raise PydanticCustomError("config_rule", "{key}: {detail}", {"key": key, "detail": detail})
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-ready), one dict per section."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from nested dicts; a bad value or unknown table/key raises a one-line UserError."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _user_error(exc, "", source) from None

    def check(self) -> None:
        """Validate the whole config again, rules across fields included (after fields were assigned)."""
        type(self).from_dict(self.to_dict())

    def updated(self, overrides: Iterable[tuple[str, Any]]) -> RunConfig:
        """A copy with each ('section.key', value) applied in order, validated as a whole."""
        data = self.to_dict()
        for key, value in overrides:
            section, dot, name = key.partition(".")
            if not dot or not section or not name:
                raise UserError(f"config key {key!r} must be section.key, e.g. train.epochs")
            if section not in data:
                raise UserError(_unknown_table(section))
            data[section][name] = value
        return type(self).from_dict(data)


def _cross_field_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """The first rule across fields that `cfg` breaks, as ('section.key', what is wrong), or None."""
    m, t, e = cfg.model, cfg.train, cfg.experiment
    if m.placement == "explicit" and m.branch_blocks is None:
        return "model.branch_blocks", "is required when model.placement = 'explicit'"
    if m.branch_blocks is not None:
        if m.placement != "explicit":
            return (
                "model.branch_blocks",
                f"is used only with model.placement = 'explicit' (placement is {m.placement!r})",
            )
        if len(m.branch_blocks) != m.branches:
            return (
                "model.branch_blocks",
                f"has {len(m.branch_blocks)} block indices but model.branches is {m.branches}; "
                "give one per branch",
            )
    if t.exit_weights is not None and len(t.exit_weights) != m.branches + 1:
        return (
            "train.exit_weights",
            f"has {len(t.exit_weights)} values but the model has {m.branches + 1} exits "
            f"(model.branches = {m.branches}, plus the final exit); give one weight per exit",
        )
    for key, distortion, levels in (
        ("train.distortion_levels", t.distortion, t.distortion_levels),
        ("experiment.levels", e.distortion, e.levels),
    ):
        if distortion is None:
            continue
        from edgeexit.data.distortions import check_level

        for i, level in enumerate(levels):
            try:
                check_level(distortion, level)
            except UserError as exc:
                return f"{key}[{i}]", str(exc)
    for i, k in enumerate(e.edge_branches):
        if not 1 <= k <= m.branches:
            return f"experiment.edge_branches[{i}]", f"must be in 1..{m.branches} (model.branches), got {k}"
    if not 1 <= e.online_k <= m.branches:
        return "experiment.online_k", f"must be in 1..{m.branches} (model.branches), got {e.online_k}"
    return None


# ---- errors ----------------------------------------------------------------------------------------------

_DETAILS: dict[str, str] = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "too_short": "must not be empty",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown_table(name: str) -> str:
    return f"unknown config table [{name}]; accepted: {', '.join(RunConfig.model_fields)}"


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config model class that holds the field at `loc` + (name,), or None."""
    cls: Any = RunConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        cls = field.annotation
    return cls


def _choices(loc: tuple[str | int, ...], expected: str) -> str:
    owner = _model_at(loc[:-1])
    field = owner.model_fields.get(str(loc[-1])) if owner is not None else None
    if field is not None and typing.get_origin(field.annotation) is Literal:
        return ", ".join(typing.get_args(field.annotation))
    return ", ".join(re.findall(r"'([^']*)'", expected))


def _user_error(exc: ValidationError, section: str, source: str = "config") -> UserError:
    """One line for the first of pydantic's errors, naming the key with its section."""
    err = exc.errors(include_url=False)[0]
    loc: tuple[str | int, ...] = ((section,) if section else ()) + tuple(err["loc"])
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path = _path(loc) or source
    if kind in ("extra_forbidden", "no_such_attribute"):
        owner = _model_at(loc[:-1])
        if owner is RunConfig:
            return UserError(_unknown_table(str(loc[-1])))
        accepted = f"; accepted: {', '.join(owner.model_fields)}" if owner is not None else ""
        return UserError(f"unknown config key {path}{accepted}")
    if kind == "unknown_name":
        return UserError(f"unknown {ctx['kind']} {value!r} in {path}; known: {ctx['known']}")
    if kind == "config_rule":
        return UserError(f"{source} {ctx['key']}: {ctx['detail']}")
    if kind == "config_value":
        return UserError(f"{source} {path}: {ctx['detail']}, got {_show(value)}")
    if kind == "literal_error":
        return UserError(
            f"{source} {path}: must be one of {_choices(loc, ctx.get('expected', ''))}, got {_show(value)}"
        )
    if kind in _DETAILS:
        numbers = {k: _show(v) for k, v in ctx.items()}
        detail = _DETAILS[kind].format(**numbers)
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            return UserError(f"{source} {path}: {detail}, got {type(value).__name__}")
        return UserError(f"{source} {path}: {detail}, got {_show(value)}")
    return UserError(f"{source} {path}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {_show(value)}")


# ---- loading ---------------------------------------------------------------------------------------------


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


def choices(key: str) -> tuple[str, ...]:
    """The accepted values of a fixed-choice key such as 'train.optimizer'."""
    section, _, name = key.partition(".")
    owner = _model_at((section,))
    field = owner.model_fields.get(name) if owner is not None and owner is not RunConfig else None
    if field is None or typing.get_origin(field.annotation) is not Literal:
        raise KeyError(f"{key} is not a fixed-choice config key")
    return typing.get_args(field.annotation)


def parse_override(text: str) -> tuple[str, Any]:
    """'section.key=value' -> ('section.key', value), the value read as TOML, else kept as the raw string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UserError(f"expected section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {raw.strip()}")
    except tomllib.TOMLDecodeError:
        return key, raw
    return key, parsed["v"] if list(parsed) == ["v"] else raw
