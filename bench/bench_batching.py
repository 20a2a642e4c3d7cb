"""Dynamic batching in the cloud server: 16 concurrent edge clients with batching against `--max-batch 1`.

For each input size (32 and 224 px, MobileNetV2 with 3 branches, random weights: throughput does not depend on
them), two `edgeexit serve-cloud` processes run side by side on loopback, one with the default batching and
one with `--max-batch 1`, both with one torch thread. The bench process sends offloads of a real stage-k tensor
from `--clients` concurrent clients (each its own keep-alive connection); rounds alternate between the two
servers. The clients are `--load-generator asyncio` (default: one uvloop event loop writing a prebuilt request
and reading its answer, a small share of the CPU per request of the edge's client, so the server gets most of the
two cores it shares with the load) or `threads` (a `CloudClient` per thread, the edge's own client, as measured
before).

Printed per size: req/s at 16 clients (batched / unbatched, target >= 3x at 32 px and >= 1.8x at 224 px), the
1-client p50 (batched within 10% of unbatched), the mean rows per batch, and the achieved req/s as a fraction
of the bare batched compute rate (`CloudRunner.finish_many` on batches of `--clients` rows, in-process), and that
rate over the bare batch-1 rate: the most batching can gain in compute alone.

    python bench/bench_batching.py [--runtime onnx|torch] [--sizes 32 224] [--clients 16] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import free_port

from edgeexit.model import load_checkpoint, new_model, save_checkpoint
from edgeexit.onnx_export import export_onnx
from edgeexit.rundir import RunDir
from edgeexit.serving import wire
from edgeexit.serving.client import CloudClient
from edgeexit.serving.cloud_runner import CloudRunner


def random_run(root: Path, size: int) -> Path:
    torch.manual_seed(0)
    net, spec = new_model("mobilenet_v2", num_classes=10, input_size=size, branches=3)
    spec.temperatures = [1.0] * spec.num_exits
    save_checkpoint(RunDir(root).ee, net.eval(), spec)
    return root


def start(
    run: Path, flags: list[str], runtime: str, env: dict[str, str] | None = None, startup_s: float = 120
) -> tuple[subprocess.Popen, str]:
    """`edgeexit serve-cloud RUN --runtime R` with `flags` on a free port, one torch thread (`env`: more
    variables); returns (process, URL) once it answers /v1/model."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "edgeexit",
        "serve-cloud",
        str(run),
        "--port",
        str(port),
        "--runtime",
        runtime,
    ]
    proc = subprocess.Popen(
        cmd + flags,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with CloudClient(url, retries=0, timeout=2) as c:
                c.model_info()
            return proc, url
        except Exception:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"serve-cloud {' '.join(flags)} did not start")


def stage_payload(run: Path, size: int, k: int) -> tuple[torch.Tensor, bytes]:
    """The stage-k tensor of a fixed random image through the run's EE-DNN, and its fp32 offload body."""
    net, spec = load_checkpoint(run / "ee")
    x = torch.randint(
        0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        _, h = net.edge_part(spec.preprocessing.normalize(x), k)
    return h, wire.encode_payload(h, model_hash=spec.content_hash, k=k, request_id="b")


def load(url: str, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads offloading for `seconds`: req/s, p50 latency (ms), mean rows per batch."""
    stop = time.monotonic() + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    rows: list[list[int]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        with CloudClient(url, retries=0, timeout=60) as c:
            for _ in range(3):
                c.offload(body, "warm")
            barrier.wait()
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c._request("POST", "/v1/offload", body, **{"Content-Type": "application/octet-stream"})
                lat[i].append((time.perf_counter() - t0) * 1e3)
                rows[i].append(r.json()["batch"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = [v for xs in lat for v in xs]
    all_rows = [v for xs in rows for v in xs]
    return {
        "rps": len(all_lat) / wall,
        "p50": statistics.median(all_lat),
        "rows": statistics.fmean(all_rows),
    }


def load_async(url: str, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """`load` from a lean load generator: one uvloop event loop, `clients` keep-alive connections each sending the
    same prebuilt request and reading its answer (content-length framed), so that the load generator takes little
    of the CPU the server shares with it (the threaded `load` spends ~0.3 ms of interpreter time per request)."""
    import asyncio
    from urllib.parse import urlsplit

    import uvloop

    u = urlsplit(url)
    request = (
        f"POST /v1/offload HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = json.loads(await reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"status {status}: {answer}")
        return answer

    async def client(lat: list[float], rows: list[int], start: asyncio.Event, stop: float) -> None:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(3):
            await one(reader, writer)
        await start.wait()
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            answer = await one(reader, writer)
            lat.append((time.perf_counter() - t0) * 1e3)
            rows.append(answer["batch"])
        writer.close()

    async def run() -> tuple[list[list[float]], list[list[int]], float]:
        lat: list[list[float]] = [[] for _ in range(clients)]
        rows: list[list[int]] = [[] for _ in range(clients)]
        start = asyncio.Event()
        stop = time.monotonic() + seconds + 1.0
        tasks = [asyncio.create_task(client(lat[i], rows[i], start, stop)) for i in range(clients)]
        await asyncio.sleep(1.0)  # every client connected and warmed up
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return lat, rows, time.perf_counter() - t0

    lat, rows, wall = uvloop.run(run())
    all_lat = [v for xs in lat for v in xs]
    all_rows = [v for xs in rows for v in xs]
    return {"rps": len(all_lat) / wall, "p50": statistics.median(all_lat), "rows": statistics.fmean(all_rows)}


def bare_rate(run: Path, h: torch.Tensor, k: int, rows: int, runtime: str) -> float:
    """Samples/s of `finish_many` on batches of `rows` single-row tensors, in this process, one thread."""
    m = CloudRunner.load(run, runtime)
    items = [h] * rows
    for _ in range(3):
        m.finish_many(k, items)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2:
        m.finish_many(k, items)
        n += rows
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument(
        "--runtime", default="onnx", choices=["onnx", "torch"], help="the servers' (default: onnx)"
    )
    ap.add_argument(
        "--load-generator",
        default="asyncio",
        choices=["asyncio", "threads"],
        help="asyncio (default): one lean event loop; threads: a CloudClient per thread, the edge's own client",
    )
    args = ap.parse_args()
    generate = load_async if args.load_generator == "asyncio" else load
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    out = {}
    for size in args.sizes:
        run = random_run(tmp / f"run{size}", size)
        h, body = stage_payload(run, size, args.k)
        if args.runtime == "onnx":
            export_onnx(run)
        servers = {
            "batched": start(run, ["--max-batch", "64"], args.runtime),
            "unbatched": start(run, ["--max-batch", "1"], args.runtime),
        }
        res: dict[tuple[str, int], list[dict]] = {}
        try:
            for _ in range(args.rounds):
                for name, (_, url) in servers.items():
                    for clients in (1, args.clients):
                        res.setdefault((name, clients), []).append(generate(url, body, clients, args.seconds))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=20)
        med = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for key, rs in res.items()}
        bare = bare_rate(run, h, args.k, args.clients, args.runtime)
        bare1 = bare_rate(run, h, args.k, 1, args.runtime)
        b, u = med[("batched", args.clients)], med[("unbatched", args.clients)]
        b1, u1 = med[("batched", 1)], med[("unbatched", 1)]
        out[size] = {
            "batched": b,
            "unbatched": u,
            "batched1": b1,
            "unbatched1": u1,
            "bare": bare,
            "bare1": bare1,
        }
        print(
            f"{size} px, k={args.k}, runtime {args.runtime}, {args.load_generator} load: {args.clients} clients {b['rps']:.0f} vs {u['rps']:.0f} req/s "
            f"({b['rps'] / u['rps']:.2f}x), {b['rows']:.1f} rows per batch; 1 client p50 {b1['p50']:.2f} vs "
            f"{u1['p50']:.2f} ms ({b1['p50'] / u1['p50']:.2f}x); bare batched compute {bare:.0f} samples/s, "
            f"achieved {b['rps'] / bare:.0%} of it; at batch 1 {bare1:.0f} samples/s (batching can gain at most "
            f"{bare / bare1:.2f}x in compute)",
            flush=True,
        )
    print(json.dumps({str(k): v for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
