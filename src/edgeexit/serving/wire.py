"""Wire format of one offload: a safetensors body holding the intermediate tensor and string metadata.

The edge sends the output of stage k to the cloud as `application/octet-stream`. The body is a
safetensors file with one tensor, ``"tensor"``, and string metadata (format version, model hash, split
point, request id, precision, original dtype and shape). Precision ``fp16`` halves the tensor; ``int8``
quantises it per tensor (affine: scale and zero point travel in the metadata) and is dequantised to
float32 on decode. Never pickle, never JSON lists of floats (the authors' format, kept in tests/reference.py
only as the wire benchmark's baseline).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch

from edgeexit.errors import EdgeExitError, UserError

__all__ = [
    "FORMAT",
    "PRECISIONS",
    "OffloadPayload",
    "PayloadDtypeError",
    "PayloadError",
    "decode_payload",
    "encode_payload",
    "has_non_finite",
]

FORMAT = "edgeexit/1"
PRECISIONS = ("fp32", "fp16", "int8")
TENSOR_KEY = "tensor"

_WIRE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
_REQUIRED_META = ("format", "model_hash", "k", "request_id", "precision", "dtype", "shape")
_INT8_META = ("scale", "zero_point")
# Our headers are a few hundred bytes; refusing big ones keeps a hostile body from costing a big parse.
_MAX_HEADER_BYTES = 64 * 1024
_INT_RE = re.compile(r"[0-9]{1,9}")
_SIGNED_INT_RE = re.compile(r"-?[0-9]{1,9}")


class PayloadError(EdgeExitError, ValueError):
    """The bytes are not a valid edgeexit payload; the server answers HTTP 400 with this message."""


class PayloadDtypeError(PayloadError):
    """A well-formed payload whose tensor dtype does not match its precision; the server answers HTTP 422."""


@dataclass
class OffloadPayload:
    """One decoded offload: the intermediate tensor (float32) and where it belongs."""

    tensor: torch.Tensor  # float32, as the edge computed it (dequantised when sent as int8)
    model_hash: str
    k: int  # split point: the output of stage k is sent
    request_id: str
    precision: str  # "fp32" | "fp16" | "int8"


def has_non_finite(t: torch.Tensor) -> bool:
    """True when the tensor holds a NaN or an infinity."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16) and not t.requires_grad:
        # numpy on the CPU's payloads: a third of torch's cost per call on a server's small tensors
        return not np.isfinite(t.numpy()).all()
    return not bool(torch.isfinite(t).all())


def _quantise_int8(t: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor affine int8 quantisation; the range includes 0 so that zeros stay exact."""
    if t.numel() == 0:
        return torch.zeros(t.shape, dtype=torch.int8), 1.0, 0
    # Range in double: max - min of two float32 extremes can overflow float32.
    t_min, t_max = torch.aminmax(t)
    lo = min(float(t_min), 0.0)
    hi = max(float(t_max), 0.0)
    scale = float(torch.tensor((hi - lo) / 255.0, dtype=torch.float32))  # exactly representable in fp32
    if not (scale > 0.0 and math.isfinite(scale)):
        scale = 1.0  # all zeros (or a range that underflows): any scale represents it within scale/2
    zero_point = int(min(127, max(-128, round(-128.0 - lo / scale))))
    q = torch.round(t / scale).add_(zero_point).clamp_(-128, 127).to(torch.int8)
    return q, scale, zero_point


def encode_payload(
    tensor: torch.Tensor, *, model_hash: str, k: int, request_id: str, precision: str = "fp32"
) -> bytes:
    """Serialise an intermediate tensor and its metadata into one safetensors body."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise UserError(f"expected a floating-point torch.Tensor, got {type(tensor).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"expected the split point k as a non-negative int, got {k!r}")
    t = tensor.detach().to(device="cpu", dtype=torch.float32)
    meta = {
        "format": FORMAT,
        "model_hash": str(model_hash),
        "k": str(k),
        "request_id": str(request_id),
        "precision": precision,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": json.dumps(list(t.shape)),
    }
    if precision == "fp32":
        wire = t
    elif precision == "fp16":
        wire = t.half()
        overflow = torch.isinf(wire)
        if bool(overflow.any()) and bool(
            (overflow & torch.isfinite(t)).any()
        ):  # finite -> inf: silent damage
            raise UserError("tensor exceeds the fp16 range (|x| <= 65504); send it as fp32")
    else:
        if has_non_finite(t):
            raise UserError("int8 precision needs finite values; send a tensor with NaN/Inf as fp32 or fp16")
        wire, scale, zero_point = _quantise_int8(t)
        meta["scale"] = repr(scale)
        meta["zero_point"] = str(zero_point)
    return safetensors.torch.save({TENSOR_KEY: wire.contiguous()}, metadata=meta)


def _read_metadata(body: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves: the torch loader does not return the metadata."""
    if len(body) < 8:
        raise PayloadError(
            f"payload truncated: expected a safetensors body of at least 8 bytes, got {len(body)}"
        )
    n = int.from_bytes(body[:8], "little")
    if n > _MAX_HEADER_BYTES:
        raise PayloadError(
            f"payload header of {n} bytes; expected a safetensors header under {_MAX_HEADER_BYTES}"
        )
    if 8 + n > len(body):
        raise PayloadError(f"payload truncated: header says {n} bytes, body has {len(body) - 8}")
    try:
        header = json.loads(body[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError):
        raise PayloadError("payload header is not JSON; expected a safetensors body") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PayloadError(f"payload has no string metadata; expected a safetensors body written by {FORMAT}")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise PayloadError(
            f"payload metadata lacks {', '.join(missing)}; expected {', '.join(_REQUIRED_META)}"
        )
    if meta["format"] != FORMAT:
        raise PayloadError(f"payload format {meta['format'][:40]!r}; expected {FORMAT!r}")
    # A body cut short (a dropped connection, a proxy limit) deserves a plain "truncated", not a loader error.
    ends = [
        v["data_offsets"][1]
        for name, v in header.items()
        if name != "__metadata__"
        and isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2
        and isinstance(v["data_offsets"][1], int)
    ]
    have = len(body) - 8 - n
    if ends and max(ends) > have:
        raise PayloadError(
            f"payload truncated: not a valid safetensors body (tensor data needs {max(ends)} bytes, body has {have})"
        )
    return meta


def decode_payload(body: bytes) -> OffloadPayload:
    """Parse and validate an offload body; anything malformed raises PayloadError."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise PayloadError(f"expected the payload as bytes, got {type(body).__name__}")
    body = bytes(body)
    meta = _read_metadata(body)
    precision = meta["precision"]
    if precision not in PRECISIONS:
        raise PayloadError(f"payload precision {precision[:40]!r}; expected one of {', '.join(PRECISIONS)}")
    if not _INT_RE.fullmatch(meta["k"]):
        raise PayloadError(f"payload k {meta['k'][:40]!r}; expected a non-negative integer")
    try:
        shape = json.loads(meta["shape"])
    except (ValueError, RecursionError):
        shape = None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise PayloadError(f"payload shape {meta['shape'][:40]!r}; expected a JSON list of ints")
    try:
        tensors = safetensors.torch.load(body)
    except Exception as exc:  # the Rust loader raises its own error types for every kind of bad body
        raise PayloadError(
            f"payload is not a valid safetensors body ({str(exc).splitlines()[0][:120]})"
        ) from None
    if set(tensors) != {TENSOR_KEY}:
        raise PayloadError(
            f"payload tensors {sorted(tensors)[:4]}; expected exactly one named {TENSOR_KEY!r}"
        )
    wire = tensors[TENSOR_KEY]
    if wire.dtype != _WIRE_DTYPE[precision]:
        raise PayloadDtypeError(
            f"payload tensor is {wire.dtype}; precision {precision} expects {_WIRE_DTYPE[precision]}"
        )
    if list(wire.shape) != shape:
        raise PayloadError(f"payload tensor has shape {list(wire.shape)}; metadata says {shape}")
    if precision == "int8":
        tensor = _dequantise(wire, meta)
    else:
        tensor = wire.to(torch.float32)
    return OffloadPayload(
        tensor=tensor,
        model_hash=meta["model_hash"],
        k=int(meta["k"]),
        request_id=meta["request_id"],
        precision=precision,
    )


def _dequantise(q: torch.Tensor, meta: dict[str, str]) -> torch.Tensor:
    """Invert `_quantise_int8` with the scale and zero point from the metadata."""
    missing = [key for key in _INT8_META if key not in meta]
    if missing:
        raise PayloadError(f"int8 payload lacks {', '.join(missing)}; expected scale and zero_point metadata")
    try:
        scale = float(meta["scale"])
    except ValueError:
        scale = math.nan
    if not (scale > 0.0 and math.isfinite(scale)):
        raise PayloadError(f"int8 payload scale {meta['scale'][:40]!r}; expected a positive finite float")
    zp = meta["zero_point"]
    if not _SIGNED_INT_RE.fullmatch(zp) or not -128 <= int(zp) <= 127:
        raise PayloadError(f"int8 payload zero_point {zp[:40]!r}; expected an integer in [-128, 127]")
    return (q.to(torch.float32) - int(zp)) * scale
