"""Hostile images at the servers' door: extreme aspect ratios, huge declared sizes, bombs, corrupt bytes,
multi-frame files and odd modes get 200 or a 4xx (never a 5xx) from a real cloud and real edges, within a
bounded amount of memory; ordinary images keep exactly the pixels they had before the bounds existed."""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeexit.data import load_dataset, preprocessing_for
from edgeexit.data.preprocess import Preprocessing, resize_shape
from edgeexit.serving.cloud_app import create_cloud_app
from edgeexit.serving.edge_app import create_edge_app
from edgeexit.serving.edge_runner import load_runner
from edgeexit.serving.images import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_SIDE,
    ImageRejected,
    decode_image,
    sniff_image_type,
)
from edgeexit.serving.server import start_server

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PREPS = [
    Preprocessing(32, 32, (0.5,) * 3, (0.25,) * 3),
    Preprocessing(32, 36, (0.5,) * 3, (0.25,) * 3),
    Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
]


# ---- crafted bytes --------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, color_type: int = 0, *, before_idat: bytes = b"", rows: int | None = None) -> bytes:
    """A black PNG written chunk by chunk (PIL would build the whole image first); `rows` < h truncates the
    pixel data."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes(1 + w * channels)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + before_idat
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if bands == 1 else a, mode)


def _two_frames(fmt: str) -> bytes:
    red, blue = Image.new("RGB", (40, 30), (220, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 220))
    return _encode(red, fmt, save_all=True, append_images=[blue])


def _jpeg_with_segments(marker: int, total: int) -> bytes:
    """A small JPEG carrying `total` bytes of APPn/COM segments (65000 bytes each)."""
    jpeg = _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")
    seg = bytes([0xFF, marker]) + struct.pack(">H", 65002) + b"x" * 65000
    return jpeg[:2] + seg * (total // 65000) + jpeg[2:]


def _ztxt_bomb(n: int) -> bytes:
    """n zTXt chunks of ~1 KiB that each decompress to ~1 MiB."""
    z = zlib.compress(b"a" * (MIB - 100), 9)
    return _png(8, 8, before_idat=b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + z) for i in range(n)))


# (name, bytes, expected status); every server must answer exactly that.
def _cases() -> list[tuple[str, bytes, int]]:
    rgb = _noise(48, 40)
    png, jpeg = _encode(rgb, "PNG"), _encode(rgb, "JPEG")
    cases = [
        ("wide 200000x1", _png(200000, 1), 413),
        ("wide 16777216x1", _png(16777216, 1), 413),
        ("tall 1x100000", _png(1, 100000), 413),
        ("aspect 16000x200 (80:1)", _png(16000, 200), 422),
        ("aspect 64:1 accepted", _png(6400, 100), 200),
        ("declared 65535x65535 PNG", _png(65535, 65535, rows=1), 413),
        ("declared 16384x16384 PNG", _png(16384, 16384, rows=1), 413),
        ("zero width", _png(0, 5), 400),
        ("truncated PNG", png[: len(png) // 2], 400),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], 400),
        ("PNG with fewer rows than declared", _png(300, 300, rows=100), 200),  # PIL leaves them black
        ("corrupt PNG", png[:60] + bytes(range(256)) * 4, 400),
        ("corrupt JPEG", jpeg[:200] + bytes(400) + jpeg[600:], 200),  # libjpeg conceals the damage
        ("magic only", b"\x89PNG\r\n\x1a\n", 400),
        ("empty", b"", 400),
        ("zTXt bomb", _ztxt_bomb(40), 413),
        ("JPEG with 20 MiB of APP2", _jpeg_with_segments(0xE2, 20 * MIB), 413),
        ("JPEG with 20 MiB of COM", _jpeg_with_segments(0xFE, 20 * MIB), 413),
        ("GIF", _encode(rgb, "GIF"), 415),
        ("animated GIF", _encode(rgb, "GIF", save_all=True, append_images=[rgb]), 415),
        ("TIFF", _encode(rgb, "TIFF"), 415),
        ("BMP", _encode(rgb, "BMP"), 415),
        ("MPO", _two_frames("MPO"), 200),
        ("APNG", _two_frames("PNG"), 200),
        ("CMYK JPEG", _encode(_noise(40, 30, "CMYK"), "JPEG"), 200),
        ("progressive JPEG", _encode(rgb, "JPEG", progressive=True), 200),
        ("LA PNG", _encode(_noise(40, 30, "LA"), "PNG"), 200),
        ("P PNG", _encode(rgb.convert("P"), "PNG"), 200),
        ("1-bit PNG", _encode(rgb.convert("1"), "PNG"), 200),
        ("RGBA PNG", _encode(_noise(40, 30, "RGBA"), "PNG"), 200),
        (
            "I;16 PNG",
            _encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
            200,
        ),
        ("1x1 PNG", _encode(Image.new("RGB", (1, 1)), "PNG"), 200),
    ]
    return cases


CASES = _cases()


# ---- to_uint8: ordinary images keep today's pixels -------------------------------------------------------


def _todays_to_uint8(prep: Preprocessing, img: Image.Image) -> torch.Tensor:
    """Frozen copy of `Preprocessing.to_uint8` before the aspect-ratio bound: the reference pixels."""
    img = img.convert("RGB")
    s = prep.input_size
    if img.size != (s, s):
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = prep.resize_size, int(prep.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top = int(round((new_h - s) / 2.0))
        left = int(round((new_w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_to_uint8_keeps_todays_pixels_on_the_embedded_datasets(name: str) -> None:
    ds = load_dataset(name)
    for prep in [preprocessing_for(ds), preprocessing_for(ds, 28), *PREPS[1:]]:
        for i in range(0, len(ds), 1 if prep.input_size <= 32 else 97):
            img = ds.image(i)
            assert torch.equal(prep.to_uint8(img), _todays_to_uint8(prep, img)), (name, i, prep)


def _ordinary_sizes() -> list[tuple[int, int]]:
    """Sizes up to 4000 px with aspect ratios up to 4:1, both orientations, small and large."""
    rng = np.random.default_rng(3)
    sizes = [(4000, 1000), (1000, 4000), (4000, 3000), (3000, 4000), (1, 1), (1, 4), (4, 1), (7, 28)]
    for _ in range(40):
        long = int(rng.integers(1, 4001))
        short = max(1, int(round(long / rng.uniform(1.0, 4.0))))
        sizes.append((long, short) if rng.random() < 0.5 else (short, long))
    return sizes


def test_to_uint8_keeps_todays_pixels_on_ordinary_sizes() -> None:
    rng = np.random.default_rng(4)
    for w, h in _ordinary_sizes():
        # Noise at a coarse grid, scaled up: large images without drawing millions of random numbers.
        small = rng.integers(0, 256, (min(h, 64), min(w, 64), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)
        for prep in PREPS:
            assert not resize_shape(w, h, prep.resize_size)[2]  # the ordinary path, not the box
            assert torch.equal(prep.to_uint8(img), _todays_to_uint8(prep, img)), ((w, h), prep)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_to_uint8_keeps_todays_pixels_in_every_mode(mode: str) -> None:
    if mode in ("I;16", "I", "F"):
        a = np.random.default_rng(5).integers(0, 300, (90, 70))
        img = Image.fromarray(a.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    else:
        img = _noise(70, 90, "RGB" if mode in ("1", "L", "P") else mode)
        img = img.convert(mode) if mode in ("1", "L", "P") else img
    assert img.mode == mode
    for prep in PREPS:
        assert torch.equal(prep.to_uint8(img), _todays_to_uint8(prep, img)), (mode, prep)


@pytest.mark.parametrize("size", [(4500, 250), (250, 4500), (40000, 40), (40, 40000)])
def test_the_box_path_matches_the_full_resize_within_rounding(size: tuple[int, int]) -> None:
    """Past BOX_RESIZE_ABOVE the resized image is not made whole; these are still small enough for the full
    path, so the two can be compared."""
    prep = PREPS[2] if max(size) < 10000 else PREPS[1]
    w, h = size
    assert resize_shape(w, h, prep.resize_size)[2]
    img = _noise(w, h, seed=w)
    new, ref = prep.to_uint8(img), _todays_to_uint8(prep, img)
    assert new.shape == ref.shape == (3, prep.input_size, prep.input_size)
    diff = (new.int() - ref.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.5  # each pass's 8-bit rounding may flip


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_to_uint8_memory_does_not_grow_with_the_aspect_ratio() -> None:
    """A 200000x1 image at a 256 px resize became a 51 Mpx (200 MiB) image before the crop."""
    img = Image.new("L", (200000, 1), 7)
    _reset_peak(os.getpid())
    before = _status(os.getpid(), "VmHWM")
    x = PREPS[2].to_uint8(img)
    assert x.shape == (3, 224, 224) and bool((x == 7).all())
    assert _status(os.getpid(), "VmHWM") - before < 16 * MIB


# ---- decode_image -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "status"), CASES, ids=[c[0] for c in CASES])
def test_decode_image_answers_each_case(name: str, data: bytes, status: int) -> None:
    prep = PREPS[1]
    if status == 200:
        x = prep.to_uint8(decode_image(data, resize_size=prep.resize_size))
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    else:
        with pytest.raises(ImageRejected) as info:
            prep.to_uint8(decode_image(data, resize_size=prep.resize_size))
        assert info.value.status == status, str(info.value)
        assert "\n" not in str(info.value)


def test_the_caps_say_what_is_accepted() -> None:
    def rejected(data: bytes) -> str:
        with pytest.raises(ImageRejected) as info:
            decode_image(data, resize_size=36)
        return str(info.value)

    assert f"at most {MAX_IMAGE_SIDE} pixels a side" in rejected(_png(200000, 1))
    assert f"aspect ratio of at most {MAX_ASPECT_RATIO}:1" in rejected(_png(16000, 200))
    assert "at most 16777216 pixels" in rejected(_png(8000, 8000, rows=1))
    assert "GIF; expected PNG or JPEG" in rejected(_encode(_noise(8, 8), "GIF"))
    assert "PNG text chunks of 40.0 MiB; at most 8 MiB" in rejected(_ztxt_bomb(40))
    big = _encode(Image.new("RGBA", (4096, 4096)), "PNG")  # 64 MiB decoded, 64 MiB more as RGB
    assert re.search(r"needs about \d+ MiB to decode .* at most 96 MiB an image", rejected(big))


def test_multi_frame_images_use_their_first_frame() -> None:
    for fmt in ("MPO", "PNG"):
        data = _two_frames(fmt)
        assert sniff_image_type(data) == ("image/jpeg" if fmt == "MPO" else "image/png")
        img = decode_image(data)
        assert img.format == fmt and getattr(img, "n_frames", 1) == 2
        r, g, b = img.convert("RGB").getpixel((20, 15))
        assert r > 200 and b < 30  # the red first frame, not the blue second one


def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_the_resize() -> None:
    img = Image.new("RGB", (8160, 6120), (90, 120, 30))  # a 50 Mpx phone photo's size
    data = _encode(img, "JPEG", quality=80)
    with pytest.raises(ImageRejected, match="at most 16777216 pixels"):
        decode_image(data)  # without resize_size there is no reduced scale to fall back on
    out = decode_image(data, resize_size=256)
    assert out.size == (4080, 3060)  # 1/2: the first scale under the pixel cap
    out = decode_image(data, resize_size=1000)
    assert out.size == (4080, 3060)
    # A normal photo decodes whole: its pixels are today's.
    normal = _encode(_noise(400, 300), "JPEG")
    assert decode_image(normal, resize_size=36).size == (400, 300)
    assert np.array_equal(
        np.asarray(decode_image(normal, resize_size=36)), np.asarray(Image.open(io.BytesIO(normal)))
    )


def test_a_progressive_jpeg_counts_its_coefficient_buffer() -> None:
    """libjpeg holds every coefficient of a progressive JPEG (2 bytes a sample): 4000x3000 at 4:4:4 is 69 MiB
    before any pixel; with the 46 MiB decoded image it is over the budget, so it decodes at 1/2."""
    data = _encode(Image.new("RGB", (4000, 3000), (5, 6, 7)), "JPEG", progressive=True, subsampling=0)
    assert decode_image(data, resize_size=256).size == (2000, 1500)
    assert decode_image(_encode(Image.new("RGB", (4000, 3000)), "JPEG"), resize_size=256).size == (4000, 3000)


# ---- real servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_run: tuple[Path, object]) -> Iterator[dict[str, httpx.Client]]:
    """A cloud server and two edge servers (EdgeRunner decodes; ConventionalRunner forwards the bytes to the
    cloud, and decodes only when the cloud refuses), all real, on ephemeral ports."""
    root, _ = tiny_run
    with start_server(create_cloud_app(root)) as cloud:
        ee = load_runner(root, strategy="ee", alpha=0.5, cloud_url=cloud.url, retries=0)
        conv = load_runner(root, strategy="conventional", alpha=0.5, cloud_url=cloud.url, retries=0)
        with (
            start_server(create_edge_app(ee)) as edge,
            start_server(create_edge_app(conv)) as edge_conv,
            httpx.Client(base_url=cloud.url, timeout=60) as c,
            httpx.Client(base_url=edge.url, timeout=60) as e,
            httpx.Client(base_url=edge_conv.url, timeout=60) as ec,
        ):
            yield {"cloud": c, "edge": e, "edge-conventional": ec}
        ee.close()
        conv.close()


def _post(client: httpx.Client, data: bytes) -> httpx.Response:
    kind = sniff_image_type(data) or "image/png"
    return client.post("/v1/classify", content=data, headers={"Content-Type": kind})


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data", "status"), CASES, ids=[c[0] for c in CASES])
def test_every_server_answers_each_case(
    servers: dict[str, httpx.Client], name: str, data: bytes, status: int
) -> None:
    for role, client in servers.items():
        r = _post(client, data)
        assert r.status_code == status, (role, r.status_code, r.text[:200])
        if status >= 400:
            assert "\n" not in r.json()["detail"]


_modes = st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"])


@st.composite
def _images(draw: st.DrawFn) -> bytes:
    """A small image in some mode and format, then perhaps truncated or with bytes overwritten."""
    mode = draw(_modes)
    fmt = "JPEG" if mode == "CMYK" else draw(st.sampled_from(["PNG", "JPEG"]))
    if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK"):
        mode = "RGB"
    w = draw(st.integers(1, 96))
    h = draw(st.one_of(st.integers(1, 96), st.integers(1, 3)))
    seed = draw(st.integers(0, 2**16))
    if mode == "I;16":
        img = Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (h, w)).astype(np.uint16))
    else:
        base = _noise(w, h, "RGB" if mode in ("1", "L", "P") else ("RGBA" if mode == "LA" else mode), seed)
        img = base.convert(mode)
    data = bytearray(
        _encode(img, fmt, **({"progressive": True} if draw(st.booleans()) and fmt == "JPEG" else {}))
    )
    damage = draw(st.sampled_from(["none", "truncate", "overwrite"]))
    if damage == "truncate":
        data = data[: draw(st.integers(1, len(data)))]
    elif damage == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data[at : at + len(patch)] = patch
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_images())
def test_random_and_damaged_images_never_get_a_5xx(servers: dict[str, httpx.Client], data: bytes) -> None:
    answers = {role: _post(client, data).status_code for role, client in servers.items()}
    assert all(s == 200 or 400 <= s < 500 for s in answers.values()), answers
    assert len(set(answers.values())) == 1, answers  # the same bytes, the same verdict everywhere


# ---- memory: a real cloud process ------------------------------------------------------------------------


def _status(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def _reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so the peak measured is this test's, not the start-up's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_cases() -> list[tuple[str, bytes, int]]:
    """The costliest images: what made gigabytes before, and the largest accepted ones under the caps."""
    rgba = _encode(Image.new("RGBA", (3000, 2000), (1, 2, 3, 4)), "PNG")  # 23 MiB decoded, 23 more as RGB
    return [
        ("wide 200000x1", _png(200000, 1), 413),
        ("wide 16777216x1", _png(16777216, 1), 413),
        ("tall 1x100000", _png(1, 100000), 413),
        ("aspect 64:1", _png(16384, 256), 200),
        ("16 Mpx RGB PNG", _encode(Image.new("RGB", (4096, 4096), (9, 9, 9)), "PNG"), 200),
        ("12 Mpx RGBA PNG", _encode(Image.new("RGBA", (4000, 3000), (9, 9, 9, 9)), "PNG"), 200),
        ("16 Mpx RGBA PNG", _encode(Image.new("RGBA", (4096, 4096)), "PNG"), 413),
        ("50 Mpx JPEG", _encode(Image.new("RGB", (8160, 6120), (90, 120, 30)), "JPEG"), 200),
        (
            "progressive 4:4:4 12 Mpx JPEG",
            _encode(Image.new("RGB", (4000, 3000), (5, 6, 7)), "JPEG", progressive=True, subsampling=0),
            200,
        ),
        ("zTXt bomb", _ztxt_bomb(60), 413),
        ("JPEG with 7.5 MiB of APP2", _jpeg_with_segments(0xE2, 15 * MIB // 2), 200),
        ("RGBA PNG and 24 MiB after IEND", rgba + bytes(24 * MIB), 200),
        # Image bodies stop at MAX_IMAGE_BODY (32 MiB), under the server's 64 MiB body limit: serving.http.read_body
        # joins the chunks, so a body of B MiB takes 2B in transit (a 60 MiB one measured 120-132 MiB).
        ("31 MiB body: a PNG header and junk", rgba[:100] + bytes(31 * MIB), 200),
        ("63 MiB body: refused from its Content-Length", rgba[:100] + bytes(63 * MIB), 413),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_hostile_images_raise_the_cloud_process_peak_rss_by_at_most_128_mib(
    tiny_run: tuple[Path, object],
) -> None:
    root, _ = tiny_run
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, "-m", "edgeexit", "serve-cloud", str(root), "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--runtime", "torch", "--threads", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cases = _memory_cases()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, "the cloud server exited"
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the cloud server never answered"
                time.sleep(0.2)
            warm = _encode(_noise(300, 200), "PNG")
            for _ in range(3):
                assert _post(c, warm).status_code == 200
            _reset_peak(proc.pid)
            base = _status(proc.pid, "VmHWM")
            grew = {}
            for name, data, status in cases:
                r = _post(c, data)
                assert r.status_code == status, (name, r.status_code, r.text[:200])
                grew[name] = (_status(proc.pid, "VmHWM") - base) / MIB
            assert _post(c, warm).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print({k: round(v, 1) for k, v in grew.items()})
    assert max(grew.values()) <= 128, grew
