"""Hostile clients against the real servers: >= 10,000 malformed, oversized, misleading or rude requests.

A random-weight run (MobileNetV2, 3 branches, with a conventional DNN, 32 px) is served by a real
`edgeexit serve-cloud` and a real `edgeexit serve-edge` in subprocesses, both with bearer tokens. A seeded corpus
of hostile requests goes to both from `--clients` threads, each on raw sockets:

- offload bodies: random bytes, truncated and bit-flipped valid payloads, a 2^63 header length, lying offsets,
  huge shapes, every wire dtype with the wrong precision, NaN/Inf, a bad k, a wrong model hash;
- images: extreme aspect ratios (200000x1, 1x100000, 16777216x1 PNGs), huge declared sizes, decompression bombs,
  truncated and bit-flipped PNG/JPEG, MPO, GIF, random bytes, wrong Content-Type;
- HTTP: missing or wrong token, unknown paths and methods, a lying or non-numeric Content-Length, a body over the
  limit (declared and chunked), a 64 KiB header, disconnects mid-body.

Printed: the count of answers by status (and by "closed" where the server closed the connection without an answer,
which is the right answer to some of them), the number of 5xx (must be 0), and each server's peak RSS (VmHWM from
/proc) after warm-up and at the end. Exit status 1 if any 5xx came back.

    python bench/bench_hostile.py [--requests 10000] [--clients 8] [--runtime onnx|torch]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch
from bench_batching import random_run
from common import free_port
from PIL import Image

from edgeexit.model import new_model, save_checkpoint
from edgeexit.rundir import RunDir
from edgeexit.serving import wire

CLOUD_TOKEN, EDGE_TOKEN = "cloud-secret", "edge-secret"


def random_run_with_conventional(root: Path) -> Path:
    """bench_batching's 32 px random-weight EE-DNN (3 branches) and a conventional DNN, temperature 1."""
    random_run(root, 32)
    conv, cspec = new_model("mobilenet_v2", kind="conventional", num_classes=10, input_size=32)
    cspec.temperatures = [1.0]
    save_checkpoint(RunDir(root).conventional, conv.eval(), cspec)
    return root


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def exchange(port: int, raw: bytes, *, cut: bool = False, timeout: float = 30.0) -> str:
    """Send `raw` on a fresh connection; the answer's status code as text, or 'closed' / 'timeout'.
    `cut`: close right after sending (a client that disconnects mid-request): 'cut'."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            return "closed"
        if cut:
            return "cut"
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            return "timeout"
        except OSError:
            return "closed"
    if not data.startswith(b"HTTP/1.1 "):
        return "closed"
    return data[9:12].decode()


def request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: str | None,
    ctype: str | None,
    extra: str = "",
    length: bool = True,
) -> bytes:
    """One HTTP/1.1 request, Connection: close (`length` False: no Content-Length, the caller frames the body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if ctype is not None:
        head += f"Content-Type: {ctype}\r\n"
    return (head + extra + "\r\n").encode() + body


def framed_classify(token: str | None, framing: str, body: bytes = b"") -> bytes:
    """POST /v1/classify of a PNG whose body framing header (`framing`: a Content-Length or Transfer-Encoding
    line, as given, however wrong) is written by hand."""
    return request("POST", "/v1/classify", token=token, ctype="image/png", length=False, extra=framing) + body


# ---------------------------------------------------------------------------------------------------- images
def png_of_size(width: int, height: int) -> bytes:
    """A black RGB PNG of any declared size, written chunk by chunk (PIL would allocate the pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + 3 * width)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_declared(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is a few bytes (a lie)."""
    real = png_of_size(1, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return real[:8] + chunk + real[8 + 25 :]


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_corpus(rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of hostile and odd images."""
    photo = Image.effect_noise((64, 48), 60).convert("RGB")
    jpeg, png = encoded(photo, "JPEG", quality=90), encoded(photo, "PNG")
    items = [
        ("wide 200000x1", png_of_size(200_000, 1), "image/png"),
        ("tall 1x100000", png_of_size(1, 100_000), "image/png"),
        ("wide 16777216x1", png_of_size(16_777_216, 1), "image/png"),
        ("declared 2^31-1 square", png_declared(2**31 - 1, 2**31 - 1), "image/png"),
        ("declared 65535 square", png_declared(65535, 65535), "image/png"),
        ("bomb 8000x8000 black", png_of_size(8000, 8000), "image/png"),
        ("mpo", encoded(photo, "MPO", save_all=True, append_images=[photo.rotate(90)]), "image/jpeg"),
        ("gif", encoded(photo.convert("P"), "GIF"), "image/png"),
        ("gif as gif", encoded(photo.convert("P"), "GIF"), "image/gif"),
        ("cmyk jpeg", encoded(photo.convert("CMYK"), "JPEG"), "image/jpeg"),
        ("LA png", encoded(photo.convert("LA"), "PNG"), "image/png"),
        ("I;16 png", encoded(photo.convert("I;16"), "PNG"), "image/png"),
        ("png as jpeg", png, "image/jpeg"),
        ("empty", b"", "image/png"),
        ("random bytes", rng.randbytes(5000), "image/jpeg"),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], "image/jpeg"),
        ("truncated png", png[: len(png) // 2], "image/png"),
        ("magic only", b"\x89PNG\r\n\x1a\n", "image/png"),
        ("normal png", png, "image/png"),
        ("normal jpeg", jpeg, "image/jpeg"),
    ]
    for i in range(40):  # bit-flipped images: most fail to decode (400), some decode to odd pixels (200)
        src = bytearray(jpeg if i % 2 else png)
        for _ in range(rng.randint(1, 8)):
            src[rng.randrange(len(src))] = rng.randrange(256)
        items.append(
            (f"flipped {'jpeg' if i % 2 else 'png'} {i}", bytes(src), "image/jpeg" if i % 2 else "image/png")
        )
    return items


# -------------------------------------------------------------------------------------------------- payloads
def payload_corpus(
    rng: random.Random, model_hash: str, shapes: dict[str, list[int]]
) -> list[tuple[str, bytes]]:
    """(name, body) of hostile offload payloads, around valid ones for every k and precision."""
    valid = []
    for k, shape in shapes.items():
        for precision in wire.PRECISIONS:
            t = torch.randn(shape)
            body = wire.encode_payload(
                t, model_hash=model_hash, k=int(k), request_id="r", precision=precision
            )
            valid.append((f"valid k={k} {precision}", body))
    body = valid[0][1]
    header_len = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8 : 8 + header_len])

    def with_header(h: dict, data: bytes) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    data = body[8 + header_len :]
    items = list(valid)
    items += [
        ("2^63 header length", struct.pack("<Q", 2**63) + body[8:]),
        ("header length past end", struct.pack("<Q", len(body)) + body[8:]),
        ("random bytes", rng.randbytes(4096)),
        ("empty", b""),
        ("nested header", struct.pack("<Q", 200_000) + b"[" * 200_000),
    ]
    for key in [k for k in header if k != "__metadata__"]:
        t = header[key]
        for name, change in [
            ("lying offsets", {"data_offsets": [0, 10**12]}),
            ("huge shape", {"shape": [10**15]}),
            ("negative shape", {"shape": [-1]}),
        ]:
            items.append((name, with_header({**header, key: {**t, **change}}, data)))
        for dtype in ("F64", "F16", "BF16", "I8", "U8", "I64", "BOOL"):
            items.append((f"dtype {dtype}", with_header({**header, key: {**t, "dtype": dtype}}, data)))
    meta = header["__metadata__"]
    for field, value in [
        ("k", "99"),
        ("k", "-1"),
        ("model_hash", "0" * 64),
        ("precision", "fp128"),
        ("shape", "[[[[[["),
        ("shape", "[1e309]"),
    ]:
        items.append(
            (f"meta {field}={value}", with_header({**header, "__metadata__": {**meta, field: value}}, data))
        )
    nan = wire.encode_payload(
        torch.full(shapes["1"], float("nan")), model_hash=model_hash, k=1, request_id="r", precision="fp32"
    )
    items.append(("NaN tensor", nan))
    for i in range(60):
        src = bytearray(rng.choice(valid)[1])
        for _ in range(rng.randint(1, 6)):
            src[rng.randrange(min(len(src), 400))] = rng.randrange(256)  # in or near the header
        items.append((f"flipped {i}", bytes(src)))
    for i in range(10):
        src = rng.choice(valid)[1]
        items.append((f"truncated {i}", src[: rng.randrange(1, len(src))]))
    return items


# ---------------------------------------------------------------------------------------------------- servers
def start(cmd: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeexit", *cmd, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if exchange(port, request("GET", "/healthz", token=None, ctype=None), timeout=2) == "200":
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000, help="hostile requests in all (cloud + edge)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent sending threads")
    ap.add_argument("--runtime", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    run = random_run_with_conventional(tmp / "run")
    cloud_port, edge_port = free_port(), free_port()
    common = ["--runtime", args.runtime, "--threads", "1"]
    cloud = start(
        ["serve-cloud", str(run), "--token", CLOUD_TOKEN, "--max-body-mb", "16", *common], cloud_port
    )
    edge = start(
        [
            "serve-edge",
            str(run),
            "--cloud",
            f"http://127.0.0.1:{cloud_port}",
            "--cloud-token",
            CLOUD_TOKEN,
            "--token",
            EDGE_TOKEN,
            *common,
        ],
        edge_port,
    )
    try:
        sock = socket.create_connection(("127.0.0.1", cloud_port))
        sock.sendall(request("GET", "/v1/model", token=CLOUD_TOKEN, ctype=None))
        info = b""
        while chunk := sock.recv(65536):
            info += chunk
        sock.close()
        model = json.loads(info.split(b"\r\n\r\n", 1)[1])
        images = image_corpus(rng)
        payloads = payload_corpus(rng, model["ee"]["model_hash"], model["split_shapes"])

        def hostile() -> tuple[str, int, bytes, bool]:
            """(class, port, raw request, cut) drawn from every class of attack."""
            roll = rng.random()
            port, token = rng.choice([(cloud_port, CLOUD_TOKEN), (edge_port, EDGE_TOKEN)])
            if roll < 0.35:
                name, body, ctype = rng.choice(images)
                return (
                    "image " + name,
                    port,
                    request("POST", "/v1/classify", body, token=token, ctype=ctype),
                    False,
                )
            if roll < 0.70:
                name, body = rng.choice(payloads)
                raw = request(
                    "POST", "/v1/offload", body, token=CLOUD_TOKEN, ctype="application/octet-stream"
                )
                return "payload " + name, cloud_port, raw, False
            kind = rng.randrange(10)
            if kind == 0:
                return (
                    "no token",
                    port,
                    request("POST", "/v1/classify", b"x", token=None, ctype="image/png"),
                    False,
                )
            if kind == 1:
                return "wrong token", port, request("GET", "/v1/model", token="nope", ctype=None), False
            if kind == 2:
                path = rng.choice(["/", "/admin", "/v1/offload/..%2f..%2fetc", "/" + "a" * 4000, "/metrics"])
                return "odd path", port, request("GET", path, token=token, ctype=None), False
            if kind == 3:
                return "odd method", port, request("DELETE", "/v1/classify", token=token, ctype=None), False
            if kind == 4:
                raw = framed_classify(token, "Content-Length: 99999999999\r\n", b"abc")
                return "declared over limit", port, raw, False
            if kind == 5:
                raw = framed_classify(token, "Content-Length: abc\r\n")
                return "bad content-length", port, raw, False
            if kind == 6:
                big = b"0" * (1 << 20)
                chunked = b"".join(b"%x\r\n%s\r\n" % (len(big), big) for _ in range(20)) + b"0\r\n\r\n"
                raw = framed_classify(token, "Transfer-Encoding: chunked\r\n", chunked)
                return "chunked over limit", port, raw, False
            if kind == 7:
                return (
                    "64 KiB header",
                    port,
                    request(
                        "GET", "/healthz", token=None, ctype=None, extra="X-Junk: " + "j" * 65536 + "\r\n"
                    ),
                    False,
                )
            if kind == 8:
                name, body, ctype = rng.choice(images)
                raw = request("POST", "/v1/classify", body + b"\0" * 1000, token=token, ctype=ctype)
                return "disconnect mid-body", port, raw[: len(raw) // 2], True
            return (
                "wrong content type",
                port,
                request("POST", "/v1/classify", b"{}", token=token, ctype="application/json"),
                False,
            )

        normal = next(body for name, body, _ in images if name == "normal png")
        for _ in range(20):  # warm-up: normal images through both servers, valid offloads to the cloud
            for port, token in ((cloud_port, CLOUD_TOKEN), (edge_port, EDGE_TOKEN)):
                exchange(port, request("POST", "/v1/classify", normal, token=token, ctype="image/png"))
            exchange(
                cloud_port, request("POST", "/v1/offload", payloads[0][1], token=CLOUD_TOKEN, ctype=None)
            )
        rss_warm = {"cloud": peak_rss_mib(cloud.pid), "edge": peak_rss_mib(edge.pid)}

        plan = [hostile() for _ in range(args.requests)]
        by_status: collections.Counter[str] = collections.Counter()
        five_xx: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        it = iter(plan)

        def worker() -> None:
            while True:
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                cls, port, raw, cut = item
                status = exchange(port, raw, cut=cut)
                with lock:
                    by_status[status] += 1
                    if status.startswith("5"):
                        five_xx[f"{status} {cls}"] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        alive = {
            "cloud": exchange(cloud_port, request("GET", "/healthz", token=None, ctype=None)),
            "edge": exchange(edge_port, request("GET", "/healthz", token=None, ctype=None)),
        }
        rss_end = {"cloud": peak_rss_mib(cloud.pid), "edge": peak_rss_mib(edge.pid)}
    finally:
        for p in (edge, cloud):
            p.terminate()
            p.wait(10)
    n5 = sum(five_xx.values())
    print(f"{len(plan)} hostile requests from {args.clients} clients in {wall:.1f} s ({args.runtime})")
    print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))
    print(f"5xx answers: {n5} (must be 0)")
    for name, count in five_xx.most_common(10):
        print(f"  {count} x {name}")
    for s in ("cloud", "edge"):
        print(
            f"{s}: peak RSS {rss_warm[s]:.0f} MiB after warm-up, {rss_end[s]:.0f} MiB at the end "
            f"(+{rss_end[s] - rss_warm[s]:.0f} MiB); /healthz after: {alive[s]}"
        )
    print(json.dumps({"by_status": by_status, "5xx": n5, "rss_warm": rss_warm, "rss_end": rss_end}))
    sys.exit(1 if n5 or set(alive.values()) != {"200"} else 0)


if __name__ == "__main__":
    main()
