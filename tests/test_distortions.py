"""Tests for edgeexit.data.distortions."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from edgeexit.data import DEFAULT_LEVELS, DISTORTIONS, check_level, distort, identity_level
from edgeexit.errors import UserError


def _images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def test_registry_and_levels():
    assert DISTORTIONS.names() == ["gaussian_blur", "gaussian_noise", "jpeg"]
    assert DEFAULT_LEVELS["gaussian_blur"] == [0, 0.1, 0.2, 0.5, 0.8, 0.9, 1, 1.2, 1.5, 1.8]
    assert DEFAULT_LEVELS["gaussian_noise"] == [0, 5, 10, 20, 30, 50]
    assert DEFAULT_LEVELS["jpeg"] == [100, 90, 70, 50, 30, 10]
    assert identity_level("gaussian_blur") == 0 and identity_level("gaussian_noise") == 0
    assert identity_level("jpeg") is None
    with pytest.raises(UserError, match="known: gaussian_blur"):
        distort(_images(1), "motion_blur", 1.0)
    with pytest.raises(UserError, match="known: gaussian_blur"):
        identity_level("salt")


@pytest.mark.parametrize(
    ("name", "level", "message"),
    [
        ("gaussian_blur", -0.1, ">= 0"),
        ("gaussian_blur", float("nan"), ">= 0"),
        ("gaussian_noise", -5, ">= 0"),
        ("gaussian_noise", "a lot", ">= 0"),
        ("jpeg", 0, "1..100"),
        ("jpeg", 101, "1..100"),
        ("jpeg", 50.5, "1..100"),
    ],
)
def test_bad_levels(name, level, message):
    with pytest.raises(UserError, match=message):
        distort(_images(1), name, level)
    with pytest.raises(UserError, match=message):
        check_level(name, level)


def test_bad_inputs():
    with pytest.raises(UserError, match="uint8"):
        distort(_images(1).float(), "gaussian_blur", 1.0)
    with pytest.raises(UserError, match="shape"):
        distort(_images(1)[:, :1], "gaussian_blur", 1.0)
    with pytest.raises(UserError, match="one seed per image"):
        distort(_images(2), "gaussian_noise", 5, seeds=[1])
    with pytest.raises(UserError, match="non-negative"):
        distort(_images(1), "gaussian_noise", 5, seeds=[-1])


@pytest.mark.parametrize("name", ["gaussian_blur", "gaussian_noise"])
def test_level_zero_is_bit_exact_identity(name):
    x = _images(4)
    y = distort(x, name, 0)
    assert y.dtype == torch.uint8 and torch.equal(y, x) and y.data_ptr() != x.data_ptr()


# ---- blur ----------------------------------------------------------------------------------------------


def _reference_blur_taps(sigma: float, n: int) -> tuple[list[int], list[float]]:
    """The hand-written blur's taps (before scipy.ndimage): offsets and float64 weights, mirror-folded."""
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


def _reference_blur_axis(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """The hand-written 1-D float32 Gaussian along `dim`: a sum of shifted, mirror-padded slices."""
    n = x.shape[dim]
    if n == 1:
        return x
    offs, weights = _reference_blur_taps(sigma, n)
    lo, hi = -offs[0], offs[-1]
    idx = torch.arange(-lo, n + hi, device=x.device)
    idx = torch.where(idx < 0, -idx, idx)
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    padded = x.index_select(dim, idx)
    out = padded.narrow(dim, lo + offs[0], n) * weights[0]
    term = torch.empty_like(out)
    for off, wk in zip(offs[1:], weights[1:], strict=True):
        torch.mul(padded.narrow(dim, off + lo, n), wk, out=term)
        out.add_(term)
    return out


def _reference_blur_values(images: torch.Tensor, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """The hand-written blur before rounding: rows then columns, in `dtype` (it was float32)."""
    x = images.to(dtype)
    x = _reference_blur_axis(x, sigma, dim=-2)
    return _reference_blur_axis(x, sigma, dim=-1)


def _reference_blur(images: torch.Tensor, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The blur as it was hand-written before scipy.ndimage: float32 by default, round half even, clip."""
    return _reference_blur_values(images, sigma, dtype).round_().clamp_(0, 255).to(torch.uint8)


# the paper's grid (sigma 0 excluded: the identity, never blurred) plus a larger sigma
_BLUR_SIGMAS = [s for s in DEFAULT_LEVELS["gaussian_blur"] if s > 0] + [3.0]


@pytest.mark.parametrize("sigma", _BLUR_SIGMAS)
@pytest.mark.parametrize(("b", "hw"), [(20, (32, 32)), (2, (224, 224)), (6, (17, 23)), (4, (4, 5))])
def test_blur_equals_hand_written_reference_in_float64(sigma, b, hw):
    # the hand-written algorithm computed in float64 gives exactly today's (scipy, float64) pixels
    x = _images(b, *hw, seed=round(sigma * 10) + hw[0])
    assert torch.equal(distort(x, "gaussian_blur", sigma), _reference_blur(x, sigma, torch.float64))


@pytest.mark.parametrize("sigma", _BLUR_SIGMAS)
@pytest.mark.parametrize(("b", "hw"), [(100, (32, 32)), (4, (224, 224))])
def test_blur_regression_against_hand_written_float32(sigma, b, hw):
    # The blur was hand-written in float32; scipy computes in float64. They give the same uint8 pixels
    # except where the exact value lies within float32 error of a .5 rounding boundary (~1 pixel in 1e5,
    # off by 1): there float64 rounds correctly and float32 may not.
    x = _images(b, *hw, seed=round(sigma * 10))
    y = distort(x, "gaussian_blur", sigma)
    old = _reference_blur(x, sigma)
    diff = (y.int() - old.int()).abs()
    assert diff.max() <= 1
    assert diff.count_nonzero().item() <= 1e-4 * x.numel()
    exact = _reference_blur_values(x, sigma, torch.float64)[diff > 0]
    assert ((exact - exact.floor() - 0.5).abs() < 1e-4).all()


def test_blur_sigma_zero_never_calls_scipy(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("gaussian_filter called at sigma 0")

    monkeypatch.setattr(ndimage, "gaussian_filter", boom)
    x = _images(3)
    assert torch.equal(distort(x, "gaussian_blur", 0), x)
    assert torch.equal(distort(x, "gaussian_blur", 0.0), x)
    with pytest.raises(AssertionError, match="called"):
        distort(x, "gaussian_blur", 0.5)  # scipy.ndimage is looked up at call time


def test_importing_edgeexit_data_does_not_load_scipy():
    code = "import sys, edgeexit.data; assert 'scipy' not in sys.modules, 'scipy loaded on import'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.8])
@pytest.mark.parametrize("hw", [(32, 32), (17, 23)])
def test_blur_matches_scipy_mirror(sigma, hw):
    x = _images(3, *hw, seed=int(sigma * 10))
    y = distort(x, "gaussian_blur", sigma)
    assert y.shape == x.shape and y.dtype == torch.uint8
    ref = ndimage.gaussian_filter(
        x.numpy().astype(np.float64), sigma, mode="mirror", radius=math.ceil(3 * sigma), axes=(-2, -1)
    )
    assert np.abs(y.numpy().astype(np.float64) - ref).max() <= 0.5 + 1e-3
    # sigma 0.1: neighbour weights ~exp(-50), so the paper's lowest level is (correctly) a no-op
    assert torch.equal(y, x) if sigma < 0.2 else not torch.equal(y, x)


@pytest.mark.parametrize(("sigma", "hw"), [(1.8, (4, 5)), (3.0, (2, 7)), (7.5, (6, 6)), (2.0, (1, 9))])
def test_blur_radius_larger_than_image_matches_scipy(sigma, hw):
    # radius ceil(3*sigma) exceeds the image side: still valid, still scipy's mirror result
    x = _images(2, *hw, seed=3)
    y = distort(x, "gaussian_blur", sigma)
    ref = ndimage.gaussian_filter(
        x.numpy().astype(np.float64), sigma, mode="mirror", radius=math.ceil(3 * sigma), axes=(-2, -1)
    )
    assert y.shape == x.shape
    assert np.abs(y.numpy().astype(np.float64) - ref).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("sigma", DEFAULT_LEVELS["gaussian_blur"])
def test_blur_paper_grid_runs_and_keeps_constant_images(sigma):
    # sigma 1.2/1.5/1.8 crashed the original code; a normalised kernel keeps a flat image flat
    x = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(distort(x, "gaussian_blur", sigma), x)


def test_blur_batch_equals_one_by_one_and_single_image_shape():
    x = _images(500)
    y = distort(x, "gaussian_blur", 1.5)
    for i in (0, 1, 250, 499):
        assert torch.equal(distort(x[i : i + 1], "gaussian_blur", 1.5)[0], y[i])
        single = distort(x[i], "gaussian_blur", 1.5)
        assert single.shape == (3, 32, 32) and torch.equal(single, y[i])


def test_blur_reduces_high_frequency_energy():
    x = _images(4)
    diffs = [
        distort(x, "gaussian_blur", s).float().diff(dim=-1).abs().mean().item() for s in (0, 0.5, 1, 1.8)
    ]
    assert diffs == sorted(diffs, reverse=True)


# ---- noise ---------------------------------------------------------------------------------------------


def test_noise_clips_instead_of_wrapping():
    white = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    y = distort(white, "gaussian_noise", 30)
    assert y.max() <= 255 and (y < 255).any() and y.float().mean() > 200  # wrap-around would give ~0s
    black = torch.zeros((2, 3, 32, 32), dtype=torch.uint8)
    z = distort(black, "gaussian_noise", 30)
    assert (z > 0).any() and z.float().mean() < 55  # wrap-around would give ~255s
    assert (z[z > 0].float() < 200).all()


def test_noise_reproducible_and_seeded():
    x = _images(4)
    a = distort(x, "gaussian_noise", 20, seeds=[10, 11, 12, 13])
    b = distort(x, "gaussian_noise", 20, seeds=[10, 11, 12, 13])
    c = distort(x, "gaussian_noise", 20, seeds=[20, 21, 22, 23])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(distort(x, "gaussian_noise", 20), distort(x, "gaussian_noise", 20, seeds=[0, 1, 2, 3]))


def test_noise_batch_equals_one_by_one():
    x = _images(6)
    seeds = [101, 7, 3, 99, 5, 42]
    y = distort(x, "gaussian_noise", 10, seeds=seeds)
    for i, s in enumerate(seeds):
        assert torch.equal(distort(x[i], "gaussian_noise", 10, seeds=[s]), y[i])
    # the same image under its own seed gets the same noise wherever it sits in the batch
    perm = [3, 0, 5, 1, 4, 2]
    yp = distort(x[perm], "gaussian_noise", 10, seeds=[seeds[p] for p in perm])
    assert torch.equal(yp, y[perm])


@pytest.mark.parametrize("sigma", [5.0, 20.0])
def test_noise_std_in_interior(sigma):
    x = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    d = distort(x, "gaussian_noise", sigma).float() - 128
    assert abs(d.mean().item()) < 0.1 * sigma
    # rounding adds variance 1/12
    assert abs(d.std().item() - math.sqrt(sigma**2 + 1 / 12)) < 0.03 * sigma


# ---- jpeg ----------------------------------------------------------------------------------------------


def test_jpeg_matches_pil_roundtrip():
    x = _images(3)
    for q in (90, 10):
        y = distort(x, "jpeg", q)
        assert y.shape == x.shape and y.dtype == torch.uint8
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
            ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            assert np.array_equal(y[i].permute(1, 2, 0).numpy(), ref)
    err = {q: (distort(x, "jpeg", q).float() - x.float()).abs().mean().item() for q in (100, 50, 10)}
    assert 0 < err[100] < err[50] < err[10]
    assert torch.equal(distort(x[1], "jpeg", 70.0), distort(x, "jpeg", 70)[1])
