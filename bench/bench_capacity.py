"""The capacity model (edgeexit.plan.capacity) against a real cloud server loaded by simulated edges.

    OMP_NUM_THREADS=1 python bench/bench_capacity.py runs/default --edges 4 16 48 --rate 20 --seconds 10

Starts `edgeexit serve-cloud RUN_DIR` (one worker, one thread, as in the online run) on loopback; for each N,
N client threads (one keep-alive connection each) each send a real stage-k offload payload at Poisson times
of rate r per second for `--seconds` (after a one-second warm-up); every offload is timed. Beside it, the
model's prediction from the run's cost model (fitted first if RUN_DIR/plan has none for this machine): the
replica's utilisation (offered rate over its saturated capacity), the share of time it is busy (measured: the
server process's CPU seconds per second, from /proc) and the offload latency on loopback (mean, p95). Prints
each pair and the relative error. The clients share the machine's cores with the server, which the model does
not count: keep N x r well under the replica's capacity on a small machine.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from edgeexit.experiment.servers import cloud_server_process
from edgeexit.plan.capacity import ServerModel, predict_load
from edgeexit.plan.costmodel import child_cpu_seconds, cost_model, kept
from edgeexit.plan.planner import Candidate
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.runtime import load_runtime
from edgeexit.serving import wire
from edgeexit.serving.client import CloudClient
from edgeexit.threads import set_threads


def payload(run_dir: Path, runtime: str, k: int, precision: str) -> bytes:
    """A real offload body: the first test image's tensor after stage k."""
    from edgeexit.data.preprocess import load_uint8

    run = RunDir(run_dir)
    cfg = run.load_config()
    ds, split, prep = prepare_data(cfg, run)
    rt = load_runtime(run.root, runtime, load_conventional=False)
    with torch.inference_mode():
        h = prep.normalize(load_uint8(ds, split.test[:1], prep))
        for i in range(1, k + 1):
            h, _ = rt.edge_stage(i, h)
    return wire.encode_payload(
        h, model_hash=rt.spec.content_hash, k=k, request_id=uuid.uuid4().hex, precision=precision
    )


def offload_candidate(model, k: int, precision: str) -> Candidate:
    """A configuration that offloads every image: its per-image draws are the loopback round trips."""
    rt = kept(model.loopback_ms[precision][k - 1])
    draws = np.random.default_rng(0).choice(rt, 20_000)
    return Candidate(
        "offload",
        None,
        k,
        precision,
        1,
        float("nan"),
        0.0,
        float(rt.mean()),
        float(np.percentile(draws, 95)),
        float(rt.mean()),
        draws=draws,
        offloaded=np.ones(draws.size, dtype=bool),
    )


def load(url: str, body: bytes, edges: int, rate: float, seconds: float, warmup: float = 1.0) -> list[float]:
    """Offload latencies (ms) of `edges` threads sending at Poisson times of `rate` per second each."""
    client = CloudClient(url, retries=0, timeout=30)
    rid = uuid.uuid4().hex
    start = time.perf_counter() + 0.2
    end = start + warmup + seconds
    times: list[list[float]] = [[] for _ in range(edges)]

    def edge(j: int) -> None:
        rng = np.random.default_rng(j)
        t_next = start + rng.exponential(1 / rate)
        while t_next < end:
            wait = t_next - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t0 = time.perf_counter()
            client.offload(body, rid)
            if t0 >= start + warmup:
                times[j].append((time.perf_counter() - t0) * 1e3)
            t_next += rng.exponential(1 / rate)

    threads = [threading.Thread(target=edge, args=(j,)) for j in range(edges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return [x for ts in times for x in ts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/default")
    ap.add_argument("--edges", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--rate", type=float, default=20.0, help="offloads per second per edge")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--k", type=int, default=None, help="split point (default: the run's online_k)")
    ap.add_argument("--precision", default="fp32", choices=wire.PRECISIONS)
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()
    set_threads(1)
    run = RunDir(Path(args.run_dir))
    k = args.k or run.load_config().experiment.online_k
    model = cost_model(run.root, args.runtime, 1)
    cand = offload_candidate(model, k, args.precision)
    body = payload(run.root, args.runtime, k, args.precision)
    server = ServerModel.of(model, k, args.max_batch)
    print(
        f"cost model: {model.front_ms:.3f} ms of server CPU per request beyond the forward; forward at batch 1 "
        f"{server.service_ms(1):.3f} ms; capacity {server.capacity_per_s():.0f} offloads/s; loopback round trip "
        f"mean {cand.mean_ms:.2f} ms"
    )
    extra = ["--threads", "1", "--max-batch", str(args.max_batch)]
    rows = []
    with cloud_server_process(run.root, runtime=args.runtime, extra_args=extra) as url:
        cpu = child_cpu_seconds(int(url.rsplit(":", 1)[1]))
        load(url, body, 2, 50.0, 1.0, warmup=0.0)  # warm the server's paths
        for n in args.edges:
            pred = predict_load(cand, model, edges=n, rate=args.rate, max_batch=args.max_batch)
            c0, w0 = (cpu() if cpu else float("nan")), time.perf_counter()
            lat = np.asarray(load(url, body, n, args.rate, args.seconds))
            c1, w1 = (cpu() if cpu else float("nan")), time.perf_counter()
            busy = (c1 - c0) / (w1 - w0)
            rows.append((n, n * args.rate, pred, busy, lat))
    print(
        f"\n{'edges':>5} {'offl/s':>7} {'util pred':>9} {'busy pred':>9} {'busy meas':>9} {'err':>6} "
        f"{'mean pred':>9} {'mean meas':>9} {'err':>6} {'p95 pred':>9} {'p95 meas':>9} {'err':>6} {'n':>6}"
    )
    for n, offered, pred, busy, lat in rows:
        mean, p95 = float(lat.mean()), float(np.percentile(lat, 95))
        print(
            f"{n:>5} {offered:>7.0f} {100 * pred.utilisation:>8.1f}% {100 * pred.busy:>8.1f}% {100 * busy:>8.1f}% "
            f"{100 * (pred.busy / busy - 1):>+5.0f}% {pred.offload_mean_ms:>9.2f} {mean:>9.2f} "
            f"{100 * (pred.offload_mean_ms / mean - 1):>+5.0f}% {pred.offload_p95_ms:>9.2f} {p95:>9.2f} "
            f"{100 * (pred.offload_p95_ms / p95 - 1):>+5.0f}% {lat.size:>6}"
        )


if __name__ == "__main__":
    main()
