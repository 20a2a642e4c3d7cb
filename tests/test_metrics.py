"""GET /metrics of the cloud and edge servers, live on 127.0.0.1: behind the token, requests by route template
and status, latency buckets, the cloud's rows per forward, the edge's answers by outcome, readings from
callables, and one registry per app."""

from __future__ import annotations

import collections
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tinyrun import png, tiny_images

from edgeexit.config import RunConfig
from edgeexit.model import load_checkpoint
from edgeexit.serving import wire
from edgeexit.serving.cloud_app import create_cloud_app
from edgeexit.serving.cloud_runner import CloudRunner
from edgeexit.serving.edge_app import create_edge_app
from edgeexit.serving.edge_runner import load_runner, make_runner
from edgeexit.serving.http import new_app
from edgeexit.serving.metrics import LATENCY_BUCKETS
from edgeexit.serving.server import start_server

pytestmark = pytest.mark.slow  # starts real servers

TOKEN = "metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTETS = {"Content-Type": "application/octet-stream", **AUTH}


Samples = dict[tuple[str, frozenset], float]


def scrape(c: httpx.Client, headers: dict[str, str] | None = None) -> Samples:
    """{(sample name, labels): value} of GET /metrics, parsed by prometheus_client's parser."""
    r = c.get("/metrics", headers=headers if headers is not None else AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def models(tiny_run: tuple[Path, RunConfig]) -> CloudRunner:
    return CloudRunner.load(tiny_run[0])


@pytest.fixture(scope="module")
def payloads(tiny_run: tuple[Path, RunConfig]) -> dict[int, bytes]:
    """Offload bodies at k=1 of 1 and of 3 test images."""
    root, cfg = tiny_run
    net, spec = load_checkpoint(root / "ee")
    _, images = tiny_images(root, cfg, 3)
    out = {}
    for b in (1, 3):
        with torch.no_grad():
            _, h = net.edge_part(spec.preprocessing.normalize(images[:b]), 1)
        out[b] = wire.encode_payload(h, model_hash=spec.content_hash, k=1, request_id=f"m{b}")
    return out


@pytest.fixture(scope="module")
def cloud(models: CloudRunner) -> Iterator[httpx.Client]:
    with (
        start_server(create_cloud_app(Path("unused"), models=models, token=TOKEN)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        yield c


def test_metrics_needs_the_token_and_healthz_stays_open(cloud: httpx.Client) -> None:
    r = cloud.get("/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["detail"]
    assert cloud.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert cloud.get("/healthz").status_code == 200
    assert ("process_open_fds", frozenset()) in scrape(cloud)


def test_cloud_counts_requests_by_route_and_rows_per_forward(
    cloud: httpx.Client, payloads: dict[int, bytes]
) -> None:
    before = scrape(cloud)
    for b in (1, 1, 3):
        r = cloud.post("/v1/offload", content=payloads[b], headers=OCTETS)
        assert r.status_code == 200 and r.json()["batch"] == b
    assert cloud.post("/v1/offload", content=payloads[1]).status_code == 401  # no token
    for i in range(3):  # unknown paths: one series however many there are
        assert cloud.get(f"/nope/{i}", headers=AUTH).status_code == 404
    after = scrape(cloud)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "edgeexit_http_requests_total"
    assert delta(requests, route="/v1/offload", method="POST", status="200") == 3
    assert delta(requests, route="/v1/offload", method="POST", status="401") == 1  # answered before routing
    assert delta(requests, route="unmatched", method="GET", status="404") == 3
    assert not [labels for _, labels in after if any("/nope" in v for _, v in labels)]
    # Latency: every request of the route, in buckets from 0.1 ms to 10 s.
    assert delta("edgeexit_http_request_duration_seconds_count", route="/v1/offload") == 4
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in after
        if name == "edgeexit_http_request_duration_seconds_bucket" and ("route", "/v1/offload") in labels
    )
    assert les == [*LATENCY_BUCKETS, float("inf")]
    assert delta("edgeexit_http_request_duration_seconds_bucket", route="/v1/offload", le="+Inf") == 4
    # Rows per forward: three forwards (the requests came one after another) of 1, 1 and 3 rows.
    assert delta("edgeexit_cloud_batch_rows_count", kind="offload") == 3
    assert delta("edgeexit_cloud_batch_rows_sum", kind="offload") == 5
    assert delta("edgeexit_cloud_batch_rows_bucket", kind="offload", le="2.0") == 2
    assert value(after, "edgeexit_http_requests_in_progress") == 1  # the scrape itself


def test_each_app_has_its_own_registry(models: CloudRunner) -> None:
    with (
        start_server(create_cloud_app(Path("unused"), models=models)) as a,
        start_server(create_cloud_app(Path("unused"), models=models)) as b,
        httpx.Client(base_url=a.url, timeout=30) as ca,
        httpx.Client(base_url=b.url, timeout=30) as cb,
    ):
        for _ in range(3):
            assert ca.get("/healthz").status_code == 200
        healthz = {"route": "/healthz", "method": "GET", "status": "200"}
        assert value(scrape(ca, {}), "edgeexit_http_requests_total", **healthz) == 3
        assert value(scrape(cb, {}), "edgeexit_http_requests_total", **healthz) == 0


@pytest.fixture(scope="module")
def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_edge_counts_answers_by_outcome(tiny_run: tuple[Path, RunConfig], dead_url: str) -> None:
    root, cfg = tiny_run
    _, images = tiny_images(root, cfg, 3)
    offloads = load_runner(root, strategy="ee", alpha=2.0, cloud_url=dead_url, retries=0)  # never confident
    at_edge = make_runner(offloads.runtime, strategy="ee", alpha=0.0)  # always confident at exit 1
    try:
        for runner, outcome, n in ((offloads, "offload_failed", 3), (at_edge, "ok", 2)):
            app = create_edge_app(runner, token=TOKEN)
            with start_server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
                assert c.get("/metrics").status_code == 401
                for x in images[:n]:
                    r = c.post("/v1/classify", content=png(x), headers={"Content-Type": "image/png", **AUTH})
                    assert r.status_code == 200 and r.json()["outcome"] == outcome
                samples = scrape(c)
            answers = "edgeexit_edge_answers_total"
            assert value(samples, answers, outcome=outcome, answered_at="edge") == n
            assert sum(v for (name, _), v in samples.items() if name == answers) == n
            route = {"route": "/v1/classify", "method": "POST", "status": "200"}
            assert value(samples, "edgeexit_http_requests_total", **route) == n
            if runner is offloads:  # the runner's own counts and its breaker, read at scrape time
                assert value(samples, "edgeexit_edge_offloads_total", reason="connect") == n
                breaker = [value(samples, "edgeexit_edge_breaker_state", state=s) for s in ("closed", "open")]
                assert breaker == [1.0, 0.0]  # n = 3 failures, under the 5 that open it
    finally:
        offloads.close()


def test_readings_are_read_at_each_scrape() -> None:
    app, api = new_app("readings", None, None)
    app.include_router(api)
    outcomes: collections.Counter[str] = collections.Counter(ok=3)
    state = ["closed"]
    readings = app.state.metrics.readings
    readings.counter("edgeexit_test_offload_outcomes", "offloads by outcome", "reason", lambda: outcomes)
    readings.state(
        "edgeexit_test_breaker", "breaker", lambda: state[0], states=("closed", "open", "half_open")
    )
    readings.gauge("edgeexit_test_broken", "a reading that fails", lambda: 1 / 0)
    with start_server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        first = scrape(c, {})
        outcomes.update(ok=1, timeout=2)
        state[0] = "open"
        second = scrape(c, {})
    assert value(first, "edgeexit_test_offload_outcomes_total", reason="ok") == 3
    assert value(second, "edgeexit_test_offload_outcomes_total", reason="ok") == 4
    assert value(second, "edgeexit_test_offload_outcomes_total", reason="timeout") == 2
    assert [value(first, "edgeexit_test_breaker", state=s) for s in ("closed", "open", "half_open")] == [
        1,
        0,
        0,
    ]
    assert [value(second, "edgeexit_test_breaker", state=s) for s in ("closed", "open", "half_open")] == [
        0,
        1,
        0,
    ]
    assert not [name for name, _ in second if name.startswith("edgeexit_test_broken")]
    assert ("process_open_fds", frozenset()) in second  # the other collectors still answer
