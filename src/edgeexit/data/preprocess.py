"""Preprocessing: PIL image -> uint8 tensor at the model's input size, and uint8 -> normalised float."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgeexit.data.sources import ImageDataset
from edgeexit.errors import UserError
from edgeexit.progress import progress


def _check_stats(name: str, values: Any) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"preprocessing {name} must be 3 numbers, got {values!r}") from None
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise UserError(f"preprocessing {name} must be 3 finite numbers, got {values!r}")
    return t  # type: ignore[return-value]


# Above this many pixels the resized image is not made whole: `to_uint8` resizes only the box it keeps. Images
# of normal proportions stay far below it (256 px short side: 16:1), so their pixels are exactly torchvision's.
BOX_RESIZE_ABOVE = 1 << 20


def resize_shape(w: int, h: int, resize_size: int) -> tuple[int, int, bool]:
    """(width, height) of a w x h image resized to a shorter side of `resize_size`, and whether that is over
    BOX_RESIZE_ABOVE pixels (`Preprocessing.to_uint8` then resizes only the box it crops)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_w, new_h, new_w * new_h > BOX_RESIZE_ABOVE


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input: resize shorter side, centre crop, then normalise with mean/std."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("input_size", "resize_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
                raise UserError(f"preprocessing {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.resize_size < self.input_size:
            raise UserError(
                f"preprocessing resize_size ({self.resize_size}) must be >= input_size ({self.input_size})"
            )
        object.__setattr__(self, "mean", _check_stats("mean", self.mean))
        object.__setattr__(self, "std", _check_stats("std", self.std))
        if any(s <= 0 for s in self.std):
            raise UserError(f"preprocessing std must be positive, got {self.std}")
        # mean and std as [3, 1, 1] tensors per device, made once: the edge normalises one image per call,
        # where building them each time cost as much as the arithmetic (BENCHMARKS.md, edge runner).
        object.__setattr__(self, "_stats", {})
        # The same float32 values for `normalize_numpy` (runtime onnx's edge path stays in numpy).
        np_stats = tuple(np.array(v, dtype=np.float32).reshape(3, 1, 1) for v in (self.mean, self.std))
        object.__setattr__(self, "_np_stats", np_stats)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self._stats.get(device)  # type: ignore[attr-defined]
        if stats is None:
            with torch.inference_mode(False):  # ordinary tensors, usable by training too
                stats = tuple(
                    torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)
                    for v in (self.mean, self.std)
                )
            self._stats[device] = stats  # type: ignore[attr-defined]
        return stats

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """uint8 [3, input_size, input_size]; an image already at input_size x input_size is taken as is."""
        if img.mode != "RGB":  # an RGB image is used as is: convert would only copy it
            img = img.convert("RGB")
        s = self.input_size
        if img.size != (s, s):
            # Same arithmetic as torchvision's Resize(resize_size) + CenterCrop(input_size) on PIL images;
            # PIL's bilinear resize antialiases when it shrinks.
            w, h = img.size
            new_w, new_h, boxed = resize_shape(w, h, self.resize_size)
            top = int(round((new_h - s) / 2.0))
            left = int(round((new_w - s) / 2.0))
            if boxed:
                # Resize only the source box that lands in the crop: memory no longer grows with the aspect
                # ratio (a 200000x1 image would otherwise become 7.2 Mpx before the crop). The pixels can differ
                # from the full resize's by rounding; only images far beyond normal proportions come here.
                sx, sy = w / new_w, h / new_h
                box = (left * sx, top * sy, min((left + s) * sx, w), min((top + s) * sy, h))
                img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
            else:
                if (new_w, new_h) != (w, h):
                    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
                img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] or [3,H,W] -> float32 ((x / 255) - mean) / std, on x's device."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            raise UserError(f"normalize expects a uint8 tensor, got {getattr(x, 'dtype', type(x))}")
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise UserError(f"normalize expects shape [B,3,H,W] or [3,H,W], got {tuple(x.shape)}")
        mean, std = self._stats_on(x.device)
        return (x.to(torch.float32) / 255.0 - mean) / std

    def normalize_numpy(self, x: np.ndarray) -> np.ndarray:
        """`normalize` in numpy: uint8 [B,3,H,W] or [3,H,W] -> the same float32 values, as a numpy array."""
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise UserError(f"normalize expects a uint8 array, got {getattr(x, 'dtype', type(x))}")
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise UserError(f"normalize expects shape [B,3,H,W] or [3,H,W], got {tuple(x.shape)}")
        mean, std = self._np_stats  # type: ignore[attr-defined]
        # The same operations in the same order and precision as `normalize`: bit-identical results.
        out = x.astype(np.float32, order="C")
        out /= np.float32(255.0)
        out -= mean
        out /= std
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (travels in the model spec)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; a missing key raises a UserError."""
        keys = ("input_size", "resize_size", "mean", "std")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            raise UserError(f"preprocessing needs keys {', '.join(keys)}, got {d!r}")
        return cls(d["input_size"], d["resize_size"], tuple(d["mean"]), tuple(d["std"]))


def preprocessing_for(ds: ImageDataset, input_size: int | None = None) -> Preprocessing:
    """The dataset's default preprocessing, optionally at another input size (resize scaled alike)."""
    if input_size is None:
        return Preprocessing(ds.default_input_size, ds.default_resize_size, ds.mean, ds.std)
    if isinstance(input_size, bool) or not isinstance(input_size, int | np.integer) or input_size <= 0:
        raise UserError(f"input_size must be a positive integer, got {input_size!r}")
    resize = round(int(input_size) * ds.default_resize_size / ds.default_input_size)
    return Preprocessing(int(input_size), max(resize, int(input_size)), ds.mean, ds.std)


class SplitImages(torch.utils.data.Dataset):
    """(uint8 [3,H,W], label) pairs for the given dataset indices, with an optional uint8 transform."""

    def __init__(
        self,
        ds: ImageDataset,
        indices: np.ndarray,
        prep: Preprocessing,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.ds = ds
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(ds)):
            raise UserError(f"indices out of range for dataset {ds.name!r} with {len(ds)} images")
        self.prep = prep
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[j])
        x = self.prep.to_uint8(self.ds.image(i))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.ds.labels[i])


def load_uint8(ds: ImageDataset, indices: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """The images at `indices`, preprocessed and stacked: uint8 [n, 3, input_size, input_size]."""
    items = SplitImages(ds, indices, prep)
    s = prep.input_size
    out = torch.empty((len(items), 3, s, s), dtype=torch.uint8)
    for j in progress(range(len(items)), desc=f"load {ds.name}", unit="img"):
        out[j] = items[j][0]
    return out
