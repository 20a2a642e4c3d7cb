"""Image bytes at the servers' door: sniffing, bounded decoding, and PNG encoding of uint8 tensors."""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from edgeexit.errors import UserError

__all__ = [
    "IMAGE_TYPES",
    "MAX_IMAGE_PIXELS",
    "ImageRejected",
    "decode_image",
    "png_bytes",
    "sniff_image_type",
]

IMAGE_TYPES = ("image/png", "image/jpeg")
# 16 Mpx (48 MiB as RGB): far above any camera frame this system classifies, far below a decompression bomb.
MAX_IMAGE_PIXELS = 16 * 1024 * 1024
_PIL_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}


class ImageRejected(UserError):
    """Image bytes that cannot be classified; `status` is the HTTP code a server answers (400/413/415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully decoded PNG or JPEG image; anything else raises ImageRejected (400 / 413 / 415)."""
    if not data:
        raise ImageRejected(400, "empty body; expected PNG or JPEG image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in _PIL_FORMATS:
                raise ImageRejected(415, f"image format {fmt}; expected PNG or JPEG")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(413, f"image of {w}x{h} pixels; at most {max_pixels} pixels are accepted")
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


def sniff_image_type(data: bytes) -> str | None:
    """'image/png' or 'image/jpeg' from the magic bytes, else None."""
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
