"""A real tiny run for the serving tests: `digits` at 32 px, a calibrated random-weight EE-DNN (3 branches)
and conventional DNN, BatchNorm settled on real images so outputs depend on the input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgeexit.config import RunConfig
from edgeexit.data import load_uint8
from edgeexit.model import new_model, save_checkpoint
from edgeexit.model.build import settle_batchnorm
from edgeexit.rundir import RunDir, prepare_data


def build_tiny_run(root: Path, *, conventional: bool = True) -> RunConfig:
    """RUN_DIR with config.json, split, a calibrated random-weight EE-DNN (3 branches) and conventional DNN."""
    cfg = RunConfig.from_dict(
        {"dataset": {"name": "digits"}, "experiment": {"batch_size": 16}, "train": {"device": "cpu"}}
    )
    run = RunDir(root)
    run.save_config(cfg)
    ds, split, prep = prepare_data(cfg, run)
    x = prep.normalize(load_uint8(ds, split.train[:48], prep))
    common = dict(
        num_classes=10,
        class_names=ds.class_names,
        input_size=32,
        mean=prep.mean,
        std=prep.std,
        dataset="digits",
    )
    torch.manual_seed(0)
    net, spec = new_model("mobilenet_v2", branches=3, **common)
    settle_batchnorm(net, x)
    spec.temperatures = [0.12, 0.2, 0.2, 0.3]  # sharp: spreads the random net's confidences
    spec.ensemble_weights = [0.2, 0.3, 0.5]
    spec.exit_val_accuracy = [0.4, 0.6, 1.0, 0.9]  # ensemble-unnormalised: weights 0.4, 0.6, 1.0
    save_checkpoint(run.ee, net, spec)
    if conventional:
        conv, cspec = new_model("mobilenet_v2", kind="conventional", **common)
        settle_batchnorm(conv, x)
        cspec.temperatures = [0.3]
        save_checkpoint(run.conventional, conv, cspec)
    return cfg


def tiny_images(root: Path, cfg: RunConfig, n: int) -> tuple[np.ndarray, torch.Tensor]:
    """The first n test ids of the run's split and their uint8 images at the model's input size."""
    run = RunDir(root)
    ds, split, prep = prepare_data(cfg, run)
    ids = np.asarray(split.test[:n])
    return ids, load_uint8(ds, ids, prep)


def png(x: torch.Tensor, fmt: str = "PNG") -> bytes:
    """A uint8 [3, H, W] image encoded as PNG (or JPEG)."""
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format=fmt)
    return buf.getvalue()
