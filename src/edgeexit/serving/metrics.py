"""GET /metrics in Prometheus' text format: per app, requests by route template and status, their latency,
the requests in flight, the process's CPU, memory and file descriptors, and whatever the app adds.

Each app has its own `CollectorRegistry` (never prometheus_client's global one): tests build many apps in one
process, and each server's numbers are its own. With `--workers N` every worker process has its own registry,
so a scrape shows the counts of the one worker that answered it (process_start_time_seconds tells them apart).

`ServerMetrics.readings` takes callables read at scrape time, for numbers another component already keeps: e.g.

    metrics.readings.counter("edgeexit_edge_offload_outcomes", "offloads by outcome", "reason",
                             lambda: runner.offload_outcomes)
    metrics.readings.state("edgeexit_edge_breaker_state", "the cloud circuit breaker", runner.breaker_state,
                           states=("closed", "open", "half_open"))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_BUCKETS",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "MetricsMiddleware",
    "Readings",
    "ServerMetrics",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# 0.1 ms (a /healthz answer) to 10 s (a client's timeout), about three buckets per decade.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNMATCHED = "unmatched"  # the route label of paths no route serves: unknown paths never add a series
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Readings(Collector):
    """Metrics read at scrape time from callables; a callable that raises is logged and left out."""

    def __init__(self) -> None:
        self._readers: list[Callable[[], Metric]] = []

    def counter(self, name: str, doc: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        """A counter with one label: `read()` maps label values to counts (e.g. a collections.Counter)."""

        def reading() -> Metric:
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, count in sorted(read().items()):
                family.add_metric([str(value)], float(count))
            return family

        self._readers.append(reading)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge without labels: `read()` is its value."""
        self._readers.append(lambda: GaugeMetricFamily(name, doc, value=float(read())))

    def state(self, name: str, doc: str, read: Callable[[], str], states: Sequence[str]) -> None:
        """One of several states, as a gauge per state (1 for the current one, 0 for the others)."""

        def reading() -> Metric:
            current = str(read())
            family = GaugeMetricFamily(name, doc, labels=["state"])
            for s in (*states, *([] if current in states else [current])):
                family.add_metric([s], 1.0 if s == current else 0.0)
            return family

        self._readers.append(reading)

    def collect(self) -> Iterable[Metric]:
        for reading in self._readers:
            try:
                yield reading()
            except Exception as exc:  # one broken reading must not hide the others
                log.warning("metric reading failed: %r", exc)


class ServerMetrics:
    """One app's metrics: its registry, the request counter and latency histogram, and `readings`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "edgeexit_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgeexit_http_request_duration_seconds",
            "time from a request's head to its answer's end, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.readings = Readings()
        self.registry.register(self.readings)
        self.in_progress = 0  # HTTP requests in progress, kept by MetricsMiddleware
        self.readings.gauge(
            "edgeexit_http_requests_in_progress", "HTTP requests in progress", lambda: self.in_progress
        )
        # labels() takes a lock and builds a key each time: the children are cached by label values instead.
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._times: dict[str, Any] = {}

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Counter:
        """A new counter in this app's registry."""
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        """A new histogram in this app's registry."""
        return Histogram(name, doc, list(labels), buckets=tuple(buckets), registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (route, method, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.requests.labels(route, method, str(status))
        count.inc()
        timer = self._times.get(route)
        if timer is None:
            timer = self._times[route] = self.latency.labels(route)
        timer.observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)


def route_of(scope: dict[str, Any], known_paths: Callable[[], Collection[str]]) -> str:
    """The template of the route that served the request, e.g. /v1/offload; for a request answered before
    routing (401, 503), its path if it is one of `known_paths()`; else UNMATCHED."""
    path = getattr(scope.get("route"), "path", None)  # the router sets "route" on the requests it routes
    if path:
        return path
    return scope["path"] if scope["path"] in known_paths() else UNMATCHED


class MetricsMiddleware:
    """Pure ASGI middleware: counts each HTTP request by route template, method and status, and times it.

    The outermost of the app's middlewares, so 401s and 503s are counted too; a request that raised counts
    as 500. Costs a few microseconds a request (BENCHMARKS.md, request path).
    """

    def __init__(self, app: Any, metrics: ServerMetrics, known_paths: Callable[[], Collection[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_progress -= 1
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.observe(route_of(scope, self.known_paths), method, status, time.perf_counter() - t0)
