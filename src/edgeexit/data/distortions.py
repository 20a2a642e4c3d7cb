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


def _blur_taps(sigma: float, n: int) -> tuple[list[int], list[float]]:
    """Offsets and float64 weights of the 1-D Gaussian along an axis of length n (mirror boundary).

    Radius ceil(3*sigma), weights normalised to sum 1. Mirror padding is periodic with period 2(n-1),
    so when the radius exceeds n-1 the taps are folded modulo that period: the result equals
    scipy.ndimage's "mirror" mode for any radius, with at most 2(n-1) taps.
    """
    r = math.ceil(3.0 * sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    if r <= n - 1:
        return list(range(-r, r + 1)), w.tolist()
    period = 2 * (n - 1)
    folded: dict[int, float] = {}
    for off, wk in zip(range(-r, r + 1), w.tolist(), strict=True):
        key = (off + n - 1) % period - (n - 1)  # representative in [-(n-1), n-2]
        folded[key] = folded.get(key, 0.0) + wk
    offs = sorted(folded)
    return offs, [folded[o] for o in offs]


def _blur_axis(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """1-D Gaussian along `dim` of a float32 tensor, mirror boundary (scipy 'mirror', torch 'reflect').

    A sum of shifted slices rather than a convolution: each output element is computed by the same
    elementwise float32 ops whatever the batch size, so one image alone and in a batch agree bit-exactly.
    """
    n = x.shape[dim]
    if n == 1:
        return x  # a normalised kernel on a single mirrored pixel is the identity
    offs, weights = _blur_taps(sigma, n)
    lo, hi = -offs[0], offs[-1]
    idx = torch.arange(-lo, n + hi, device=x.device)
    idx = torch.where(idx < 0, -idx, idx)
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    padded = x.index_select(dim, idx)
    out = padded.narrow(dim, lo + offs[0], n) * weights[0]
    term = torch.empty_like(out)
    for off, wk in zip(offs[1:], weights[1:], strict=True):
        # A separate multiply and add (never a fused multiply-add), always in the same order.
        torch.mul(padded.narrow(dim, off + lo, n), wk, out=term)
        out.add_(term)
    return out


def _gaussian_blur(images: torch.Tensor, sigma: float, seeds: list[int]) -> torch.Tensor:
    x = images.to(torch.float32)
    x = _blur_axis(x, sigma, dim=-2)  # rows first, then columns: scipy's order for axes=(-2, -1)
    x = _blur_axis(x, sigma, dim=-1)
    return x.round_().clamp_(0, 255).to(torch.uint8)


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
