"""Joint training of every exit (single process or torchrun/DDP), the conventional baseline, calibration."""

from __future__ import annotations

from edgeexit.train.calibrate import (
    calibrate_run,
    calibrated_probs,
    expected_calibration_error,
    fit_temperature,
)
from edgeexit.train.loop import (
    SplitData,
    collect_logits,
    load_split_data,
    prepare_data,
    resolve_device,
    train_model,
)

__all__ = [
    "SplitData",
    "calibrate_run",
    "calibrated_probs",
    "collect_logits",
    "expected_calibration_error",
    "fit_temperature",
    "load_split_data",
    "prepare_data",
    "resolve_device",
    "train_model",
]
