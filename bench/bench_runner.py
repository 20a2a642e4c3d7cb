"""Edge-runner overhead: `EdgeRunner.classify_uint8` against a bare forward of the same layers, batch size 1.

Both sides do the same compute on the same uint8 image: normalise, stages 1..k, exit heads 1..k and a
(temperature-scaled) softmax after each head. The runner adds what the real edge does around it: a policy
decision after every branch, the fallback choice, MAC bookkeeping and the answer object. alpha = 2 (> 1)
means no branch is ever confident and there is no cloud, so the runner never offloads and never stops early.

The two are timed interleaved (alternating which goes first) and the medians compared; the target is an
overhead of at most 10%.

    python bench/bench_runner.py [--repeats 400] [--input-size 32] [--k 3] [--strategy ee] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from edgeexit.model import cost_table, new_model
from edgeexit.model.build import settle_batchnorm
from edgeexit.runtime import TorchRuntime
from edgeexit.serving.edge_runner import EdgeRunner


def main() -> None:
    """Run the benchmark and print medians and the overhead ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--strategy", default="ee", help="ee, ensemble, ensemble-mean or entropy")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    s = args.input_size
    net, spec = new_model("mobilenet_v2", num_classes=10, input_size=s, branches=3)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, s, s), dtype=torch.uint8, generator=gen)
    prep = spec.preprocessing
    settle_batchnorm(net, prep.normalize(images))
    spec.temperatures = [1.5, 1.4, 1.3, 1.2]
    spec.ensemble_weights = [0.3, 0.3, 0.4]
    k = args.k
    # Never stop early: max-probability rules with alpha > 1; entropy with threshold 1 - alpha = 0 (one-hot only).
    alpha = 1.0 if args.strategy == "entropy" else 2.0
    runner = EdgeRunner(
        TorchRuntime(net, spec, costs=cost_table(net, s)), strategy=args.strategy, alpha=alpha, k=k
    )
    logging.getLogger("edgeexit").setLevel(logging.ERROR)
    temps = spec.temperatures

    def bare(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            logits, _ = net.edge_part(prep.normalize(x).unsqueeze(0), k)
            return [torch.softmax(z / t, dim=-1) for z, t in zip(logits, temps[:k], strict=True)]

    def served(x: torch.Tensor) -> object:
        return runner.classify_uint8(x)

    for _ in range(20):  # warm up both (allocator, oneDNN primitive caches)
        bare(images[0])
        served(images[0])
    t_bare: list[float] = []
    t_runner: list[float] = []
    for r in range(args.repeats):
        x = images[r % len(images)]
        order = ((bare, t_bare), (served, t_runner)) if r % 2 == 0 else ((served, t_runner), (bare, t_bare))
        for fn, out in order:
            t0 = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t0)
    a = runner.classify_uint8(images[0])
    assert a.exit == k or args.strategy == "ee", a  # ensembles answer at k; ee at its most confident exit
    m_bare = statistics.median(t_bare) * 1e3
    m_runner = statistics.median(t_runner) * 1e3
    print(
        f"edge runner overhead, mobilenet_v2 input {s}px, k={k}, strategy {args.strategy}, "
        f"{args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}"
    )
    print(f"  bare forward (edge_part + softmax): median {m_bare:.3f} ms")
    print(f"  EdgeRunner.classify_uint8:          median {m_runner:.3f} ms")
    print(
        f"  runner / bare = {m_runner / m_bare:.3f}  (overhead {100 * (m_runner / m_bare - 1):+.1f}%, target <= +10%)"
    )


if __name__ == "__main__":
    main()
