"""Temperature scaling, ECE, calibrated probabilities and `calibrate_run` on a tiny trained run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from edgeexit.config import RunConfig
from edgeexit.errors import UserError
from edgeexit.inference import calibrated_probs
from edgeexit.model import load_checkpoint, load_spec
from edgeexit.rundir import RunDir
from edgeexit.train import (
    calibrate_run,
    expected_calibration_error,
    fit_temperature,
    train_model,
)
from edgeexit.train.calibrate import warn_wild_temperatures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _overconfident(n: int, factor: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); logits returned as z * factor (over-confident by `factor`)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=g, dtype=torch.float64) * 2.0
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * factor, labels


def test_fit_temperature_recovers_known_factor_and_lowers_ece() -> None:
    val_logits, val_labels = _overconfident(20000, 2.5, seed=0)
    t = fit_temperature(val_logits, val_labels)
    assert abs(t - 2.5) / 2.5 < 0.05
    before = expected_calibration_error(torch.softmax(val_logits, 1), val_labels)
    after = expected_calibration_error(calibrated_probs([val_logits], [t])[0], val_labels)
    assert after <= before
    assert before > 0.1  # the factor really made it over-confident


def test_fit_temperature_underconfident_and_identity() -> None:
    logits, labels = _overconfident(20000, 0.5, seed=1)
    assert abs(fit_temperature(logits, labels) - 0.5) / 0.5 < 0.05
    logits, labels = _overconfident(20000, 1.0, seed=2)
    assert abs(fit_temperature(logits, labels) - 1.0) < 0.05


def test_fit_temperature_rejects_bad_shapes() -> None:
    with pytest.raises(UserError, match="expected logits"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(UserError, match="max_iter"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), max_iter=0)


def test_expected_calibration_error_by_hand() -> None:
    # every sample has confidence 0.8; 3 of 4 correct -> |0.75 - 0.8| = 0.05
    probs = torch.tensor([[0.8, 0.2]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.05, abs=1e-6)
    # two bins: conf 0.9 all right (gap 0.1), conf 0.6 all wrong (gap 0.6): weighted mean 0.35
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.35, abs=1e-6)


def _guo_ece_reference(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """ECE written from Guo et al. (2017), one sample at a time: bin m holds ((m-1)/M, m/M]; 0 joins bin 1."""
    members: dict[int, list[tuple[float, bool]]] = {m: [] for m in range(1, bins + 1)}
    for row, y in zip(probs.tolist(), labels.tolist(), strict=True):
        c = max(row)
        pred = row.index(c)
        for m in range(1, bins + 1):
            if (m - 1) / bins < c <= m / bins or (m == 1 and c == 0.0):
                members[m].append((c, pred == y))
                break
    n = len(labels)
    total = 0.0
    for group in members.values():
        if group:
            acc = sum(ok for _, ok in group) / len(group)
            conf = sum(c for c, _ in group) / len(group)
            total += len(group) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_matches_guo_reference_unsaturated_and_saturated(bins: int) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 10, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (500,), generator=g)
    labels[:300] = z[:300].argmax(1)
    unsaturated = torch.softmax(z, 1)
    saturated = torch.softmax(z * 200, 1).float()  # T << 1 in float32: most top probabilities are exactly 1.0
    assert (saturated.max(1).values == 1.0).float().mean() > 0.5
    for probs in (unsaturated, saturated):
        assert expected_calibration_error(probs, labels, bins) == pytest.approx(
            _guo_ece_reference(probs, labels, bins), abs=1e-12
        )


def test_ece_puts_confidence_one_in_the_last_bin_unlike_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassCalibrationError

    # 10 samples at confidence 1.0 (9 right) and 10 at 0.97 (all right), 15 bins: one Guo bin (14/15, 1]
    # holds all 20 -> |0.95 - 0.985| = 0.035; torchmetrics puts the 1.0s in a 16th bin of their own:
    # 0.5 * |0.9 - 1.0| + 0.5 * |1.0 - 0.97| = 0.065.
    probs = torch.tensor([[1.0, 0.0]] * 10 + [[0.97, 0.03]] * 10)
    labels = torch.tensor([0] * 9 + [1] + [0] * 10)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.035, abs=1e-6)
    tm = float(MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels))
    assert tm == pytest.approx(0.065, abs=1e-6)
    # confidence 0 (a degenerate all-zero row) lands in the first bin, not outside every bin
    from edgeexit.train.calibrate import confidence_bin

    assert confidence_bin(torch.tensor([0.0, 1 / 15, 0.0667, 1.0], dtype=torch.float64), 15).tolist() == [
        0,
        0,
        1,
        14,
    ]


def test_calibrated_probs() -> None:
    z = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.5, 0.0]])]
    plain = calibrated_probs(z, None)
    assert torch.allclose(plain[0], torch.softmax(z[0], 1))
    scaled = calibrated_probs(z, [2.0, 0.5])
    assert torch.allclose(scaled[0], torch.softmax(z[0] / 2.0, 1))
    assert torch.allclose(scaled[1], torch.softmax(z[1] / 0.5, 1))
    assert scaled[0].max() < plain[0].max()  # T > 1 softens
    with pytest.raises(UserError, match="one per exit"):
        calibrated_probs(z, [1.0])
    with pytest.raises(UserError, match="> 0"):
        calibrated_probs(z, [1.0, 0.0])


def test_calibrate_before_train_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `edgeexit train` first"):
        calibrate_run(tmp_path / "run")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    cfg = RunConfig()
    cfg.dataset.name = "digits"
    cfg.dataset.input_size = 16
    cfg.train.epochs = 2
    cfg.train.batch_size = 128
    cfg.train.lr = 5e-3
    cfg.train.conventional = "final_exit"  # a conventional checkpoint without a second training
    run = tmp_path_factory.mktemp("cal") / "run"
    train_model(run, cfg, "ee")
    train_model(run, cfg, "conventional")
    return run, cfg


def test_calibrate_run_writes_spec_json_and_diagrams(tiny_run: tuple[Path, RunConfig]) -> None:
    run, cfg = tiny_run
    old_hash = load_spec(run / "ee").content_hash
    report = calibrate_run(run)  # config read from the run directory
    net, spec = load_checkpoint(run / "ee")  # re-saved checkpoint loads and matches its hash
    assert spec.content_hash != old_hash
    n = spec.num_branches
    assert spec.temperatures is not None and len(spec.temperatures) == n + 1
    assert all(t > 0 for t in spec.temperatures)
    assert spec.ensemble_weights is not None and len(spec.ensemble_weights) == n
    assert sum(spec.ensemble_weights) == pytest.approx(1.0)
    assert spec.exit_val_accuracy is not None and len(spec.exit_val_accuracy) == n + 1
    # ensemble weights are the branches' validation accuracies, normalised
    acc = spec.exit_val_accuracy[:-1]
    assert spec.ensemble_weights == pytest.approx([a / sum(acc) for a in acc])

    doc = json.loads((RunDir(run).calibration / "calibration.json").read_text())
    assert doc == json.loads(json.dumps(report))
    ee = doc["models"]["ee"]
    assert ee["content_hash"] == spec.content_hash
    assert [e["temperature"] for e in ee["exits"]] == pytest.approx(spec.temperatures)
    for row in ee["exits"]:
        assert row["nll_after"] <= row["nll_before"] + 1e-6  # T minimises the validation NLL
        png = RunDir(run).calibration / row["diagram"]
        assert png.read_bytes()[:8] == PNG_MAGIC
    conv = doc["models"]["conventional"]
    assert len(conv["exits"]) == 1 and conv["ensemble_weights"] is None
    conv_spec = load_spec(run / "conventional")
    assert conv_spec.temperatures == [conv["exits"][0]["temperature"]]


def test_calibrate_run_global_mode(tiny_run: tuple[Path, RunConfig]) -> None:
    run, cfg = tiny_run
    cfg = RunConfig.from_dict(cfg.to_dict())
    cfg.calibration.mode = "global"
    calibrate_run(run, cfg)
    temps = load_spec(run / "ee").temperatures
    assert temps is not None and len(set(temps)) == 1
    with pytest.raises(UserError, match="calibration.mode: must be one of per_exit, global"):
        cfg.calibration.mode = "sometimes"  # refused when assigned, before any calibration
    assert cfg.calibration.mode == "global"


def test_wild_temperatures_warn_with_exit_and_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgeexit.train.calibrate"):
        messages = warn_wild_temperatures([250.0, 1.3, 0.004, 0.8], "ee")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == messages and len(warned) == 2
    assert "ee exit 1: temperature 250 " in warned[0] and "uniform" in warned[0]
    assert "ee exit 3: temperature 0.004 " in warned[1] and "one-hot" in warned[1]
    assert all("more epochs" in m for m in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeexit.train.calibrate"):
        assert warn_wild_temperatures([0.01, 1.0, 100.0], "conventional") == []
        assert "final" in warn_wild_temperatures([1.0, 1e3], "ee")[0]
    assert len(caplog.records) == 1
