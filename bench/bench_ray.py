"""The cloud server on Ray Serve against the uvicorn engine, and Ray Serve with 1 against 2 replicas.

Three `edgeexit serve-cloud` processes run side by side on loopback (MobileNetV2 at `--size` px, 3 branches,
random weights; each replica and the uvicorn server with one torch thread): the default uvicorn engine,
`--engine ray --replicas 1` and `--engine ray --replicas 2`, each Ray one its own local instance. A client
process sends offloads of a real stage-k tensor from 1 and from `--clients` threads (each its own keep-alive
connection); rounds alternate between the servers.

Printed: the 1-client p50 latency, uvicorn against Ray at 1 replica (the difference is Ray Serve's per-request
overhead: its HTTP proxy hands each request to the replica actor over Ray's RPC), and req/s at `--clients`
clients for all three, and how 160 concurrent offloads were spread over the 2-replica server's replicas (the
x-edgeexit-replica header).
On a 2-core machine 2 replicas share the cores with the proxy and the client, so 1 vs 2 replicas shows the
mechanism, not the scaling: replicas scale with machines (or cores) to put them on.

    python bench/bench_ray.py [--runtime onnx|torch] [--size 32] [--k 3] [--clients 16] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from bench_batching import load, random_run, stage_payload, start

from edgeexit.onnx_export import export_onnx
from edgeexit.serving.ray_engine import REPLICA_HEADER

ENGINES = {
    "uvicorn": [],
    "ray1": ["--engine", "ray", "--replicas", "1"],
    "ray2": ["--engine", "ray", "--replicas", "2"],
}


def spread(url: str, body: bytes, clients: int, requests: int = 160) -> list[int]:
    """Answers per replica (the x-edgeexit-replica header) of `requests` offloads from `clients` threads."""
    with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(clients) as pool:
        replies = pool.map(
            lambda _: c.post(
                "/v1/offload", content=body, headers={"Content-Type": "application/octet-stream"}
            ),
            range(requests),
        )
        return sorted(Counter(r.headers.get(REPLICA_HEADER, "-") for r in replies).values(), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--runtime", default="onnx", choices=["onnx", "torch"], help="the servers' (default: onnx)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp"))
    run = random_run(tmp / "run", args.size)
    _, body = stage_payload(run, args.size, args.k)
    if args.runtime == "onnx":
        export_onnx(run)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    res: dict[tuple[str, int], list[dict]] = {}
    try:
        for name, flags in ENGINES.items():
            # RAY_TMPDIR: each Ray instance's session files under this bench's temporary directory, not /tmp/ray;
            # a local Ray instance and its replicas take 10-30 s to start
            servers[name] = start(run, flags, args.runtime, env={"RAY_TMPDIR": str(tmp)}, startup_s=180)
        replicas = spread(servers["ray2"][1], body, args.clients)
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                for clients in (1, args.clients):
                    res.setdefault((name, clients), []).append(load(url, body, clients, args.seconds))
    finally:
        for proc, _ in servers.values():
            proc.terminate()  # SIGTERM: Serve and the local Ray instance shut down
        for proc, _ in servers.values():
            proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for key, rs in res.items()}
    u1, r1 = med[("uvicorn", 1)], med[("ray1", 1)]
    n = args.clients
    print(
        f"{args.size} px, k={args.k}, runtime {args.runtime}: 1 client p50 uvicorn {u1['p50']:.2f} ms, Ray Serve "
        f"1 replica {r1['p50']:.2f} ms (Ray's per-request overhead {r1['p50'] - u1['p50']:+.2f} ms); {n} clients: "
        f"uvicorn {med[('uvicorn', n)]['rps']:.0f}, Ray 1 replica {med[('ray1', n)]['rps']:.0f}, Ray 2 replicas "
        f"{med[('ray2', n)]['rps']:.0f} req/s (answers per replica {replicas}); {os.cpu_count()} cores",
        flush=True,
    )
    out = {f"{name} {clients} clients": v for (name, clients), v in med.items()}
    print(json.dumps({**out, "ray2 answers per replica": replicas}, indent=1))


if __name__ == "__main__":
    main()
