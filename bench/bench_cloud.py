"""Cloud server throughput and latency for /v1/offload with 1, 4 and 16 concurrent edge clients on loopback;
optionally, the accuracy each wire precision (fp32, fp16, int8) costs on a trained run.

Throughput: the server runs as its own process (`edgeexit serve-cloud`, uvicorn binds the port itself);
each client is a thread with its own `CloudClient` (keep-alive connection) sending a real stage-k tensor
(batch 1). A fixed number of requests is split over the clients; req/s = requests / wall time, latency =
each request's round trip as the client sees it. Ratios are against 1 client, measured in the same run.

    python bench/bench_cloud.py [--run RUN_DIR] [--requests 400] [--clients 1 4 16] [--k K] [--precision fp32]
    python bench/bench_cloud.py --accuracy RUN_DIR [--limit N]

Without --run a random-weight MobileNetV2 (3 branches, 32 px, 10 classes; throughput does not depend on
the weights) is saved to a temporary run directory.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from edgeexit.data import load_uint8
from edgeexit.experiment.servers import cloud_server_process
from edgeexit.model import load_checkpoint, new_model, save_checkpoint
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.serving import wire
from edgeexit.serving.client import CloudClient
from edgeexit.serving.cloud_runner import CloudRunner


def _random_run(root: Path) -> Path:
    torch.manual_seed(0)
    net, spec = new_model("mobilenet_v2", num_classes=10, input_size=32, branches=3)
    net.eval()
    spec.temperatures = [1.0] * spec.num_exits
    save_checkpoint(RunDir(root).ee, net, spec)
    return root


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def throughput(run_dir: Path, requests: int, clients: list[int], k: int | None, precision: str) -> None:
    """Print req/s and p50/p99 latency per number of concurrent clients."""
    net, spec = load_checkpoint(RunDir(run_dir).ee)
    k = k or spec.num_branches
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, spec.input_size, spec.input_size), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        _, h = net.edge_part(spec.preprocessing.normalize(x), k)
    body = wire.encode_payload(h, model_hash=spec.content_hash, k=k, request_id="bench", precision=precision)

    def worker(n: int, url: str, barrier: threading.Barrier) -> tuple[list[float], list[float], float]:
        lat, server = [], []
        with CloudClient(url, retries=0, timeout=60) as c:
            for _ in range(3):  # connect and warm up, untimed
                c.offload(body, "warm")
            barrier.wait()  # every client starts its timed requests at once
            for _ in range(n):
                t0 = time.perf_counter()
                a = c.offload(body, "bench")
                lat.append((time.perf_counter() - t0) * 1e3)
                server.append(a.server_ms)
            return lat, server, time.perf_counter()

    with cloud_server_process(run_dir) as url:
        rows = []
        for c in clients:
            per = [requests // c + (1 if i < requests % c else 0) for i in range(c)]
            barrier = threading.Barrier(c + 1)
            with ThreadPoolExecutor(c) as pool:
                futures = [pool.submit(worker, n, url, barrier) for n in per]
                barrier.wait()
                t0 = time.perf_counter()
                results = [f.result() for f in futures]
            wall = max(r[2] for r in results) - t0
            lat = [v for r in results for v in r[0]]
            srv = [v for r in results for v in r[1]]
            rows.append(
                (c, requests / wall, _percentile(lat, 50), _percentile(lat, 99), statistics.fmean(srv))
            )
    print(
        f"cloud server /v1/offload: mobilenet_v2 {spec.input_size}px, k={k} (tensor {list(h.shape[1:])}, "
        f"{len(body)} B at {precision}), {requests} requests per row, 1 uvicorn worker, loopback"
    )
    print("| clients | req/s | vs 1 client | p50 ms | p99 ms | mean server compute ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = rows[0][1]
    for c, rate, p50, p99, srv in rows:
        print(f"| {c} | {rate:.1f} | {rate / base:.2f}x | {p50:.2f} | {p99:.2f} | {srv:.2f} |")


def precision_accuracy(run_dir: Path, limit: int | None) -> None:
    """Accuracy of the cloud's answers for every test image offloaded at each k, per wire precision."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    ds, split, _ = prepare_data(cfg, run)
    models = CloudRunner.load(run.root)
    prep = models.ee_spec.preprocessing
    ids = np.asarray(split.test[:limit])
    labels = torch.as_tensor(ds.labels[ids])
    images = load_uint8(ds, ids, prep)
    print(
        f"wire precision cost on {cfg.dataset.name} test split ({len(ids)} images), every image offloaded "
        f"at k (the final exit answers), one payload per image as the edge sends it"
    )
    print("| k | precision | accuracy | agrees with fp32 | max abs conf. change | payload B |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in range(1, models.ee_spec.num_branches + 1):
        with torch.no_grad():
            _, h = models.runtime.net.edge_part(prep.normalize(images), k)
        ref_label, ref_conf = None, None
        for precision in wire.PRECISIONS:
            decoded, size = [], 0
            for i in range(
                len(ids)
            ):  # one payload per image: int8 scales are per image, as the edge sends them
                body = wire.encode_payload(
                    h[i : i + 1], model_hash=models.ee_hash, k=k, request_id=str(i), precision=precision
                )
                size = len(body)
                decoded.append(wire.decode_payload(body).tensor)  # exactly what the server does with the body
            got_l, got_c = [], []
            for start in range(0, len(decoded), 100):  # the server's compute, batched to keep this quick
                lab, conf = models.finish(torch.cat(decoded[start : start + 100]), k)
                got_l += lab
                got_c += conf
            lt, ct = torch.tensor(got_l), torch.tensor(got_c)
            if ref_label is None:
                ref_label, ref_conf = lt, ct
            acc = float((lt == labels).float().mean())
            agree = float((lt == ref_label).float().mean())
            dconf = float((ct - ref_conf).abs().max())
            print(f"| {k} | {precision} | {acc:.4f} | {agree:.4f} | {dconf:.2e} | {size} |")


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="run directory (default: a random tiny model)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", type=int, default=None, help="split point (default: all branches)")
    ap.add_argument("--precision", default="fp32", choices=list(wire.PRECISIONS))
    ap.add_argument(
        "--accuracy",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="instead: the accuracy each wire precision costs on this trained run",
    )
    ap.add_argument("--limit", type=int, default=None, help="with --accuracy: first N test images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.accuracy is not None:
        precision_accuracy(args.accuracy, args.limit)
        return
    if args.run is not None:
        throughput(args.run, args.requests, args.clients, args.k, args.precision)
        return
    with tempfile.TemporaryDirectory() as tmp:
        throughput(_random_run(Path(tmp)), args.requests, args.clients, args.k, args.precision)


if __name__ == "__main__":
    main()
