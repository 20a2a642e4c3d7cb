"""The run config: validated when built (file, dict, --set) and on assignment; one-line errors naming keys."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeexit.cli import build_parser, main
from edgeexit.cli.common import run_config
from edgeexit.cli.runs import TRAIN_SHORTCUTS
from edgeexit.config import (
    PAPER_BLUR_LEVELS,
    ModelConfig,
    RunConfig,
    TrainConfig,
    default_config,
    load_config,
    parse_override,
)
from edgeexit.errors import UserError
from edgeexit.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

TRAIN_KEYS = (
    "epochs, batch_size, optimizer, lr, momentum, weight_decay, schedule, patience, exit_weights, augment, "
    "distortion, distortion_levels, seed, num_workers, device, conventional, tensorboard"
)

BAD_VALUES = [
    # ranges
    ("train.epochs", -3, "config train.epochs: must be >= 1, got -3"),
    ("train.batch_size", 0, "config train.batch_size: must be >= 1, got 0"),
    ("train.patience", 0, "config train.patience: must be >= 1, got 0"),
    ("train.seed", -1, "config train.seed: must be >= 0, got -1"),
    ("train.num_workers", -1, "config train.num_workers: must be >= 0, got -1"),
    ("train.lr", 0, "config train.lr: must be > 0, got 0"),
    ("train.weight_decay", -0.1, "config train.weight_decay: must be >= 0, got -0.1"),
    ("train.momentum", 1, "config train.momentum: must be < 1, got 1"),
    ("train.momentum", -0.5, "config train.momentum: must be >= 0, got -0.5"),
    (
        "train.exit_weights",
        [1, 1, float("inf"), 1],
        r"config train.exit_weights\[2\]: must be a finite number",
    ),
    ("train.exit_weights", [1, -1, 1, 1], r"config train.exit_weights\[1\]: must be >= 0, got -1"),
    ("train.exit_weights", [0, 0, 0, 0], "config train.exit_weights: must not be all 0"),
    ("experiment.alphas", [0.5, 1.5], r"config experiment.alphas\[1\]: must be <= 1, got 1.5"),
    ("experiment.alphas", [-0.1], r"config experiment.alphas\[0\]: must be >= 0, got -0.1"),
    ("experiment.alphas", [], "config experiment.alphas: must not be empty"),
    ("experiment.levels", [], "config experiment.levels: must not be empty"),
    ("experiment.edge_branches", [], "config experiment.edge_branches: must not be empty"),
    ("experiment.strategies", [], "config experiment.strategies: must not be empty"),
    ("experiment.online_images", -1, "config experiment.online_images: must be >= 0, got -1"),
    ("experiment.batch_size", 0, "config experiment.batch_size: must be >= 1, got 0"),
    ("calibration.bins", 0, "config calibration.bins: must be >= 1, got 0"),
    ("calibration.max_iter", 0, "config calibration.max_iter: must be >= 1, got 0"),
    ("link.rtt_ms", -1, "config link.rtt_ms: must be >= 0, got -1"),
    ("link.bandwidth_mbit", 0, "config link.bandwidth_mbit: must be > 0, got 0"),
    ("runtime.threads", 0, "config runtime.threads: must be >= 1, got 0"),
    ("runtime.backend", "tensorrt", "config runtime.backend: must be one of"),
    ("dataset.input_size", 0, "config dataset.input_size: must be >= 1, got 0"),
    ("model.branches", 0, "config model.branches: must be >= 1, got 0"),
    # types: strict integers and booleans; numbers are not strings
    ("train.epochs", "3", "config train.epochs: must be an integer, got '3'"),
    ("train.epochs", True, "config train.epochs: must be an integer, got true"),
    ("train.epochs", 2.5, "config train.epochs: must be an integer, got 2.5"),
    ("train.lr", "0.1", "config train.lr: must be a number, got '0.1'"),
    ("train.augment", 1, "config train.augment: must be true or false, got 1"),
    ("experiment.strategies", "ee", "config experiment.strategies: must be a list, got 'ee'"),
    # fixed choices
    ("train.optimizer", "rmsprop", "config train.optimizer: must be one of adam, sgd, got 'rmsprop'"),
    ("train.schedule", "step", "config train.schedule: must be one of cosine, constant"),
    ("train.conventional", "x", "config train.conventional: must be one of separate, final_exit"),
    ("train.device", "tpu", "config train.device: must be one of auto, cpu, cuda, got 'tpu'"),
    ("calibration.mode", "sometimes", "config calibration.mode: must be one of per_exit, global"),
    ("experiment.precision", "fp8", "config experiment.precision: must be one of fp32, fp16, int8"),
    ("model.placement", "cubic", "config model.placement: must be one of linear, pareto, explicit"),
    # registry names
    ("dataset.name", "x", "unknown dataset 'x' in dataset.name; known: caltech256, cifar10, digits, "),
    ("model.backbone", "vgg", "unknown backbone 'vgg' in model.backbone; known: mobilenet_v2, "),
    ("model.head", "mlp", "unknown exit head 'mlp' in model.head; known: bnpool, pool"),
    (
        "experiment.distortion",
        "fog",
        "unknown distortion 'fog' in experiment.distortion; known: gaussian_blur",
    ),
    ("train.distortion", "fog", "unknown distortion 'fog' in train.distortion; known: gaussian_blur"),
    ("experiment.strategies", ["ee", "x"], r"unknown strategy 'x' in experiment.strategies\[1\]; known: "),
    ("experiment.online_strategies", ["y"], r"unknown strategy 'y' in experiment.online_strategies\[0\]"),
]

# rules across fields: checked when a whole config is built (or on check()), not on one assignment
CROSS_FIELD = [
    ("experiment.edge_branches", [1, 4], r"config experiment.edge_branches\[1\]: must be in 1..3 .*got 4"),
    ("experiment.edge_branches", [0], r"config experiment.edge_branches\[0\]: must be in 1..3"),
    ("experiment.online_k", 4, "config experiment.online_k: must be in 1..3 .*got 4"),
    (
        "train.exit_weights",
        [1.0, 1.0],
        "config train.exit_weights: has 2 values .* 4 exits .*one weight per exit",
    ),
    ("experiment.levels", [0.5, -1.0], r"config experiment.levels\[1\]: gaussian_blur level .* got -1"),
    (
        "model.placement",
        "explicit",
        "config model.branch_blocks: is required when model.placement = 'explicit'",
    ),
    (
        "model.branch_blocks",
        [2, 5],
        "config model.branch_blocks: is used only with model.placement = 'explicit'",
    ),
]


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "pydantic" not in message and "validation error" not in message
    return message


@pytest.mark.parametrize(("key", "value", "match"), BAD_VALUES + CROSS_FIELD)
def test_bad_value_is_a_one_line_error_naming_the_key(key: str, value: object, match: str) -> None:
    with pytest.raises(UserError, match=match) as exc:
        default_config().updated([(key, value)])
    _one_line(exc)
    section, name = key.split(".")
    data = default_config().to_dict()
    data[section][name] = value
    with pytest.raises(UserError, match=match):
        RunConfig.from_dict(data)


@pytest.mark.parametrize(("key", "value", "match"), BAD_VALUES)
def test_bad_value_is_refused_on_assignment(key: str, value: object, match: str) -> None:
    cfg = default_config()
    section, name = key.split(".")
    before = getattr(getattr(cfg, section), name)
    with pytest.raises(UserError, match=match) as exc:
        setattr(getattr(cfg, section), name, value)
    _one_line(exc)
    assert getattr(getattr(cfg, section), name) == before  # nothing half-assigned


@pytest.mark.parametrize(("key", "value", "match"), CROSS_FIELD)
def test_rules_across_fields_allow_assignment_one_at_a_time(key: str, value: object, match: str) -> None:
    cfg = default_config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)  # another field may follow: not refused yet ...
    with pytest.raises(UserError, match=match):
        cfg.check()  # ... but the whole config is


def test_assigning_a_whole_section_checks_the_rules_and_keeps_the_old_one() -> None:
    cfg = default_config()
    with pytest.raises(UserError, match=r"experiment.edge_branches\[2\]: must be in 1..2"):
        cfg.model = ModelConfig(branches=2)
    assert cfg.model.branches == 3 and cfg.model.head == "pool"
    cfg.model = ModelConfig(branches=3)
    assert cfg.model.head == "bnpool"


def test_related_fields_changed_together() -> None:
    cfg = default_config()
    cfg.model.branches = 2
    cfg.model.branch_blocks = [3, 7]
    cfg.model.placement = "explicit"
    cfg.experiment.edge_branches = [1, 2]
    cfg.experiment.online_k = 2
    cfg.train.exit_weights = [0.5, 0.5, 1]
    cfg.experiment.distortion = "jpeg"
    cfg.experiment.levels = [90, 50]
    cfg.check()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_keys_name_the_accepted_ones() -> None:
    with pytest.raises(UserError) as exc:
        RunConfig.from_dict({"train": {"epochz": 3}})
    assert _one_line(exc) == f"unknown config key train.epochz; accepted: {TRAIN_KEYS}"
    with pytest.raises(UserError) as exc:
        RunConfig.from_dict({"trian": {}})
    assert _one_line(exc) == (
        "unknown config table [trian]; accepted: dataset, model, train, calibration, experiment, link, runtime"
    )
    cfg = default_config()
    with pytest.raises(UserError, match=f"unknown config key train.foo; accepted: {TRAIN_KEYS}"):
        cfg.train.foo = 1
    with pytest.raises(UserError, match=r"unknown config table \[foo\]"):
        cfg.updated([("foo.bar", 1)])
    with pytest.raises(UserError, match="must be section.key"):
        cfg.updated([("epochs", 1)])
    with pytest.raises(UserError, match="config train: must be a table, got int"):
        RunConfig.from_dict({"train": 3})


def test_defaults_round_trip_copy_and_assignment(tmp_path: Path) -> None:
    cfg = default_config()
    assert cfg.model.head == "pool" and RunConfig().model.head == "bnpool"
    assert cfg.experiment.levels == PAPER_BLUR_LEVELS and cfg.experiment.levels is not PAPER_BLUR_LEVELS
    assert load_config(REPO / "configs" / "default.toml") == cfg
    for name in ("cifar10.toml", "caltech256-paper.toml"):
        load_config(REPO / "configs" / name)  # every shipped config is valid
    data = json.loads(json.dumps(cfg.to_dict()))
    assert set(data) == {"dataset", "model", "train", "calibration", "experiment", "link", "runtime"}
    assert RunConfig.from_dict(data) == cfg
    other = copy.deepcopy(cfg)
    other.train.epochs = 2
    other.experiment.alphas = [0.5]
    assert (other.train.epochs, cfg.train.epochs) == (2, 12)
    assert other.experiment.alphas == [0.5] and cfg.experiment.alphas == [0.8, 0.9]
    other.train.lr = 1  # an integer is a fine float
    assert isinstance(other.train.lr, float) and other.train.lr == 1.0
    run = RunDir(tmp_path / "run")
    run.save_config(other)
    assert run.load_config() == other


def test_toml_file_values_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 1\nepochs = 2\n[experiment]\nalphas = [0, 1]\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1.0 and cfg.train.epochs == 2 and cfg.experiment.alphas == [0.0, 1.0]
    path.write_text('[train]\nepochs = "3"\n')
    with pytest.raises(UserError, match="config train.epochs: must be an integer, got '3'"):
        load_config(path)
    path.write_text("[train]\nepochs = true\n")
    with pytest.raises(UserError, match="config train.epochs: must be an integer, got true"):
        load_config(path)


def test_sections_are_strict_models() -> None:
    t = TrainConfig()
    assert t.epochs == 12 and t.exit_weights is None and t.distortion_levels == []
    assert TrainConfig.model_config["extra"] == "forbid" and TrainConfig.model_config["validate_assignment"]


def test_parse_override_reads_toml_values() -> None:
    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("experiment.alphas=[0.5, 0.7]") == ("experiment.alphas", [0.5, 0.7])
    assert parse_override("train.augment=false") == ("train.augment", False)
    assert parse_override('model.head="pool"') == ("model.head", "pool")
    assert parse_override("model.head=pool") == ("model.head", "pool")  # a bare word stays a string
    assert parse_override("dataset.root=/data/x") == ("dataset.root", "/data/x")
    assert parse_override(" train.epochs = 3") == ("train.epochs", 3)
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("train.epochs")


def test_set_and_shortcuts_go_through_one_validated_path() -> None:
    args = build_parser().parse_args(
        [
            "train",
            "--epochs",
            "2",
            "--set",
            "train.lr=0.01",
            "--set",
            "experiment.alphas=[0.5]",
            "--dataset",
            "digits",
            "--set",
            "train.epochs=3",
        ]
    )
    cfg = run_config(args, TRAIN_SHORTCUTS)
    assert cfg.train.lr == 0.01 and cfg.experiment.alphas == [0.5] and cfg.dataset.name == "digits"
    assert cfg.train.epochs == 3  # --set comes after the shortcuts
    assert cfg.model.head == "pool"  # everything else from the built-in defaults
    args = build_parser().parse_args(["train", "--branches", "2"])
    with pytest.raises(UserError, match=r"experiment.edge_branches\[2\]: must be in 1..2"):
        run_config(args, TRAIN_SHORTCUTS)


ERR = "edgeexit: error: "


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "-1"], ERR + "config train.epochs: must be >= 1, got -1"),
        (["train", "--set", "train.foo=1"], ERR + f"unknown config key train.foo; accepted: {TRAIN_KEYS}"),
        (["train", "--set", "train.lr=fast"], ERR + "config train.lr: must be a number, got 'fast'"),
        (
            ["reproduce", "--set", "experiment.alphas=[2]"],
            ERR + "config experiment.alphas[0]: must be <= 1, got 2",
        ),
        (["train", "--set", "nonsense"], ERR + "expected section.key=value, got 'nonsense'"),
    ],
)
def test_cli_bad_override_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_cli_evaluate_and_calibrate_validate_the_runs_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    RunDir(tmp_path).save_config(default_config())
    assert main(["evaluate", str(tmp_path), "--alphas", "0.5", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "edgeexit: error: config experiment.alphas[1]: must be <= 1, got 1.5"
    )
    assert main(["evaluate", str(tmp_path), "--edge-branches", "4"]) == 2
    assert "experiment.edge_branches[0]: must be in 1..3" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--set", "calibration.bins=0"]) == 2
    assert capsys.readouterr().err.strip() == "edgeexit: error: config calibration.bins: must be >= 1, got 0"


def test_cli_choices_come_from_the_registries() -> None:
    from edgeexit.data.sources import DATASETS
    from edgeexit.model.heads import HEADS
    from edgeexit.policy import STRATEGIES

    parser = build_parser()
    for name in DATASETS.names():
        assert parser.parse_args(["train", "--dataset", name]).dataset == name
    for name in HEADS.names():
        assert parser.parse_args(["train", "--head", name]).head == name
    assert parser.parse_args(["evaluate", "r", "--strategies", *STRATEGIES]).strategies == list(STRATEGIES)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "mnist60k"])


def test_building_the_parser_imports_no_registry() -> None:
    """`edgeexit --help` or `edgeexit link` must not pay for torch: choices are read when first looked at."""
    code = (
        "import sys; from edgeexit.cli import build_parser; p = build_parser(); "
        "p.parse_args(['link', '--listen', 'a:1', '--to', 'b:2']); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_unknown_key_in_a_toml_file_through_the_real_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 2\nfoo = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeexit", "train", "--config", str(bad), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"edgeexit: error: unknown config key train.foo; accepted: {TRAIN_KEYS}"
    assert not (tmp_path / "run").exists()
