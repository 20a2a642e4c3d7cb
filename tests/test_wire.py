"""Tests of the offload wire format: round trips, error bounds, and validation of hostile bytes."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import decode_json_list, json_list_payload

from edgeexit.errors import UserError
from edgeexit.serving.wire import (
    FORMAT,
    PRECISIONS,
    OffloadPayload,
    PayloadError,
    decode_payload,
    encode_payload,
    has_non_finite,
)

META = {"model_hash": "ab12", "k": 2, "request_id": "req-7"}


def _tensor(seed: int = 0, shape: tuple[int, ...] = (2, 3, 4, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3


def _int8_scale(t: torch.Tensor) -> float:
    """The step of the int8 grid: the range (including 0) split in 255 steps."""
    return (max(float(t.max()), 0.0) - min(float(t.min()), 0.0)) / 255


def _raw(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    base = {
        "format": FORMAT,
        "model_hash": "h",
        "k": "1",
        "request_id": "r",
        "precision": "fp32",
        "dtype": "float32",
        "shape": "[2, 3]",
    }
    base.update(meta)
    return safetensors.torch.save(tensors, metadata={k: v for k, v in base.items() if v is not None})


def test_fp32_round_trip_is_bit_exact_and_keeps_metadata() -> None:
    t = _tensor()
    t[0, 0, 0, 0] = -0.0
    p = decode_payload(encode_payload(t, precision="fp32", **META))
    assert isinstance(p, OffloadPayload)
    assert p.tensor.dtype == torch.float32
    assert torch.equal(p.tensor.view(torch.int32), t.view(torch.int32))  # bits, so -0.0 counts
    assert (p.model_hash, p.k, p.request_id, p.precision) == ("ab12", 2, "req-7", "fp32")


def test_fp32_round_trip_of_non_contiguous_tensor() -> None:
    t = _tensor().transpose(1, 3)
    p = decode_payload(encode_payload(t, **META))
    assert p.tensor.shape == t.shape
    assert torch.equal(p.tensor, t)


def test_fp16_error_is_within_half_precision_rounding() -> None:
    t = _tensor(1)
    p = decode_payload(encode_payload(t, precision="fp16", **META))
    assert p.tensor.dtype == torch.float32 and p.precision == "fp16"
    err = (p.tensor - t).abs()
    assert bool((err <= t.abs() * 2**-11 + 2**-25).all())
    assert float(err.max()) > 0  # it really went through half precision


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    offset=st.sampled_from([0.0, 50.0, -50.0]),
)
def test_int8_error_is_at_most_half_a_step(values: list[float], offset: float) -> None:
    t = torch.tensor(values, dtype=torch.float32) + offset
    p = decode_payload(encode_payload(t, precision="int8", **META))
    scale = _int8_scale(t)
    err = float((p.tensor - t).abs().max())
    assert err <= scale / 2 + 1e-4 * scale + 1e-6 * float(t.abs().max()) + 1e-30


def test_int8_keeps_zeros_exact_and_constant_tensors() -> None:
    t = torch.relu(_tensor(2))
    p = decode_payload(encode_payload(t, precision="int8", **META))
    assert bool((p.tensor[t == 0] == 0).all())
    zeros = torch.zeros(1, 4, 2, 2)
    assert torch.equal(decode_payload(encode_payload(zeros, precision="int8", **META)).tensor, zeros)
    const = torch.full((3, 3), -2.5)
    assert torch.allclose(
        decode_payload(encode_payload(const, precision="int8", **META)).tensor,
        const,
        atol=_int8_scale(const) / 2 + 1e-6,
    )


def test_lower_precisions_shrink_the_body() -> None:
    t = _tensor(3, (1, 24, 56, 56))
    sizes = {p: len(encode_payload(t, precision=p, **META)) for p in PRECISIONS}
    assert sizes["fp32"] > t.numel() * 4
    assert sizes["fp16"] < sizes["fp32"] / 1.9
    assert sizes["int8"] < sizes["fp32"] / 3.8
    assert len(json_list_payload(t)) > 4 * sizes["fp16"]


def test_non_finite_values() -> None:
    t = _tensor()
    assert not has_non_finite(t)
    t[0, 1, 2, 3] = float("nan")
    t[1, 0, 0, 0] = float("inf")
    assert has_non_finite(t)
    p = decode_payload(encode_payload(t, **META))  # sent faithfully: rejecting it is the server's job
    assert has_non_finite(p.tensor)
    assert torch.isnan(p.tensor[0, 1, 2, 3]) and torch.isinf(p.tensor[1, 0, 0, 0])
    with pytest.raises(UserError, match="finite"):
        encode_payload(t, precision="int8", **META)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "bf16"}, "precision"),
        ({"k": -1}, "non-negative int"),
        ({"k": True}, "non-negative int"),
        ({"k": "2"}, "non-negative int"),
    ],
)
def test_encode_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {**META, **kwargs}
    with pytest.raises(UserError, match=match):
        encode_payload(_tensor(), **args)  # type: ignore[arg-type]


def test_encode_rejects_integer_tensor_and_fp16_overflow() -> None:
    with pytest.raises(UserError, match="floating-point"):
        encode_payload(torch.ones(2, dtype=torch.int64), **META)
    with pytest.raises(UserError, match="fp16 range"):
        encode_payload(torch.tensor([1.0, 7e4]), precision="fp16", **META)
    with pytest.raises(UserError, match="fp16 range"):
        encode_payload(torch.tensor([float("nan"), -7e4]), precision="fp16", **META)
    inf = decode_payload(encode_payload(torch.tensor([float("inf"), 6e4]), precision="fp16", **META)).tensor
    assert torch.isinf(inf[0]) and inf[1] == pytest.approx(6e4, rel=1e-3)  # an inf stays an inf


def _valid_int8() -> bytes:
    return encode_payload(_tensor(4, (1, 2, 3, 3)), precision="int8", **META)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "truncated"),
        (b"\x00" * 7, "truncated"),
        (b"\xff" * 64, "header"),
        ((10).to_bytes(8, "little") + b"not json!!", "not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "no string metadata"),
        (safetensors.torch.save({"tensor": torch.ones(2, 3)}), "no string metadata"),
        (_raw({"tensor": torch.ones(2, 3)}, request_id=None), "lacks request_id"),
        (_raw({"tensor": torch.ones(2, 3)}, format="edgeexit/0"), "format"),
        (_raw({"other": torch.ones(2, 3)}), "exactly one named 'tensor'"),
        (_raw({"tensor": torch.ones(2, 3), "extra": torch.ones(1)}), "exactly one named 'tensor'"),
        (_raw({"tensor": torch.ones(2, 3)}, k="two"), "k 'two'; expected a non-negative integer"),
        (_raw({"tensor": torch.ones(2, 3)}, k="-1"), "non-negative integer"),
        (_raw({"tensor": torch.ones(2, 3)}, precision="fp8"), "precision 'fp8'"),
        (_raw({"tensor": torch.ones(2, 3)}, shape="2x3"), "shape"),
        (_raw({"tensor": torch.ones(2, 3)}, shape="[3, 2]"), "metadata says"),
        (_raw({"tensor": torch.ones(2, 3).half()}), "precision fp32 expects"),
        (_raw({"tensor": torch.ones(2, 3, dtype=torch.int8)}, precision="int8"), "lacks scale"),
        (
            _raw({"tensor": torch.ones(2, 3, dtype=torch.int8)}, precision="int8", scale="0", zero_point="0"),
            "scale",
        ),
        (
            _raw(
                {"tensor": torch.ones(2, 3, dtype=torch.int8)},
                precision="int8",
                scale="0.1",
                zero_point="300",
            ),
            "zero_point",
        ),
        (_valid_int8()[:-1], "not a valid safetensors body"),
    ],
)
def test_decode_rejects_malformed_bodies(body: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        decode_payload(body)
    assert "\n" not in str(info.value)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(PayloadError, match="bytes"):
        decode_payload("not bytes")  # type: ignore[arg-type]


def test_every_truncation_is_a_payload_error() -> None:
    for precision in PRECISIONS:
        body = encode_payload(_tensor(5, (1, 2, 2, 2)), precision=precision, **META)
        for n in range(len(body)):
            with pytest.raises(PayloadError):
                decode_payload(body[:n])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_payload_error(body: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_payload(body)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), precision=st.sampled_from(PRECISIONS))
def test_truncated_or_corrupted_payloads_only_raise_payload_error(
    data: st.DataObject, precision: str
) -> None:
    body = bytearray(encode_payload(_tensor(6, (1, 2, 3, 3)), precision=precision, **META))
    for _ in range(data.draw(st.integers(0, 3), label="corruptions")):
        i = data.draw(st.integers(0, len(body) - 1), label="index")
        body[i] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(body)), label="length")
    try:
        p = decode_payload(bytes(body[:cut]))
    except PayloadError:
        return
    assert p.tensor.dtype == torch.float32  # a corruption that is still a valid payload decodes normally


def test_json_list_baseline_round_trip() -> None:
    t = _tensor(7)
    body = json_list_payload(t)
    assert isinstance(json.loads(body)["data"], list)
    assert torch.equal(decode_json_list(body), t)


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)
