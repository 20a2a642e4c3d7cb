"""Joint training of every exit (single process or torchrun/DDP), the conventional baseline, calibration."""

from __future__ import annotations

from edgeexit.devices import resolve_device
from edgeexit.rundir import prepare_data
from edgeexit.train.calibrate import (
    calibrate_run,
    expected_calibration_error,
    fit_temperature,
)
from edgeexit.train.data import SplitData, collect_logits, load_split_data
from edgeexit.train.loop import train_model

__all__ = [
    "SplitData",
    "calibrate_run",
    "collect_logits",
    "expected_calibration_error",
    "fit_temperature",
    "load_split_data",
    "prepare_data",
    "resolve_device",
    "train_model",
]
