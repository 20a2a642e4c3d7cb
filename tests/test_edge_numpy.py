"""Runtime onnx's edge path in numpy (`OnnxRuntime.edge_input`/`edge_probs`): the same normalised input bit for
bit as `Preprocessing.normalize`, the same stage tensors (and offload bytes) as the torch seam, probabilities
within 1e-6 of `inference.calibrate` with the same decisions; and the runner's request ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tinyrun import tiny_images

from edgeexit.config import RunConfig
from edgeexit.data.preprocess import Preprocessing
from edgeexit.errors import UserError
from edgeexit.inference import calibrate, calibrate_numpy
from edgeexit.onnx_runtime import OnnxRuntime
from edgeexit.policy import POLICY_NAMES, make_policy
from edgeexit.runtime import TorchRuntime
from edgeexit.serving import wire
from edgeexit.serving.edge_runner import EdgeRunner

# Every uint8 value in every channel (16 x 16 = 256 pixels): normalisation is per element and per channel, so
# equality on this image is equality on all images.
EVERY_VALUE = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(3, 1, 1)
EVERY_VALUE[1] = EVERY_VALUE[1].flip(0)


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def split_body(body: bytes) -> tuple[dict, bytes]:
    """A safetensors body as (its JSON header, its data bytes): the header's key order is not deterministic."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]), body[8 + n :]


stat = st.floats(0.01, 1.0, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(st.tuples(stat, stat, stat), st.tuples(stat, stat, stat))
def test_normalize_numpy_gives_normalize_bit_for_bit(mean: tuple, std: tuple) -> None:
    prep = Preprocessing(16, 16, mean, std)
    want = prep.normalize(EVERY_VALUE).numpy()
    assert_same_bits(prep.normalize_numpy(EVERY_VALUE.numpy()), want)
    batch = torch.stack([EVERY_VALUE, EVERY_VALUE.flip(2)])
    assert_same_bits(prep.normalize_numpy(batch.numpy()), prep.normalize(batch).numpy())
    # A channels-last view (not C-contiguous): the same values, C-contiguous as ONNX Runtime wants them.
    hwc = EVERY_VALUE.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    out = prep.normalize_numpy(hwc.numpy())
    assert out.flags.c_contiguous
    assert_same_bits(out, want)


def test_normalize_numpy_refuses_what_normalize_refuses() -> None:
    prep = Preprocessing(16, 16, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(UserError, match="uint8"):
        prep.normalize_numpy(EVERY_VALUE.numpy().astype(np.float32))
    with pytest.raises(UserError, match=r"\[B,3,H,W\]"):
        prep.normalize_numpy(EVERY_VALUE.numpy()[:2])


def test_calibrate_numpy_agrees_with_calibrate_and_decides_alike() -> None:
    gen = torch.Generator().manual_seed(7)
    for classes in (1, 2, 10, 257):
        logits = 6 * torch.randn(64, classes, generator=gen)
        for temperature in (None, 0.15, 1.0, 1.7):
            want = calibrate(logits, temperature)
            got = calibrate_numpy(logits.numpy(), temperature)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
            for name in POLICY_NAMES:
                for threshold in (0.3, 0.6, 0.9):
                    rule = make_policy(name, threshold, [0.9], branch_accuracies=[0.9])
                    a, b = rule.decide([got], 1), rule.decide([want], 1)
                    assert np.array_equal(a.stop, b.stop.numpy()) and np.array_equal(a.label, b.label.numpy())


def test_the_onnx_edge_path_computes_what_the_torch_seam_does(tiny_run_onnx: tuple[Path, RunConfig]) -> None:
    root, cfg = tiny_run_onnx
    _, images = tiny_images(root, cfg, 6)
    rt = OnnxRuntime.from_run(root, load_conventional=False)
    prep = rt.spec.preprocessing
    for x in images:
        h_np = rt.edge_input(x)
        h_t = prep.normalize(x).unsqueeze(0)
        assert isinstance(h_np, np.ndarray)
        assert_same_bits(h_np, h_t.numpy())
        for i in range(1, rt.spec.num_branches + 1):
            h_np, p = rt.edge_probs(i, h_np)
            h_t, logits = rt.edge_stage(i, h_t)
            assert_same_bits(h_np, h_t.numpy())  # the same graph on the same input
            np.testing.assert_allclose(
                p, calibrate(logits, rt.spec.temperature(i)).numpy(), rtol=0, atol=1e-6
            )
            # What an offload after exit i sends: the same header and tensor bytes from either path.
            meta = {"model_hash": rt.spec.content_hash, "k": i, "request_id": "0" * 32}
            for precision in wire.PRECISIONS:
                a = wire.encode_payload(torch.as_tensor(h_np), precision=precision, **meta)
                assert split_body(a) == split_body(wire.encode_payload(h_t, precision=precision, **meta))
    with pytest.raises(ValueError, match="1..3"):
        rt.edge_probs(0, rt.edge_input(images[0]))


def test_the_runners_on_both_runtimes_answer_with_numpy_decisions(
    tiny_run_onnx: tuple[Path, RunConfig],
) -> None:
    root, cfg = tiny_run_onnx
    _, images = tiny_images(root, cfg, 4)
    ids = set()
    for rt in (TorchRuntime.from_run(root, load_conventional=False), OnnxRuntime.from_run(root)):
        runner = EdgeRunner(rt, strategy="ee", alpha=2.0, k=2)  # never confident: stages 1..2, no cloud
        stop, probs, d, h = runner._run_edge(images[0], runner.policy)
        assert stop is None and len(probs) == 2 and isinstance(d.stop, np.ndarray)
        assert all(isinstance(p, np.ndarray) and p.shape == (1, rt.spec.num_classes) for p in probs)
        assert torch.as_tensor(h).shape[0] == 1
        for x in images:
            a = runner.classify_uint8(x)
            assert (a.outcome, a.reason, a.macs) == ("offload_failed", "no_cloud", rt.costs.macs_to_exit(2))
            assert re.fullmatch("[0-9a-f]{32}", a.request_id)
            ids.add(a.request_id)
    assert len(ids) == 2 * len(images)
