"""The offload request path against its baseline, side by side: what HTTP costs beyond the cloud's compute.

For each version (the baseline commit's code, checked out into a temporary directory, and the working tree), a
cloud server runs as its own process on loopback (one torch thread) and a client process sends `--requests`
offloads of a real stage-k tensor (32 px MobileNetV2, random weights) through that version's own edge path:
`wire.encode_payload` + `CloudClient.offload`. Rounds alternate between the versions.

- end to end: the client's wall time per offload (encode, HTTP both ways, decode, compute, answer parsing);
- compute: the server's own `server_ms` for the forward pass;
- overhead = end to end - compute, per request; the target is the baseline's overhead halved;
- client CPU: the client process's CPU time per offload (on a 2-core edge device, taken from the inference);
- /healthz: round trip of GET /healthz with http.client (the same client for both), target <= 0.5 ms.

The baseline server runs as it ran then: uvicorn's h11 parser and asyncio loop (httptools and uvloop were not
installed), access log on. Both servers compute with torch (`--runtime torch`), so that the comparison is of the
request path alone.

    python bench/bench_request_path.py [--baseline ca52d6f] [--requests 400] [--rounds 5] [--k 3]
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
import time
from pathlib import Path

from common import REPO, baseline_sources, free_port

BASELINE_SERVER = """
import sys, uvicorn
from edgeexit.serving.cloud_app import create_cloud_app
uvicorn.run(create_cloud_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), http="h11", loop="asyncio")
"""

CLIENT = """
import json, statistics, sys, time, http.client
import torch
torch.set_num_threads(1)
from edgeexit.model import load_checkpoint
from edgeexit.serving import wire
from edgeexit.serving.client import CloudClient
run, url, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
net, spec = load_checkpoint(run + "/ee")
x = torch.randint(0, 256, (1, 3, spec.input_size, spec.input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    _, h = net.edge_part(spec.preprocessing.normalize(x), k)
client = CloudClient(url, retries=0, timeout=60)
def offload(i):
    body = wire.encode_payload(h, model_hash=spec.content_hash, k=k, request_id=f"r{i}")
    return client.offload(body, f"r{i}")
for i in range(30):
    offload(i)
e2e, server = [], []
cpu0 = time.process_time()
for i in range(n):
    t0 = time.perf_counter()
    a = offload(i)
    e2e.append((time.perf_counter() - t0) * 1e3)
    server.append(a.server_ms)
cpu = (time.process_time() - cpu0) / n * 1e3
host, port = url.removeprefix("http://").split(":")
c = http.client.HTTPConnection(host, int(port))
hz = []
for i in range(n + 30):
    t0 = time.perf_counter()
    c.request("GET", "/healthz"); r = c.getresponse(); r.read()
    if i >= 30:
        hz.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({
    "e2e": statistics.median(e2e), "server": statistics.median(server),
    "overhead": statistics.median(a - b for a, b in zip(e2e, server)), "cpu": cpu, "healthz": statistics.median(hz),
}))
"""


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"server on port {port} exited with {proc.returncode}; see its log in {proc.args}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b"200" in s.recv(100):
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"server on port {port} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="ca52d6f", help="git revision of the baseline (default: ca52d6f)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-request-path-"))
    versions = {"baseline": baseline_sources(args.baseline, tmp / "baseline"), "current": REPO / "src"}
    env0 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    run = tmp / "run"
    subprocess.run(
        [sys.executable, "-c", RANDOM_RUN, str(run)],
        check=True,
        env={**env0, "PYTHONPATH": str(REPO / "src")},
    )

    servers, ports = {}, {}
    try:
        for name, src in versions.items():
            port = ports[name] = free_port()
            env = {**env0, "PYTHONPATH": str(src)}
            if name == "baseline":
                cmd = [sys.executable, "-c", BASELINE_SERVER, str(run), str(port)]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "edgeexit",
                    "serve-cloud",
                    str(run),
                    "--port",
                    str(port),
                    "--runtime",
                    "torch",
                ]
            servers[name] = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        for name in versions:
            wait_healthy(ports[name], servers[name])
        results: dict[str, list[dict]] = {name: [] for name in versions}
        for r in range(args.rounds):
            for name, src in versions.items():
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CLIENT,
                        str(run),
                        f"http://127.0.0.1:{ports[name]}",
                        str(args.requests),
                        str(args.k),
                    ],
                    env={**env0, "PYTHONPATH": str(src)},
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(timeout=20)

    med = {
        name: {key: statistics.median(x[key] for x in rs) for key in rs[0]} for name, rs in results.items()
    }
    print(
        f"32 px, k={args.k}, loopback, {args.requests} offloads x {args.rounds} rounds per version; medians (ms)"
    )
    print(
        f"{'':10s} {'end to end':>11s} {'compute':>8s} {'overhead':>9s} {'client CPU':>11s} {'/healthz':>9s}"
    )
    for name, m in med.items():
        print(
            f"{name:10s} {m['e2e']:11.3f} {m['server']:8.3f} {m['overhead']:9.3f} {m['cpu']:11.3f} {m['healthz']:9.3f}"
        )
    b, c = med["baseline"], med["current"]
    print(
        f"overhead baseline/current: {b['overhead'] / c['overhead']:.2f}x (target >= 2); "
        f"client CPU {b['cpu'] / c['cpu']:.2f}x; /healthz {c['healthz']:.3f} ms (target <= 0.5)"
    )


RANDOM_RUN = """
import sys, torch
from edgeexit.model import new_model, save_checkpoint
from edgeexit.rundir import RunDir
torch.manual_seed(0)
net, spec = new_model("mobilenet_v2", num_classes=10, input_size=32, branches=3)
spec.temperatures = [1.0] * spec.num_exits
save_checkpoint(RunDir(sys.argv[1]).ee, net.eval(), spec)
"""

if __name__ == "__main__":
    main()
