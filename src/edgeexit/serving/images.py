"""Image bytes at the servers' door: sniffing, bounded decoding, and PNG encoding of uint8 tensors.

Decoding is bounded so that no image under the servers' body limit costs more than about
`IMAGE_MEMORY_BUDGET` of memory, whatever its dimensions, aspect ratio or metadata. Caps, all checked from the
header before any pixel is decoded (status code in brackets):

- PNG or JPEG (MPO, the multi-picture JPEG of phone cameras, counts as JPEG), else [415]; a multi-frame image
  (MPO, animated PNG) is classified by its first frame;
- at most `MAX_IMAGE_SIDE` pixels per side [413] and an aspect ratio of at most `MAX_ASPECT_RATIO`:1 [422];
- at most `MAX_IMAGE_PIXELS` pixels decoded [413]; a JPEG may declare up to `MAX_JPEG_PIXELS` when the caller
  says what size it resizes to (`resize_size`): it is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
  scaling), never below that size;
- at most `MAX_METADATA_BYTES` of metadata that the decoder keeps in memory (PNG text chunks, counting each
  compressed one at its 1 MiB decompression limit; JPEG APPn/COM segments) [413];
- the body, that metadata, the decoded pixels, their RGB copy, libjpeg's coefficient buffer (progressive and
  multi-scan JPEGs) and the resize together at most `IMAGE_MEMORY_BUDGET` [413]. A JPEG over it decodes at the
  first of 1/2, 1/4, 1/8 scale that fits (not below `resize_size`); every other image within the caps above and
  the budget decodes at full size, as it always did, so its pixels do not change.

Image bodies are at most `MAX_IMAGE_BODY` bytes (the servers take the smaller of it and --max-body-mb) [413]:
serving.http.read_body joins the chunks, so a body of B MiB briefly takes 2B, and 32 MiB keeps that well under
the promise. Measured (tests/test_hostile_images.py, a real cloud process): the costliest accepted images raise its
peak RSS by at most ~96 MiB over its warmed-up level.
"""

from __future__ import annotations

import io
import math
import struct
import warnings

import torch
from PIL import Image

from edgeexit.data.preprocess import Preprocessing, resize_shape
from edgeexit.errors import UserError
from edgeexit.serving.http import trim_heap

__all__ = [
    "IMAGE_MEMORY_BUDGET",
    "IMAGE_TYPES",
    "MAX_IMAGE_BODY",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_JPEG_PIXELS",
    "MAX_METADATA_BYTES",
    "ImageRejected",
    "decode_image",
    "image_to_uint8",
    "png_bytes",
    "sniff_image_type",
]

IMAGE_TYPES = ("image/png", "image/jpeg")
# An image body's limit: a 12 Mpx camera JPEG is 3-8 MiB; a bigger body could only hold an image the budget refuses.
MAX_IMAGE_BODY = 32 << 20
# 16 Mpx (64 MiB in PIL, which keeps RGB at 4 bytes a pixel): above a 12 Mpx camera frame, far below a bomb.
MAX_IMAGE_PIXELS = 16 * 1024 * 1024
# A 50 Mpx phone photo (8160x6120) decodes at 1/2 scale or less.
MAX_JPEG_PIXELS = 4 * MAX_IMAGE_PIXELS
MAX_IMAGE_SIDE = 16384
# Panoramas reach ~10:1; 64:1 leaves room. A 200000x1 image is no photograph: its centre crop is a smear.
MAX_ASPECT_RATIO = 64
MAX_METADATA_BYTES = 8 << 20
# What one image may cost, body included. 32 MiB under the 128 MiB the servers promise: a body near the limit
# briefly takes twice its size while it is read (serving.http.read_body), and glibc's per-thread arenas may still
# hold up to ~20 MiB of what earlier requests freed (measured, tests/test_hostile_images.py).
IMAGE_MEMORY_BUDGET = 96 << 20

_PIL_FORMATS = {
    "image/png": ["PNG"],
    "image/jpeg": ["JPEG"],
}  # PIL's JPEG opener returns an MPO when it is one
_OTHER_MAGIC = {
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
}
# Bytes per pixel as PIL stores each mode (RGB is padded to 4); modes not listed take 4.
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
# Pillow decompresses a zTXt/iTXt chunk up to this many bytes (PngImagePlugin.MAX_TEXT_CHUNK).
_TEXT_CHUNK = 1 << 20
_MIB = 1 << 20
_TRIM_ABOVE = 1 << 20  # pixels


class ImageRejected(UserError):
    """Image bytes that cannot be classified; `status` is the HTTP code a server answers (400/413/415/422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(
    data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, *, resize_size: int | None = None
) -> Image.Image:
    """A decoded PNG or JPEG image (a multi-frame one's first frame) within the module's caps; anything else
    raises ImageRejected (400 / 413 / 415 / 422).

    `resize_size` is the shorter side the caller will resize to (Preprocessing.resize_size): with it a JPEG too
    large to decode whole decodes at a reduced scale no smaller than that, and the resize counts in the budget.
    """
    if not data:
        raise ImageRejected(400, "empty body; expected PNG or JPEG image bytes")
    kind = sniff_image_type(data)
    if kind is None:
        name = next((n for m, n in _OTHER_MAGIC.items() if data.startswith(m)), None)
        if name is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            name = "WEBP"
        if name is None:  # not an image format we know of: what PIL said before (UnidentifiedImageError)
            raise ImageRejected(400, "cannot decode the image (unknown format); expected PNG or JPEG bytes")
        raise ImageRejected(415, f"image format {name}; expected PNG or JPEG")
    try:
        if kind == "image/png":
            metadata, coefficients = _png_text_bytes(data), 0
            label = "PNG text chunks"
        else:
            metadata, coefficients = _jpeg_metadata(data)
            label = "JPEG APPn/COM segments"
        if metadata > MAX_METADATA_BYTES:
            raise ImageRejected(
                413,
                f"{label} of {metadata / _MIB:.1f} MiB; at most {MAX_METADATA_BYTES // _MIB} MiB accepted",
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS[kind])
            _check_size(img.size, MAX_JPEG_PIXELS if kind == "image/jpeg" and resize_size else max_pixels)
            held = len(data) + 2 * metadata  # the body, and PIL's copy of the metadata (and its joins)
            coef = coefficients(img.size) if coefficients else 0
            scale = _fit(img, held, coef, max_pixels, resize_size)
            if scale > 1:
                img.draft(img.mode, (img.size[0] // scale, img.size[1] // scale))
            img.load()  # decode now: truncated or corrupt data fails here, not later in preprocessing
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"image too large; at most {max_pixels} pixels are accepted") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        raise ImageRejected(
            400, f"cannot decode the image ({type(exc).__name__}); expected PNG or JPEG bytes"
        ) from None
    return img


def image_to_uint8(data: bytes, prep: Preprocessing) -> torch.Tensor:
    """Image bytes -> uint8 [3, S, S] through `decode_image` (sized for `prep`) and `prep.to_uint8`."""
    img = decode_image(data, resize_size=prep.resize_size)
    large = img.size[0] * img.size[1] > _TRIM_ABOVE or len(data) > 4 * _TRIM_ABOVE  # pixels, metadata
    x = prep.to_uint8(img)
    del img
    if large:
        # Threads decode in their own malloc arenas, which keep freed pixels (and metadata) resident: without
        # this, one large image after another stacked up (measured: 48 MiB still held after a 12 Mpx RGBA PNG).
        trim_heap()
    return x


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageRejected(400, f"image of {w}x{h} pixels; expected at least 1x1")
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ImageRejected(
            413, f"image of {w}x{h} pixels; at most {MAX_IMAGE_SIDE} pixels a side are accepted"
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageRejected(
            422, f"image of {w}x{h} pixels; an aspect ratio of at most {MAX_ASPECT_RATIO}:1 is accepted"
        )
    if w * h > max_pixels:
        raise ImageRejected(413, f"image of {w}x{h} pixels; at most {max_pixels} pixels are accepted")


def _fit(img: Image.Image, fixed: int, coefficients: int, max_pixels: int, resize_size: int | None) -> int:
    """The JPEG scale (1, 2, 4 or 8; always 1 for PNG) at which the image fits the pixel cap and the memory
    budget: the first that does, never below `resize_size`; 413 when none does."""
    w, h = img.size
    scales = (1, 2, 4, 8) if img.format in ("JPEG", "MPO") and resize_size else (1,)
    first = 0
    for s in scales:
        sw, sh = -(-w // s), -(-h // s)
        if s > 1 and min(sw, sh) < resize_size:  # type: ignore[operator]
            break
        cost = fixed + coefficients + _pixels_cost(img.mode, sw, sh, resize_size)
        first = first or cost
        if sw * sh <= max_pixels and cost <= IMAGE_MEMORY_BUDGET:
            return s
    raise ImageRejected(
        413,
        f"image of {w}x{h} {img.mode} pixels needs about {math.ceil(first / _MIB)} MiB to decode with its "
        f"{fixed / _MIB:.1f} MiB of body and metadata; at most {IMAGE_MEMORY_BUDGET // _MIB} MiB an image are accepted",
    )


def _pixels_cost(mode: str, w: int, h: int, resize_size: int | None) -> int:
    """Bytes PIL holds at once to decode a w x h image of `mode`, convert it to RGB and resize it."""
    n = w * h
    cost = _BYTES_PER_PIXEL.get(mode, 4) * n + (0 if mode == "RGB" else 4 * n)
    if resize_size:
        new_w, new_h, boxed = resize_shape(w, h, resize_size)
        if not boxed:  # the horizontal pass's (new_w x h) buffer, then the resized image
            cost += 4 * (new_w * h + new_w * new_h)
    return cost


def _png_text_bytes(data: bytes) -> int:
    """Bytes Pillow would keep for this PNG's text: tEXt as stored (it skips chunks over 1 MiB), each zTXt or
    compressed iTXt at its decompression limit. Walks the chunk headers only; stops at IEND or the end."""
    total, pos, end = 0, 8, len(data)
    while pos + 8 <= end:
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if ctype == b"IEND" or not ctype.isalpha():
            break  # the end, or not a chunk: PIL will say what is wrong
        if ctype == b"tEXt" and length <= _TEXT_CHUNK:
            total += length
        elif ctype == b"zTXt":
            total += _TEXT_CHUNK
        elif ctype == b"iTXt":
            key_end = data.find(b"\0", pos + 8, pos + 8 + min(length, 80))
            compressed = key_end >= 0 and key_end + 1 < end and data[key_end + 1] == 1
            total += _TEXT_CHUNK if compressed else min(length, _TEXT_CHUNK)
        pos += 12 + length
    return total


def _jpeg_metadata(data: bytes) -> tuple[int, _Coefficients | None]:
    """(bytes of APPn/COM segments before the first scan, the coefficient-buffer estimate when libjpeg must
    hold the whole image's coefficients: progressive, or a first scan without every component)."""
    total, pos, end = 0, 2, len(data)
    components: list[tuple[int, int]] = []
    progressive = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break  # not a marker: PIL will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        seg = pos + 4
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:
            total += length
        elif marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            n = data[seg + 5] if seg + 5 < end else 0
            components = [
                (data[seg + 7 + 3 * i] >> 4, data[seg + 7 + 3 * i] & 15)
                for i in range(n)
                if seg + 7 + 3 * i < end
            ]
        elif marker == 0xDA:
            in_scan = data[seg] if seg < end else 0
            if components and (progressive or in_scan < len(components)):
                return total, _Coefficients(components)
            return total, None
        pos = seg + length - 2
    return total, None


class _Coefficients:
    """libjpeg's whole-image coefficient buffer: 64 two-byte coefficients per 8x8 block of every component."""

    def __init__(self, sampling: list[tuple[int, int]]) -> None:
        self.sampling = sampling

    def __call__(self, size: tuple[int, int]) -> int:
        w, h = size
        hmax = max(max(s[0] for s in self.sampling), 1)
        vmax = max(max(s[1] for s in self.sampling), 1)
        blocks = 0
        for hs, vs in self.sampling:
            blocks += -(-w * max(hs, 1) // (8 * hmax)) * -(-h * max(vs, 1) // (8 * vmax))
        return 128 * blocks


def sniff_image_type(data: bytes) -> str | None:
    """'image/png' or 'image/jpeg' (MPO included) from the magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def png_bytes(image_uint8: torch.Tensor) -> bytes:
    """Lossless PNG of a uint8 [3, H, W] tensor: whoever decodes it gets exactly these pixels."""
    buf = io.BytesIO()
    Image.fromarray(image_uint8.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()
