"""Benchmark: safetensors offload payloads (fp32/fp16/int8) against the authors' JSON list of floats.

Run: python bench/bench_wire.py [--repeats N]. For MobileNetV2's intermediate tensors at 224 px (the
outputs of the blocks where the branches sit), prints payload bytes and the median encode and decode
time of each format as a markdown table, with the ratios JSON / ours. The issue's targets: at fp16,
>= 4x smaller and >= 50x faster (encode + decode) than JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "tests"))  # reference.py: test-only baselines

import torch
from reference import decode_json_list, json_list_payload  # noqa: E402
from torchvision.models import mobilenet_v2

from edgeexit.serving.wire import (
    PRECISIONS,
    decode_payload,
    encode_payload,
)

# Blocks of torchvision's mobilenet_v2().features whose outputs are [1,24,56,56], [1,32,28,28], [1,64,14,14]
# and [1,96,14,14] at 224 px: the last block of each of those stages.
BLOCKS = (3, 6, 10, 13)


def intermediate_tensors() -> list[torch.Tensor]:
    """Outputs of BLOCKS for one random 224 px image through an (untrained, eval-mode) MobileNetV2."""
    torch.manual_seed(0)
    features = mobilenet_v2(weights=None).features.eval()
    x = torch.randn(1, 3, 224, 224)
    out = []
    with torch.no_grad():
        for i, block in enumerate(features):
            x = block(x)
            if i in BLOCKS:
                out.append(x.clone())
            if i >= max(BLOCKS):
                break
    return out


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` in milliseconds over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(t: torch.Tensor, repeats: int, json_repeats: int) -> list[tuple[str, int, float, float]]:
    """(format, bytes, encode ms, decode ms) for the JSON baseline and each precision."""
    body = json_list_payload(t)
    rows = [
        (
            "json",
            len(body),
            median_ms(lambda: json_list_payload(t), json_repeats),
            median_ms(lambda: decode_json_list(body), json_repeats),
        )
    ]
    meta = {"model_hash": "0" * 64, "k": 3, "request_id": "00000000-0000-0000-0000-000000000000"}
    for precision in PRECISIONS:
        body_p = encode_payload(t, precision=precision, **meta)
        rows.append(
            (
                precision,
                len(body_p),
                median_ms(lambda p=precision: encode_payload(t, precision=p, **meta), repeats),
                median_ms(lambda b=body_p: decode_payload(b), repeats),
            )
        )
    return rows


def main() -> None:
    """Print the markdown table and the worst-case ratios over the shapes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50, help="timed repeats of each safetensors codec")
    ap.add_argument("--json-repeats", type=int, default=7, help="timed repeats of the (slow) JSON codec")
    # One thread by default: these tensors are small (one request's), and on a shared, loaded machine torch's
    # intra-op pool can stall a tiny op for a scheduler slice (~12 ms), which measures the machine, not the codec.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # a benchmark choice, never done in library code
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} "
        f"(JSON: {args.json_repeats}) runs; time = encode + decode\n"
    )
    print(
        "| shape | format | bytes | encode ms | decode ms | total ms | JSON bytes / ours | JSON time / ours |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    worst: dict[str, tuple[float, float]] = {}
    for t in intermediate_tensors():
        rows = bench(t, args.repeats, args.json_repeats)
        json_bytes, json_ms = rows[0][1], rows[0][2] + rows[0][3]
        for fmt, nbytes, enc, dec in rows:
            size_x, time_x = json_bytes / nbytes, json_ms / (enc + dec)
            print(
                f"| {list(t.shape)} | {fmt} | {nbytes:,} | {enc:.3f} | {dec:.3f} | {enc + dec:.3f} "
                f"| {size_x:.1f}x | {time_x:.0f}x |"
            )
            if fmt != "json":
                old = worst.get(fmt, (float("inf"), float("inf")))
                worst[fmt] = (min(old[0], size_x), min(old[1], time_x))
    print("\nworst case over the shapes (JSON / ours):")
    for fmt, (size_x, time_x) in worst.items():
        print(f"- {fmt}: {size_x:.1f}x smaller, {time_x:.0f}x faster")
    size16, time16 = worst["fp16"]
    print(
        f"\ntarget at fp16 (>= 4x smaller, >= 50x faster): {'met' if size16 >= 4 and time16 >= 50 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
