"""The edge runner and edge server against live servers: offload, fallback, retries, 409, hardened input."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import fastapi
import httpx
import pytest
import torch
from tinyrun import build_tiny_run, png, tiny_images

from edgeexit.errors import UserError
from edgeexit.model import CostTable, ModelSpec, cost_table, load_checkpoint
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.runtime import TorchRuntime
from edgeexit.serving.client import CloudClient, OffloadFailed
from edgeexit.serving.cloud_app import create_cloud_app
from edgeexit.serving.edge_app import create_edge_app
from edgeexit.serving.edge_runner import EdgeRunner, Runner, classify_files, load_runner, make_runner
from edgeexit.serving.server import start_server

pytestmark = pytest.mark.slow  # starts real servers

TOKEN = "edge-token"


@dataclass
class Env:
    """A tiny run, a live cloud server for it, and local references."""

    root: Path
    cloud_url: str
    net: EarlyExitNet
    spec: ModelSpec
    costs: CostTable
    images: torch.Tensor
    base: Runner  # loaded once with load_runner (no cloud); the tests' runners share its runtime


@pytest.fixture(scope="module")
def env(tiny_run: tuple[Path, object]) -> Iterator[Env]:
    root, cfg = tiny_run
    _, images = tiny_images(root, cfg, 12)
    base = load_runner(root, strategy="ee", alpha=0.5)
    with start_server(create_cloud_app(root)) as srv:  # the cloud loads its own copy of the checkpoint
        yield Env(root, srv.url, base.runtime.net, base.spec, base.costs, images, base)


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A local port with nothing listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _runner(
    env: Env,
    url: str | None,
    strategy: str = "ee",
    alpha: float = 0.5,
    k: int = 3,
    retries: int = 1,
    timeout: float = 10.0,
) -> Runner:
    """A runner on the loaded runtime (loading costs seconds of profiling) with its own client."""
    client = None if url is None else CloudClient(url, retries=retries, backoff=0.0, timeout=timeout)
    b = env.base
    return make_runner(b.runtime, strategy=strategy, alpha=alpha, k=k, client=client)


def _exit_probs(env: Env, x: torch.Tensor) -> list[torch.Tensor]:
    """Calibrated probabilities of every exit of one image, from a plain forward pass."""
    with torch.no_grad():
        logits = env.net(env.spec.preprocessing.normalize(x.unsqueeze(0)))
    return [torch.softmax(z / t, dim=1)[0] for z, t in zip(logits, env.spec.temperatures, strict=True)]


# --- runner --------------------------------------------------------------------------------------------------


def test_runner_answers_at_edge_exits_and_in_the_cloud(env: Env) -> None:
    runner = _runner(env, env.cloud_url, alpha=0.5)
    answers = [runner.classify_image(png(x)) for x in env.images]
    where = {a.answered_at for a in answers}
    assert where == {"edge", "cloud"}, "the tiny run should give both kinds of answer at alpha 0.5"
    for a, x in zip(answers, env.images, strict=True):
        probs = _exit_probs(env, x)
        assert a.outcome == "ok" and a.detail is None and a.time_ms > 0
        if a.answered_at == "edge":
            p = probs[a.exit - 1]
            assert float(p.max()) >= 0.5 and all(float(q.max()) < 0.5 for q in probs[: a.exit - 1])
            assert a.label == int(p.argmax()) and a.confidence == pytest.approx(float(p.max()), abs=1e-5)
            assert (a.macs, a.bytes_sent) == (env.costs.macs_to_exit(a.exit), 0)
        else:
            assert all(float(q.max()) < 0.5 for q in probs[:3])
            assert a.exit == 0 and a.label == int(probs[-1].argmax())
            assert a.confidence == pytest.approx(float(probs[-1].max()), abs=1e-5)
            assert a.macs == env.costs.macs_offloaded(3)
            assert a.bytes_sent > env.costs.split_bytes_at(3)  # the tensor plus the safetensors header


def test_fallback_when_the_cloud_is_down(env: Env, dead_url: str, caplog: pytest.LogCaptureFixture) -> None:
    runner = _runner(env, dead_url, alpha=2.0, k=2)  # alpha > 1: no edge exit is ever confident enough
    for x in env.images[:4]:
        a = runner.classify_uint8(x)
        probs = _exit_probs(env, x)[:2]
        best = max(range(2), key=lambda i: (float(probs[i].max()), -i)) + 1
        assert (a.outcome, a.answered_at, a.exit) == ("offload_failed", "edge", best)
        assert a.label == int(probs[best - 1].argmax())
        assert a.confidence == pytest.approx(float(probs[best - 1].max()), abs=1e-5)
        assert "Connection refused" in a.detail and "2 attempts" in a.detail
        assert a.macs == env.costs.macs_to_exit(2) and a.bytes_sent > 0
    assert any("offload failed" in r.message for r in caplog.records if r.levelname == "WARNING")


def test_ensemble_falls_back_to_its_own_answer(env: Env, dead_url: str) -> None:
    runner = _runner(env, dead_url, strategy="ensemble", alpha=2.0, k=3)
    x = env.images[5]
    a = runner.classify_uint8(x)
    probs = _exit_probs(env, x)[:3]
    p_e = sum(w * p.double() for w, p in zip([0.2, 0.3, 0.5], probs, strict=True))
    assert (a.outcome, a.exit, a.label) == ("offload_failed", 3, int(p_e.argmax()))
    assert a.confidence == pytest.approx(float(p_e.max()), abs=1e-5)


def test_conventional_falls_back_to_the_edge_exits(env: Env, dead_url: str) -> None:
    runner = _runner(env, dead_url, strategy="conventional", alpha=0.5, k=3)
    x = env.images[2]
    a = runner.classify_image(png(x))
    probs = _exit_probs(env, x)[:3]
    best = max(range(3), key=lambda i: (float(probs[i].max()), -i)) + 1
    assert (a.outcome, a.answered_at, a.exit, a.label) == (
        "offload_failed",
        "edge",
        best,
        int(probs[best - 1].argmax()),
    )
    assert "Connection refused" in a.detail and a.bytes_sent == len(png(x))


def test_no_cloud_configured(env: Env) -> None:
    runner = load_runner(env.root, strategy="ee", alpha=2.0, k=None)
    assert runner.k == 3 and runner.client is None
    a = runner.classify_uint8(env.images[0])
    assert (a.outcome, a.detail, a.bytes_sent, a.answered_at) == (
        "offload_failed",
        "no cloud configured",
        0,
        "edge",
    )


def test_timeout_is_retried_then_falls_back(env: Env) -> None:
    # A listening socket that never accepts: the kernel completes the handshake, no answer ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        runner = _runner(env, f"http://127.0.0.1:{s.getsockname()[1]}", alpha=2.0, retries=1, timeout=0.3)
        a = runner.classify_uint8(env.images[0])
    assert a.outcome == "offload_failed" and "Timeout" in a.detail and "2 attempts" in a.detail


def test_model_hash_mismatch_is_409_and_ends_as_offload_failed(env: Env) -> None:
    net, spec = load_checkpoint(env.root / "ee")
    other = replace(spec, content_hash="feedfacecafebeef")
    with CloudClient(env.cloud_url, retries=2, backoff=0.0) as client:
        runner = EdgeRunner(TorchRuntime(net, other), strategy="ee", alpha=2.0, k=2, client=client)
        a = runner.classify_uint8(env.images[0])
    assert a.outcome == "offload_failed" and a.answered_at == "edge"
    assert "HTTP 409" in a.detail and "model hash mismatch" in a.detail
    assert "feedfacecafebeef" in a.detail and spec.content_hash in a.detail


class Flaky:
    """A stand-in cloud that answers 503 (or another status) to the first `failures` requests, then a fixed answer
    (label 7, naming the run's models and echoing the request id, as the real cloud does)."""

    def __init__(self, failures: int, status: int = 503, hashes: tuple[str, str] = ("", "")) -> None:
        self.failures, self.status, self.hits = failures, status, 0
        self.app = fastapi.FastAPI()

        @self.app.post("/v1/offload")
        @self.app.post("/v1/classify")
        async def answer(request: fastapi.Request) -> fastapi.responses.JSONResponse:
            self.hits += 1
            if self.hits <= self.failures:
                return fastapi.responses.JSONResponse({"detail": f"flaky failure {self.hits}"}, self.status)
            offload = request.url.path == "/v1/offload"
            body = {
                "label": 7,
                "class_name": "7",
                "confidence": 0.75,
                "server_ms": 1.0,
                "request_id": request.headers["x-request-id"],
                "model_hash": hashes[0] if offload else hashes[1],
                "k": 3 if offload else 0,
            }
            return fastapi.responses.JSONResponse(body)


@pytest.mark.parametrize(
    ("failures", "status", "hits", "outcome", "detail"),
    [
        (0, 503, 1, "ok", None),
        (2, 503, 3, "ok", None),  # two retries absorb two failures
        (3, 503, 3, "offload_failed", "after 3 attempts (last: HTTP 503: flaky failure 3)"),
        (5, 500, 3, "offload_failed", "HTTP 500"),
        (5, 409, 1, "offload_failed", "HTTP 409: flaky failure 1"),  # a 4xx is not retried
        (5, 422, 1, "offload_failed", "HTTP 422"),
    ],
)
def test_retries_against_a_flaky_cloud(
    env: Env, failures: int, status: int, hits: int, outcome: str, detail: str | None
) -> None:
    hashes = (env.spec.content_hash, env.base.runtime.conventional_spec.content_hash)
    flaky = Flaky(failures, status, hashes)
    with start_server(flaky.app) as srv:
        for strategy in ("ee", "conventional"):
            flaky.hits = 0
            runner = _runner(env, srv.url, strategy=strategy, alpha=2.0, retries=2)
            a = runner.classify_image(png(env.images[0]))
            assert (flaky.hits, a.outcome) == (hits, outcome), strategy
            if outcome == "ok":
                assert (a.label, a.answered_at, a.exit, a.confidence) == (7, "cloud", 0, 0.75)
            else:
                assert detail in a.detail and a.answered_at == "edge"


def test_client_raises_offload_failed_with_the_servers_detail(env: Env) -> None:
    with CloudClient(env.cloud_url, retries=0) as client:
        with pytest.raises(OffloadFailed, match="HTTP 400: .*payload") as info:
            client.offload(b"junk", "r1")
        assert info.value.status == 400
        assert client.model_info()["accepted_k"] == [1, 2, 3]
    with pytest.raises(UserError, match="expected http"):
        CloudClient("localhost:8000")


def test_variant_shares_model_and_client(env: Env) -> None:
    base = load_runner(env.root, strategy="ee", alpha=0.5, cloud_url=env.cloud_url)
    v = base.variant(strategy="ensemble", alpha=0.9)
    assert v.runtime is base.runtime and v.client is base.client and v.costs is base.costs
    assert (v.strategy, v.alpha, base.strategy, base.alpha) == ("ensemble", 0.9, "ee", 0.5)
    conv = base.variant(strategy="conventional", alpha=float("nan"))
    a = conv.classify_image(png(env.images[1]))
    assert (a.answered_at, a.exit, a.outcome) == ("cloud", 0, "ok")
    assert a.macs == cost_table(load_checkpoint(env.root / "conventional")[0], 32).total_macs
    with pytest.raises(UserError, match="unknown strategy"):
        base.variant(strategy="nope", alpha=0.5)
    with pytest.raises(UserError, match="entropy"):
        base.variant(strategy="entropy", alpha=1.5)
    base.close()
    assert v.client.is_closed  # from_run made the client; closing the runner closes it


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 4}, "1..3"),
        ({"k": 0}, "1..3"),
        ({"precision": "fp8"}, "precision"),
        ({"alpha": float("nan")}, "alpha"),
        ({"strategy": "bogus"}, "unknown strategy"),
    ],
)
def test_runner_rejects_bad_settings(env: Env, kwargs: dict, match: str) -> None:
    args = {"strategy": "ee", "alpha": 0.5, "k": 3, "client": None, **kwargs}
    with pytest.raises(UserError, match=match):
        make_runner(TorchRuntime(env.net, env.spec, costs=env.costs), **args)


def test_conventional_needs_a_conventional_dnn(tmp_path: Path) -> None:
    build_tiny_run(tmp_path, conventional=False)
    with pytest.raises(UserError, match="conventional"):
        load_runner(tmp_path, strategy="conventional", alpha=0.5)


def test_classify_files(env: Env, tmp_path: Path) -> None:
    runner = _runner(env, env.cloud_url, alpha=0.5)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(png(env.images[i]))
    answers = classify_files(paths, runner)
    direct = [runner.classify_uint8(x) for x in env.images[:3]]
    assert [(a.label, a.exit) for a in answers] == [(d.label, d.exit) for d in direct]
    with pytest.raises(UserError, match="missing.png"):
        classify_files([tmp_path / "missing.png"], runner)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="notes.png: cannot decode"):
        classify_files([tmp_path / "notes.png"], runner)


# --- the edge server -----------------------------------------------------------------------------------------


def test_edge_server_keeps_serving_when_the_cloud_is_down(env: Env, dead_url: str) -> None:
    runner = _runner(env, dead_url, alpha=2.0)
    with start_server(create_edge_app(runner)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for x in env.images[:3]:
            r = c.post("/v1/classify", content=png(x), headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["outcome"] == "offload_failed" and body["answered_at"] == "edge"
            assert "Connection refused" in body["detail"]
        assert c.get("/healthz").json() == {"status": "ok", "breaker": "closed"}  # 3 failures: under 5


def test_edge_server_answers_like_the_runner(env: Env) -> None:
    runner = _runner(env, env.cloud_url, alpha=0.5)
    with start_server(create_edge_app(runner)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        cfg = c.get("/v1/config").json()
        assert (cfg["strategy"], cfg["alpha"], cfg["k"], cfg["cloud_url"]) == ("ee", 0.5, 3, env.cloud_url)
        for x in env.images[:4]:
            got = c.post("/v1/classify", content=png(x), headers={"Content-Type": "image/png"}).json()
            want = runner.classify_uint8(x)
            assert (got["label"], got["exit"], got["macs"], got["outcome"]) == (
                want.label,
                want.exit,
                want.macs,
                "ok",
            )
        doc = c.get("/openapi.json").json()
        assert set(doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]) == {
            "image/png",
            "image/jpeg",
        }


@pytest.mark.parametrize(
    ("headers", "body", "status", "text"),
    [
        ({"Content-Type": "image/png"}, b"garbage", 400, "cannot decode"),
        ({"Content-Type": "image/png"}, "TRUNCATED", 400, "cannot decode"),
        ({"Content-Type": "text/plain"}, "PNG", 415, "image/png or image/jpeg"),
        ({"Content-Type": "image/png"}, "GIF", 415, "GIF"),
        ({"Content-Type": "image/png"}, bytes(5000), 413, "4096"),
        ({"Content-Type": "image/png", "Authorization": "Bearer nope"}, "PNG", 401, "bearer token"),
        ({"Content-Type": "image/png"}, "NOAUTH", 401, "bearer token"),
    ],
)
def test_edge_server_hardened_input(
    env: Env, dead_url: str, headers: dict, body: bytes | str, status: int, text: str
) -> None:
    x = env.images[0]
    data = {"PNG": png(x), "NOAUTH": png(x), "GIF": png(x, "GIF"), "TRUNCATED": png(x)[:70]}.get(body, body)  # type: ignore[call-overload]
    runner = _runner(env, dead_url, alpha=0.0)  # alpha 0: every answer at exit 1, no cloud needed
    auth = {} if "Authorization" in headers or body == "NOAUTH" else {"Authorization": f"Bearer {TOKEN}"}
    app = create_edge_app(runner, token=TOKEN, max_body_bytes=4096)
    with start_server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/classify", content=data, headers={**headers, **auth})
        assert r.status_code == status, r.text
        assert text in r.json()["detail"]
        assert c.get("/healthz").status_code == 200  # open without a token
        ok = c.post(
            "/v1/classify",
            content=png(x),
            headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 200 and ok.json()["exit"] == 1


def test_ensemble_needs_a_weight_per_branch(env: Env) -> None:
    spec = replace(env.spec, ensemble_weights=[1.0])
    with pytest.raises(UserError, match="3 ensemble weights"):
        EdgeRunner(TorchRuntime(env.net, spec, costs=env.costs), strategy="ensemble", alpha=0.5, k=3)
    runner = EdgeRunner(TorchRuntime(env.net, spec, costs=env.costs), strategy="ensemble", alpha=0.5, k=1)
    a = runner.classify_uint8(env.images[0])
    assert (a.exit, a.answered_at) == (1, "edge")  # confident at branch 1, or the no-cloud fallback there


def test_unencodable_tensor_falls_back(env: Env) -> None:
    # An fp16 wire cannot carry values beyond 65504: the payload is refused at the edge, the answer stands.
    net, spec = load_checkpoint(env.root / "ee")
    with torch.no_grad():
        net.stages[2][-1].conv[-1].bias.fill_(1e6)  # the last BatchNorm of stage 3: a huge split tensor
    runner = EdgeRunner(
        TorchRuntime(net, spec, costs=env.costs),
        strategy="ee",
        alpha=2.0,
        k=3,
        client=CloudClient(env.cloud_url),
        precision="fp16",
    )
    a = runner.classify_uint8(env.images[0])
    assert (a.outcome, a.answered_at, a.bytes_sent) == ("offload_failed", "edge", 0)
    assert "fp16 range" in a.detail
