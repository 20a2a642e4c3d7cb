"""The cloud server, live on 127.0.0.1: offload and classify answers, every error code, a fuzz run, OpenAPI."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tinyrun import png, tiny_images

from edgeexit.config import RunConfig
from edgeexit.model import CostTable, ModelSpec, cost_table, load_checkpoint
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.runtime import TorchRuntime
from edgeexit.serving import wire
from edgeexit.serving.cloud_app import create_cloud_app
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.server import ServerHandle, start_server

pytestmark = pytest.mark.slow  # starts real servers

MAX_BODY = 64 * 1024
MAX_BATCH = 4
TOKEN = "s3cret-token"


# --- fixtures ------------------------------------------------------------------------------------------------


@dataclass
class Cloud:
    """A live cloud server and what the tests compare against."""

    url: str
    net: EarlyExitNet
    spec: ModelSpec
    conv: EarlyExitNet
    cspec: ModelSpec
    costs: CostTable
    images: torch.Tensor
    models: CloudRunner


@pytest.fixture(scope="module")
def cloud(tiny_run: tuple[Path, RunConfig]) -> Iterator[Cloud]:
    root, cfg = tiny_run
    models = CloudRunner.load(root)
    app = create_cloud_app(root, max_body_bytes=MAX_BODY, max_batch=MAX_BATCH, models=models)
    net, spec = load_checkpoint(root / "ee")
    conv, cspec = load_checkpoint(root / "conventional")
    _, images = tiny_images(root, cfg, 8)
    with start_server(app) as srv:
        yield Cloud(srv.url, net, spec, conv, cspec, cost_table(net, 32), images, models)


@pytest.fixture(scope="module")
def http(cloud: Cloud) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cloud.url, timeout=30) as c:
        yield c


def _calibrated(logits: torch.Tensor, t: float) -> tuple[list[int], list[float]]:
    conf, label = torch.softmax(logits / t, dim=1).max(dim=1)
    return label.tolist(), conf.tolist()


def _payload(cloud: Cloud, k: int, b: int = 1, **over: object) -> tuple[bytes, torch.Tensor]:
    """A real stage-k tensor of the first b test images, encoded."""
    with torch.no_grad():
        _, h = cloud.net.edge_part(cloud.spec.preprocessing.normalize(cloud.images[:b]), k)
    meta = {"model_hash": cloud.spec.content_hash, "k": k, "request_id": f"req-{k}-{b}", **over}
    return wire.encode_payload(h, **meta), h  # type: ignore[arg-type]


def _raw_payload(tensor: torch.Tensor, **meta: str) -> bytes:
    base = {
        "format": wire.FORMAT,
        "model_hash": "",
        "k": "1",
        "request_id": "r",
        "precision": "fp32",
        "dtype": "float32",
        "shape": json.dumps(list(tensor.shape)),
    }
    base.update(meta)
    return safetensors.torch.save({"tensor": tensor}, metadata=base)


def _still_serves(http: httpx.Client, cloud: Cloud) -> None:
    body, h = _payload(cloud, 2)
    r = http.post("/v1/offload", content=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want, _ = _calibrated(cloud.net.cloud_part(h, 2), cloud.spec.temperatures[-1])
    assert r.json()["label"] == want[0]


# --- answers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_offload_answer_equals_local_cloud_part(cloud: Cloud, http: httpx.Client, k: int) -> None:
    body, h = _payload(cloud, k)
    r = http.post("/v1/offload", content=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    got = r.json()
    with torch.no_grad():
        labels, confs = _calibrated(cloud.net.cloud_part(h, k), cloud.spec.temperatures[-1])
    assert got["label"] == labels[0]
    assert got["class_name"] == cloud.spec.class_names[labels[0]]
    assert got["confidence"] == pytest.approx(confs[0], abs=1e-6)
    assert (got["request_id"], got["model_hash"], got["k"]) == (f"req-{k}-1", cloud.spec.content_hash, k)
    assert got["server_ms"] > 0


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_offload_at_reduced_precision(cloud: Cloud, http: httpx.Client, precision: str) -> None:
    body, h = _payload(cloud, 1, precision=precision)
    r = http.post("/v1/offload", content=body)  # no Content-Type: accepted as octet-stream
    assert r.status_code == 200, r.text
    with torch.no_grad():
        _, confs = _calibrated(cloud.net.cloud_part(h, 1), cloud.spec.temperatures[-1])
    assert 0 < r.json()["confidence"] <= 1 and abs(r.json()["confidence"] - confs[0]) < 0.2


def test_batched_offload_answers_lists(cloud: Cloud, http: httpx.Client) -> None:
    body, h = _payload(cloud, 2, b=MAX_BATCH)
    r = http.post("/v1/offload", content=body)
    assert r.status_code == 200, r.text
    with torch.no_grad():
        labels, confs = _calibrated(cloud.net.cloud_part(h, 2), cloud.spec.temperatures[-1])
    got = r.json()
    assert got["label"] == labels and len(got["class_name"]) == MAX_BATCH
    assert got["confidence"] == pytest.approx(confs, abs=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_classify_runs_the_conventional_dnn(cloud: Cloud, http: httpx.Client, fmt: str) -> None:
    x = cloud.images[3]
    data = png(x, fmt)
    r = http.post("/v1/classify", content=data, headers={"Content-Type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text
    got = r.json()
    # The reference input: what the server decodes (JPEG is lossy), preprocessed the same way.
    decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(
        2, 0, 1
    )
    with torch.no_grad():
        logits = cloud.conv(cloud.cspec.preprocessing.normalize(decoded.unsqueeze(0)))[-1]
    labels, confs = _calibrated(logits, cloud.cspec.temperatures[-1])
    assert (got["label"], got["k"], got["model_hash"]) == (labels[0], 0, cloud.cspec.content_hash)
    assert got["confidence"] == pytest.approx(confs[0], abs=1e-6)


def test_healthz_and_model_info(cloud: Cloud, http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    info = http.get("/v1/model").json()
    assert info["accepted_k"] == [1, 2, 3]
    assert info["split_shapes"] == {str(k): cloud.costs.split_shapes[k - 1] for k in (1, 2, 3)}
    assert info["ee"]["model_hash"] == cloud.spec.content_hash
    assert info["conventional"]["model_hash"] == cloud.cspec.content_hash
    assert info["precisions"] == ["fp32", "fp16", "int8"] and info["max_batch"] == MAX_BATCH
    assert http.get("/v1/probe/ping").json() == {"ok": True}  # the link probe is mounted


# --- errors: each answers {"detail": one line}, and the server serves on ---------------------------------------


@pytest.fixture(scope="module")
def bad_payloads(cloud: Cloud) -> dict[str, tuple[bytes, int, str]]:
    good, h = _payload(cloud, 1)
    nan = h.clone()
    nan[0, 0, 0, 0] = float("nan")
    inf = h.clone()
    inf[0, 1, 1, 1] = float("inf")
    other = "0123456789abcdef"
    cases = [
        ("garbage", b"not a payload at all", 400, "payload"),
        ("truncated", good[: len(good) // 2], 400, "truncated"),
        ("empty", b"", 400, "truncated"),
        ("hash", _payload(cloud, 1, model_hash=other)[0], 409, f"{other}.*{cloud.spec.content_hash}"),
        ("k0", wire.encode_payload(h, model_hash=cloud.spec.content_hash, k=0, request_id="r"), 422, "k=0"),
        ("k4", wire.encode_payload(h, model_hash=cloud.spec.content_hash, k=4, request_id="r"), 422, "1..3"),
        (
            "shape",
            wire.encode_payload(h, model_hash=cloud.spec.content_hash, k=2, request_id="r"),
            422,
            "expected \\[B, 64, 2, 2\\]",
        ),
        (
            "rank",
            wire.encode_payload(h[0], model_hash=cloud.spec.content_hash, k=1, request_id="r"),
            422,
            "shape",
        ),
        ("dtype", _raw_payload(h.double(), model_hash=cloud.spec.content_hash), 422, "float64"),
        ("batch", _payload(cloud, 1, b=MAX_BATCH + 1)[0], 422, f"1..{MAX_BATCH}"),
        (
            "nan",
            wire.encode_payload(nan, model_hash=cloud.spec.content_hash, k=1, request_id="r"),
            422,
            "NaN",
        ),
        (
            "inf",
            wire.encode_payload(
                inf, model_hash=cloud.spec.content_hash, k=1, request_id="r", precision="fp16"
            ),
            422,
            "Inf",
        ),
        ("too-large", bytes(MAX_BODY + 1), 413, str(MAX_BODY)),
    ]
    return {name: rest for name, *rest in cases}


@pytest.mark.parametrize(
    "name",
    [
        "garbage",
        "truncated",
        "empty",
        "hash",
        "k0",
        "k4",
        "shape",
        "rank",
        "dtype",
        "batch",
        "nan",
        "inf",
        "too-large",
    ],
)
def test_offload_errors(
    cloud: Cloud, http: httpx.Client, bad_payloads: dict[str, tuple[bytes, int, str]], name: str
) -> None:
    body, status, pattern = bad_payloads[name]
    r = http.post("/v1/offload", content=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == status, (name, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert re.search(pattern, detail), (name, detail)
    _still_serves(http, cloud)


def test_offload_wrong_content_type_is_415(cloud: Cloud, http: httpx.Client) -> None:
    body, _ = _payload(cloud, 1)
    r = http.post("/v1/offload", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "application/octet-stream" in r.json()["detail"]
    _still_serves(http, cloud)


def test_chunked_body_over_the_limit_is_413(cloud: Cloud, http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield bytes(MAX_BODY // 4)

    r = http.post("/v1/offload", content=chunks())  # a generator: sent chunked, no Content-Length
    assert r.status_code == 413, r.text
    _still_serves(http, cloud)


def _raw_exchange(url: str, head: bytes, body_part: bytes) -> tuple[int, dict]:
    """Send a request head and only part of its body on a raw socket; read the answer that comes anyway."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head + body_part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, "server closed without answering"
            data += chunk
        head_bytes, rest = data.split(b"\r\n\r\n", 1)
        length = int(
            next(
                line.split(b":")[1]
                for line in head_bytes.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(rest) < length:
            rest += s.recv(65536)
    return int(head_bytes.split()[1]), json.loads(rest[:length])


def test_413_is_sent_without_reading_the_body(cloud: Cloud, http: httpx.Client) -> None:
    # The head promises 1 GB; only 1 KB ever comes. An answer at all proves the body was not read whole
    # (a server that read it would wait until the socket timeout and the test would fail).
    head = b"POST /v1/offload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000000\r\n\r\n"
    status, body = _raw_exchange(cloud.url, head, bytes(1024))
    assert status == 413 and "1000000000" in body["detail"]
    # Chunked, never finished: refused as soon as the limit is passed.
    chunk = b"%x\r\n" % 4096 + bytes(4096) + b"\r\n"
    head = b"POST /v1/offload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, body = _raw_exchange(cloud.url, head, chunk * (MAX_BODY // 4096 + 2))
    assert status == 413 and str(MAX_BODY) in body["detail"]
    _still_serves(http, cloud)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "text"),
    [
        ("image/png", b"\x89PNG\r\n\x1a\n but not really", 400, "cannot decode"),
        ("image/png", b"", 400, "empty"),
        ("image/jpeg", b"hello", 400, "cannot decode"),
        ("text/plain", b"hello", 415, "image/png or image/jpeg"),
        (None, b"hello", 415, "image/png or image/jpeg"),
        ("image/png", "GIF", 415, "GIF"),
        ("image/png", "TRUNCATED", 400, "cannot decode"),
    ],
)
def test_classify_errors(
    cloud: Cloud, http: httpx.Client, content_type: str | None, body: bytes | str, status: int, text: str
) -> None:
    if body == "GIF":
        body = png(cloud.images[0], "GIF")
    elif body == "TRUNCATED":
        body = png(cloud.images[0])[:60]
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = http.post("/v1/classify", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert text in r.json()["detail"]
    assert (
        http.post(
            "/v1/classify", content=png(cloud.images[0]), headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )
    _still_serves(http, cloud)


def test_token_required_but_healthz_open(cloud: Cloud) -> None:
    app = create_cloud_app(Path("unused"), token=TOKEN, max_body_bytes=MAX_BODY, models=cloud.models)
    body, _ = _payload(cloud, 1)
    with start_server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
        ):
            for method, path in (("POST", "/v1/offload"), ("GET", "/v1/model"), ("GET", "/v1/probe/ping")):
                r = c.request(method, path, content=body if method == "POST" else None, headers=headers)
                assert r.status_code == 401, (headers, path)
                assert "Bearer" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/offload", content=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["k"] == 1


def test_token_from_the_environment(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEEXIT_TOKEN", TOKEN)
    app = create_cloud_app(Path("unused"), models=cloud.models)
    with start_server(app) as srv:
        assert httpx.get(f"{srv.url}/v1/model").status_code == 401
        assert (
            httpx.get(f"{srv.url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )


def test_classify_without_conventional_dnn_is_503(cloud: Cloud) -> None:
    models = CloudRunner(TorchRuntime(cloud.net, cloud.spec))  # a run without a conventional DNN
    with start_server(create_cloud_app(Path("unused"), models=models)) as srv:
        r = httpx.post(
            f"{srv.url}/v1/classify", content=png(cloud.images[0]), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 503 and "no conventional DNN" in r.json()["detail"]
        assert httpx.get(f"{srv.url}/v1/model").json()["conventional"] is None


def test_missing_run_is_a_user_error(tmp_path: Path) -> None:
    from edgeexit.errors import UserError

    with pytest.raises(UserError, match="no checkpoint"):
        create_cloud_app(tmp_path)


# --- fuzz: nothing a client sends gets a 5xx ------------------------------------------------------------------

PATHS = [
    "/v1/offload",
    "/v1/classify",
    "/healthz",
    "/v1/model",
    "/v1/probe/ping",
    "/v1/probe/sink",
    "/v1/probe/source",
    "/openapi.json",
    "/docs",
    "/nope",
]
_header_name = st.sampled_from(
    [
        "content-type",
        "authorization",
        "accept",
        "x-request-id",
        "x-anything",
        "range",
        "expect",
        "accept-encoding",
        "cookie",
    ]
)
_header_value = st.one_of(
    st.sampled_from(
        ["application/octet-stream", "image/png", "image/jpeg", "text/plain", "Bearer x", "*/*", ""]
    ),
    # Printable ASCII without surrounding blanks: the only header values HTTP/1.1 (and the client) allow.
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip),
)
_query = st.dictionaries(
    st.sampled_from(["bytes", "k", "q", ""]),
    st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(max_size=12)),
    max_size=3,
)


@st.composite
def _bodies(draw: st.DrawFn, cloud: Cloud) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "meta", "tensor", "image"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    good, h = _payload(cloud, draw(st.integers(1, 3)), b=draw(st.integers(1, 2)))
    if kind == "mutated":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "meta":
        meta = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "format",
                        "model_hash",
                        "k",
                        "precision",
                        "dtype",
                        "shape",
                        "scale",
                        "zero_point",
                        "request_id",
                    ]
                ),
                st.text(max_size=20),
                max_size=6,
            )
        )
        return _raw_payload(
            h.to(draw(st.sampled_from([torch.float32, torch.float16, torch.int8, torch.float64]))),
            **{"model_hash": cloud.spec.content_hash, **meta},
        )
    if kind == "tensor":
        shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
        value = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -1e3]))
        return wire.encode_payload(
            torch.full(shape, value),
            model_hash=draw(st.sampled_from([cloud.spec.content_hash, "x"])),
            k=draw(st.integers(0, 5)),
            request_id="r",
            precision=draw(st.sampled_from(["fp32", "fp16"])),
        )
    data = png(cloud.images[0], draw(st.sampled_from(["PNG", "JPEG", "BMP"])))
    return data[: draw(st.integers(0, len(data)))]


def test_fuzz_live_server_never_answers_5xx(cloud: Cloud, http: httpx.Client) -> None:
    statuses: set[int] = set()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
        path=st.sampled_from(PATHS),
        body=_bodies(cloud),
        headers=st.dictionaries(_header_name, _header_value, max_size=4),
        query=_query,
    )
    def probe(method: str, path: str, body: bytes, headers: dict, query: dict) -> None:
        r = http.request(method, path, content=body, headers=headers, params=query)
        statuses.add(r.status_code)
        assert r.status_code < 500, (method, path, headers, query, r.text[:200])

    probe()
    assert any(400 <= s < 500 for s in statuses)  # the run did reach the error paths
    _still_serves(http, cloud)


# --- OpenAPI -------------------------------------------------------------------------------------------------


def test_openapi_describes_the_binary_bodies(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    offload = doc["paths"]["/v1/offload"]["post"]["requestBody"]["content"]
    assert offload["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    classify = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(classify) == {"image/png", "image/jpeg"}
    assert all(c["schema"]["format"] == "binary" for c in classify.values())
    assert {"400", "409", "413", "422"} <= set(doc["paths"]["/v1/offload"]["post"]["responses"])
    assert "/healthz" in doc["paths"] and "/v1/model" in doc["paths"] and "/v1/probe/ping" in doc["paths"]


def test_start_server_serves_and_stops(cloud: Cloud) -> None:
    srv: ServerHandle = start_server(create_cloud_app(Path("unused"), models=cloud.models))
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/healthz", timeout=5)


def test_hot_routes_taken_past_the_router_answer_as_routed_ones(cloud: Cloud, http: httpx.Client) -> None:
    # POST /v1/offload and /v1/classify and GET /healthz go straight to their handlers (http.DirectRoutes);
    # other methods on those paths still reach FastAPI's router, and the OpenAPI schema still lists them.
    assert http.get("/v1/offload").status_code == 405
    assert http.put("/healthz").status_code == 405
    assert http.get("/healthz").json() == {"status": "ok"}
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/offload", "/v1/classify", "/healthz"} <= set(paths)
    r = http.post(
        "/v1/offload", content=b"not a payload", headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 400 and set(r.json()) == {"detail"}
    r = http.post("/v1/offload?x=1", content=_payload(cloud, 2)[0])  # a query string does not matter
    assert r.status_code == 200 and r.json()["k"] == 2


def test_under_a_root_path_hot_routes_and_the_token_still_apply(cloud: Cloud) -> None:
    # Behind a proxy that mounts the app under /api, paths arrive with the root path in front (ASGI spec).
    app = create_cloud_app(Path("unused"), models=cloud.models, token="s3cret")

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            octet = {"Content-Type": "application/octet-stream"}
            return [
                await c.get("/api/healthz"),
                await c.post("/api/v1/offload", content=b"junk", headers=octet),
                await c.post(
                    "/api/v1/offload", content=b"junk", headers={**octet, "Authorization": "Bearer s3cret"}
                ),
            ]

    healthz, denied, junk = asyncio.run(go())
    assert healthz.status_code == 200 and healthz.json() == {"status": "ok"}
    assert denied.status_code == 401
    assert junk.status_code == 400 and "payload" in junk.json()["detail"]
