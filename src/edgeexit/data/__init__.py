"""Datasets, stratified persisted splits, preprocessing and the distortion registry."""

from __future__ import annotations

from edgeexit.data.distortions import (
    DEFAULT_LEVELS,
    DISTORTIONS,
    Distortion,
    check_level,
    distort,
    identity_level,
)
from edgeexit.data.preprocess import Preprocessing, SplitImages, load_uint8, preprocessing_for
from edgeexit.data.sources import DATASETS, ImageDataset, load_dataset
from edgeexit.data.splits import Split, make_split

__all__ = [
    "DATASETS",
    "DEFAULT_LEVELS",
    "DISTORTIONS",
    "Distortion",
    "ImageDataset",
    "Preprocessing",
    "Split",
    "SplitImages",
    "check_level",
    "distort",
    "identity_level",
    "load_dataset",
    "load_uint8",
    "make_split",
    "preprocessing_for",
]
