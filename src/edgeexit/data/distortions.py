"""Image distortions (Gaussian blur, Gaussian noise, JPEG) on uint8 batches at the model's input size."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from edgeexit.errors import UserError
from edgeexit.registry import Registry


@dataclass(frozen=True)
class Distortion:
    """A named distortion: `apply(images uint8 [B,3,H,W], level, seeds)` plus its level rules."""

    name: str
    apply: Callable[[torch.Tensor, float, list[int]], torch.Tensor]
    check_level: Callable[[float], float]
    identity: float | None
    levels: tuple[float, ...]


DISTORTIONS: Registry[Distortion] = Registry("distortion")

DEFAULT_LEVELS: dict[str, list[float]] = {
    "gaussian_blur": [0, 0.1, 0.2, 0.5, 0.8, 0.9, 1, 1.2, 1.5, 1.8],  # the paper's grid
    "gaussian_noise": [0, 5, 10, 20, 30, 50],
    "jpeg": [100, 90, 70, 50, 30, 10],
}


def identity_level(name: str) -> float | None:
    """The level at which distortion `name` leaves images unchanged (None if it has none, e.g. JPEG)."""
    return DISTORTIONS.get(name).identity


def check_level(name: str, level: float) -> float:
    """Validate `level` for distortion `name` and return it as a float; UserError says what is accepted."""
    return DISTORTIONS.get(name).check_level(level)


def distort(
    images: torch.Tensor, name: str, level: float, seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Apply distortion `name` at `level` to uint8 [B,3,H,W] or [3,H,W]; uint8 of the same shape back.

    `seeds` gives one seed per image for random distortions, so an image gets the same result alone or
    in a batch; None means 0..B-1.
    """
    d = DISTORTIONS.get(name)
    level = d.check_level(level)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UserError(f"distort expects a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise UserError(f"distort expects shape [B,3,H,W] or [3,H,W], got {tuple(images.shape)}")
    single = images.ndim == 3
    batch = images.unsqueeze(0) if single else images
    b = batch.shape[0]
    if seeds is None:
        seed_list = list(range(b))
    else:
        seed_list = list(seeds)
        if len(seed_list) != b:
            raise UserError(f"distort got {len(seed_list)} seeds for {b} images; give one seed per image")
        if any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in seed_list):
            raise UserError("distort seeds must be non-negative integers")
        seed_list = [int(s) for s in seed_list]
    if d.identity is not None and level == d.identity:
        out = batch.clone()
    else:
        out = d.apply(batch.contiguous(), level, seed_list)
    return out[0] if single else out


def _finite_nonneg(kind: str) -> Callable[[float], float]:
    def check(level: float) -> float:
        try:
            v = float(level)
        except (TypeError, ValueError):
            raise UserError(f"{kind} level must be a number >= 0, got {level!r}") from None
        if not math.isfinite(v) or v < 0:
            raise UserError(f"{kind} level (sigma) must be a finite number >= 0, got {level!r}")
        return v

    return check


def _check_quality(level: float) -> float:
    try:
        v = float(level)
    except (TypeError, ValueError):
        raise UserError(f"jpeg level (quality) must be an integer in 1..100, got {level!r}") from None
    if not v.is_integer() or not 1 <= v <= 100:
        raise UserError(f"jpeg level (quality) must be an integer in 1..100, got {level!r}")
    return v


# ---- Gaussian blur -------------------------------------------------------------------------------------


def _gaussian_blur(images: torch.Tensor, sigma: float, seeds: list[int]) -> torch.Tensor:
    """Gaussian blur of uint8 [B,3,H,W] over H and W: radius ceil(3*sigma), mirror boundary.

    scipy.ndimage.gaussian_filter in float64 (kernel normalised to sum 1, rows then columns, mirror
    padding folded for any radius, so a radius larger than the image is fine), then rounded half to
    even and clipped back to uint8. Every image line is filtered on its own, so an image gives the same
    pixels alone or in a batch. Computed on the CPU whatever the tensor's device.
    """
    from scipy import ndimage  # lazily: importing edgeexit.data must not load scipy

    x = images.detach().to("cpu").numpy()  # uint8: scipy reads each line into float64 buffers exactly
    # Sigma 0 on the batch and channel axes: scipy skips them (= axes=(-2, -1), which needs scipy >= 1.11).
    out = ndimage.gaussian_filter(
        x, (0.0, 0.0, sigma, sigma), mode="mirror", radius=math.ceil(3.0 * sigma), output=np.float64
    )
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return torch.from_numpy(out.astype(np.uint8)).to(images.device)


# ---- Gaussian noise ------------------------------------------------------------------------------------


def _gaussian_noise(images: torch.Tensor, sigma: float, seeds: list[int]) -> torch.Tensor:
    shape = tuple(images.shape[1:])
    noise = torch.empty(images.shape, dtype=torch.float32)
    for i, s in enumerate(seeds):
        # Drawn on the CPU from a per-image generator: identical on any device and in any batch.
        g = torch.Generator().manual_seed(s)
        noise[i] = torch.randn(shape, generator=g, dtype=torch.float32)
    noise.mul_(float(sigma))
    out = images.to(torch.float32) + noise.to(images.device)
    # Clip, never wrap around uint8 (the original code's bug).
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ---- JPEG ----------------------------------------------------------------------------------------------


def _jpeg(images: torch.Tensor, quality: float, seeds: list[int]) -> torch.Tensor:
    q = int(quality)
    arr = images.detach().to("cpu").permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr[i])).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


DISTORTIONS.register("gaussian_blur")(
    Distortion(
        "gaussian_blur",
        _gaussian_blur,
        _finite_nonneg("gaussian_blur"),
        0.0,
        tuple(DEFAULT_LEVELS["gaussian_blur"]),
    )
)
DISTORTIONS.register("gaussian_noise")(
    Distortion(
        "gaussian_noise",
        _gaussian_noise,
        _finite_nonneg("gaussian_noise"),
        0.0,
        tuple(DEFAULT_LEVELS["gaussian_noise"]),
    )
)
DISTORTIONS.register("jpeg")(Distortion("jpeg", _jpeg, _check_quality, None, tuple(DEFAULT_LEVELS["jpeg"])))
