"""Edge compute: `EdgeRunner` on runtime onnx against the same runner on runtime torch, and against the bare
ONNX Runtime sessions it calls; batch 1, CPU time, one intra-op thread.

Per input size (32 px: the default run's MobileNetV2 with `pool` exit heads; 224 px: the paper's, `bnpool`
heads; random weights, BatchNorm settled, 3 branches, 10 classes: time does not depend on the weights) a run
directory is saved and exported (`edgeexit export`), then three things are timed on the same uint8 images:

- runner torch: `EdgeRunner.classify_uint8` on `TorchRuntime` (eager PyTorch);
- runner onnx:  the same on `OnnxRuntime` (one session per stage, what `--runtime onnx` serves);
- bare onnx:    the same compute without the runner: normalise the image, `session.run` the stages' sessions,
                a temperature-scaled softmax after each exit head (as `bench_runner.py`'s bare forward). The
                runner adds the policy decision after each exit, its bookkeeping and the answer object.

Two paths: "exit 1" (alpha = 0: every image answers at the first branch) and "branch k" (alpha = 2 and no
cloud: no branch is confident, stages 1..k and exits 1..k run, the runner falls back to the edge's answer).
The three are interleaved, the order going through every permutation so that each follows each of the others
equally often, and timed with `time.process_time` (CPU time of the whole process, so no thread's work is
missed); medians are compared. (A plain rotation let runner onnx always follow runner torch, whose eager torch
evicts ONNX Runtime's weights from the caches: that alone cost it ~80 us a call at 32 px, and bare onnx none.)
The runner normalises and calibrates in numpy on runtime onnx; bare onnx stays what a user writes with the
public API (torch normalise, `session.run`, torch softmax).

Targets (issue 10): runner torch / runner onnx >= 3x at 32 px and >= 2.5x at 224 px; runner onnx / bare onnx
<= 1.15 (the runner's overhead at most 15%).

    python bench/bench_edge.py [--repeats 300] [--sizes 32 224] [--k 3] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from edgeexit.model import new_model, save_checkpoint
from edgeexit.model.build import settle_batchnorm
from edgeexit.onnx_export import export_onnx
from edgeexit.onnx_runtime import OnnxRuntime, edge_stage_file, session_options
from edgeexit.runtime import TorchRuntime
from edgeexit.serving.edge_runner import EdgeRunner

HEADS = {32: "pool", 224: "bnpool"}  # the default run's exit heads at 32 px; the paper config's at 224 px
TARGET_SPEEDUP = {32: 3.0, 224: 2.5}
TARGET_OVERHEAD = 1.15


def make_run(root: Path, size: int) -> torch.Tensor:
    """Save a random-weight 3-branch MobileNetV2 run at `size` px into `root`, export it; returns 16 images."""
    torch.manual_seed(0)
    net, spec = new_model(
        "mobilenet_v2", num_classes=10, input_size=size, branches=3, head=HEADS.get(size, "bnpool")
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=gen)
    settle_batchnorm(net, spec.preprocessing.normalize(images))
    spec.temperatures = [1.5, 1.4, 1.3, 1.2]
    save_checkpoint(root / "ee", net, spec)
    export_onnx(root)
    return images


def bare_sessions(root: Path, threads: int) -> list[ort.InferenceSession]:
    """The export's edge-stage graphs in plain ONNX Runtime sessions, set up as OnnxRuntime sets them up."""
    so = session_options(ort, threads)
    return [
        ort.InferenceSession(str(root / "onnx" / edge_stage_file(i)), so, providers=["CPUExecutionProvider"])
        for i in (1, 2, 3)
    ]


def cpu_medians(fns: dict[str, Callable[[int], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median CPU ms of each function, called interleaved in every order in turn (each follows each other
    equally often: what runs before a call decides what is left in the caches)."""
    names = list(fns)
    orders = list(itertools.permutations(names))
    for r in range(warmup):
        for name in names:
            fns[name](r)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            t0 = time.process_time()
            fns[name](r)
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def bench_size(size: int, k: int, threads: int, repeats: int, warmup: int) -> list[dict[str, object]]:
    """The rows (exit 1, branch k) of one input size."""
    with tempfile.TemporaryDirectory(prefix=f"bench-edge-{size}-") as tmp:
        root = Path(tmp)
        images = make_run(root, size)
        rt_torch = TorchRuntime.from_run(root)
        rt_onnx = OnnxRuntime.from_run(root, threads=threads)
        sessions = bare_sessions(root, threads)
        prep = rt_torch.spec.preprocessing
        temps = rt_torch.spec.temperatures
        rows = []
        for path, alpha, depth in (("exit 1", 0.0, 1), (f"branch {k}", 2.0, k)):
            on_torch = EdgeRunner(rt_torch, strategy="ee", alpha=alpha, k=k)
            on_onnx = EdgeRunner(rt_onnx, strategy="ee", alpha=alpha, k=k)

            def bare(r: int, depth: int = depth) -> list[torch.Tensor]:
                with torch.inference_mode():
                    h = prep.normalize(images[r % len(images)]).unsqueeze(0).numpy()
                    probs = []
                    for sess, t in zip(sessions[:depth], temps, strict=False):
                        h, logits = sess.run(None, {"x": h})
                        probs.append(torch.softmax(torch.from_numpy(logits) / t, dim=-1))
                return probs

            # The path is the one named: the answer after exactly `depth` stages and exit heads.
            answer = on_onnx.classify_uint8(images[0])
            assert answer.macs == rt_onnx.costs.macs_to_exit(depth), (path, answer)
            assert answer.exit == 1 if depth == 1 else answer.outcome == "offload_failed", (path, answer)
            m = cpu_medians(
                {
                    "runner torch": lambda r, run=on_torch: run.classify_uint8(images[r % len(images)]),
                    "runner onnx": lambda r, run=on_onnx: run.classify_uint8(images[r % len(images)]),
                    "bare onnx": bare,
                },
                repeats,
                warmup,
            )
            rows.append({"size": size, "path": path, **m})
    return rows


def main() -> None:
    """Run the benchmark and print the medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--k", type=int, default=3, help="edge branches for the 'branch k' path (1..3)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 5 repeats, 2 warm-ups")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup = 5, 2
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("edgeexit").setLevel(logging.ERROR)

    rows = [row for s in args.sizes for row in bench_size(s, args.k, args.threads, args.repeats, args.warmup)]
    print(
        f"edge compute, mobilenet_v2 3 branches, batch 1, {args.threads} thread(s), CPU ms (process_time), "
        f"medians of {args.repeats} interleaved repeats; onnxruntime {ort.__version__}, torch {torch.__version__}"
    )
    head = f"{'input':>6} {'path':<10} {'runner torch':>13} {'runner onnx':>12} {'bare onnx':>10}"
    print(head + f" {'torch/onnx':>11} {'target':>7} {'runner/bare':>12} {'target':>7}")
    for row in rows:
        speedup = row["runner torch"] / row["runner onnx"]
        overhead = row["runner onnx"] / row["bare onnx"]
        target = TARGET_SPEEDUP.get(row["size"], float("nan"))
        print(
            f"{row['size']:>4}px {row['path']:<10} {row['runner torch']:>13.3f} {row['runner onnx']:>12.3f} "
            f"{row['bare onnx']:>10.3f} {speedup:>10.2f}x {'>=' + format(target, 'g') + 'x':>7} "
            f"{overhead:>12.3f} {'<=' + format(TARGET_OVERHEAD, 'g'):>7}"
        )
    if args.quick:
        print("(--quick: a smoke run; the numbers mean nothing)")


if __name__ == "__main__":
    main()
