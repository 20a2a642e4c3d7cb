"""Serving subcommands: serve-cloud, serve-edge, classify, link, probe-link."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeexit.cli.common import add_choice, add_runtime_flag, add_threads_flag, command, probability
from edgeexit.config import LinkConfig
from edgeexit.serving.batcher import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS
from edgeexit.serving.limits import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY
from edgeexit.threads import SERVER_THREADS

# The default backend of the servers and the edge runner is the one that measured fastest for them
# (BENCHMARKS.md: ONNX Runtime, 2.6-4.8x torch); they compute with SERVER_THREADS threads per process.
SERVING_RUNTIME = "onnx"


def _add_serving_runtime(p: argparse.ArgumentParser) -> None:
    add_runtime_flag(
        p,
        default=SERVING_RUNTIME,
        help=f"model runtime (default: {SERVING_RUNTIME}; a run never exported is exported first)",
    )
    add_threads_flag(p, default=SERVER_THREADS)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help=f"requests in progress at once (per worker); more are answered 503 with Retry-After (default: "
        f"{DEFAULT_MAX_CONCURRENCY}; /healthz and /metrics are always answered)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="S",
        help=f"close a connection that has sent no complete request head S seconds after it opened or after "
        f"its last answer (default: {DEFAULT_IDLE_TIMEOUT_S:g})",
    )


def _check_limits(args: argparse.Namespace) -> None:
    from edgeexit.serving.limits import check_idle_timeout, check_max_concurrency

    check_max_concurrency(args.max_concurrency)
    check_idle_timeout(args.idle_timeout)


def _prepare_runtime(run_dir: str, runtime: str, host: str | None = None, port: int | None = None) -> None:
    """Runtime onnx on a run never exported: export it now (RUN_DIR/onnx), once the server's port is known to be
    free. An export that no longer matches the run (retrained, recalibrated) is not replaced behind the user's
    back: loading it says how to redo it."""
    if port is not None:
        from edgeexit.serving.server import check_port_free

        check_port_free(host or "127.0.0.1", port)
    if runtime != "onnx":
        return
    from edgeexit.onnx_export import export_dir, export_onnx
    from edgeexit.rundir import RunDir

    if not export_dir(RunDir(Path(run_dir)).root).exists():
        print(f"edgeexit: exporting {run_dir} to ONNX for runtime onnx (RUN_DIR/onnx)", flush=True)
        export_onnx(Path(run_dir))


@command("serve-cloud")
def run_serve_cloud(args: argparse.Namespace) -> None:
    from edgeexit.errors import UserError
    from edgeexit.serving.batcher import check_batching
    from edgeexit.threads import check_threads

    check_threads(args.threads)
    check_batching(args.max_batch, args.max_wait_ms)
    _check_limits(args)
    app_options = dict(
        token=args.token,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        runtime=args.runtime,
        max_concurrency=args.max_concurrency,
    )
    if args.engine == "ray":
        if args.workers is not None:
            raise UserError("--workers is for --engine uvicorn; with --engine ray use --replicas N")
        from edgeexit.serving.ray_engine import check_ray_options, serve_ray_cloud

        replicas = 1 if args.replicas is None else args.replicas
        check_ray_options(replicas, args.address)  # before a run is exported, and without Ray: one line
        # On a cluster the proxy binds on the cluster's nodes, not necessarily here: no local port check.
        _prepare_runtime(args.run_dir, args.runtime, args.host, None if args.address else args.port)
        serve_ray_cloud(
            Path(args.run_dir),
            replicas=replicas,
            address=args.address,
            host=args.host,
            port=args.port,
            threads=args.threads,
            idle_timeout=args.idle_timeout,
            **app_options,
        )
        return
    for flag, value in (("--replicas", args.replicas), ("--address", args.address)):
        if value is not None:
            raise UserError(f"{flag} is for --engine ray (Ray Serve); the uvicorn engine takes --workers N")
    from edgeexit.serving.cloud_app import serve_cloud

    _prepare_runtime(args.run_dir, args.runtime, args.host, args.port)
    serve_cloud(
        Path(args.run_dir),
        host=args.host,
        port=args.port,
        workers=1 if args.workers is None else args.workers,
        threads=args.threads,
        idle_timeout=args.idle_timeout,
        **app_options,
    )


def add_serve_cloud(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-cloud", help="the cloud server: finishes offloaded inferences, classifies images"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="uvicorn: this machine, --workers processes (default); ray: Ray Serve replicas, on a cluster with "
        "--address (needs pip install 'edgeexit[ray]')",
    )
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="uvicorn worker processes (default: 1)"
    )
    p.add_argument(
        "--replicas", type=int, default=None, metavar="N", help="--engine ray: Serve replicas (default: 1)"
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="--engine ray: join this Ray cluster ('auto', HOST:6379 or ray://HOST:10001); default: start a "
        "local Ray instance",
    )
    p.add_argument("--token", default=None, help="require this bearer token (or set EDGEEXIT_TOKEN)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body accepted (MiB)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"most samples the server runs as one forward, gathered from concurrent requests (default: "
        f"{DEFAULT_MAX_BATCH}; 1 turns batching off)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        metavar="T",
        help="longest a request waits for others to join its batch, in ms (default: adaptive, no wait for a "
        "lone client; 0: never wait); see edgeexit.serving.batcher",
    )
    _add_limit_flags(p)
    _add_serving_runtime(p)


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    add_choice(p, "--strategy", default="ee", names="strategy", help="exit strategy (default: ee)")
    p.add_argument(
        "--alpha", type=probability, default=0.8, help="confidence threshold in [0, 1] (default: 0.8)"
    )
    p.add_argument("--k", type=int, default=None, help="edge branches (default: all of the model's)")
    add_choice(p, "--precision", default="fp32", names="precision", help="offload wire precision")
    p.add_argument("--cloud-token", default=None, help="bearer token for the cloud server")


def _positive(text: str) -> float:
    """argparse type of a duration: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _count(text: str) -> int:
    """argparse type of a count: an integer >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _add_offload_flags(p: argparse.ArgumentParser) -> None:
    """The edge's guards against a slow or failing cloud; defaults: the [link] section's (edgeexit.config)."""
    link = LinkConfig.model_fields
    deadline = link["offload_deadline_ms"].default
    failures = link["breaker_failures"].default
    cooldown = link["breaker_cooldown_s"].default
    p.add_argument(
        "--offload-deadline-ms",
        type=_positive,
        default=deadline,
        metavar="T",
        help=f"one offload's whole time, connecting, retries and reading included; past it the edge answers "
        f"from its most confident exit (default: {deadline:g})",
    )
    p.add_argument(
        "--breaker-failures",
        type=_count,
        default=failures,
        metavar="N",
        help=f"consecutive failed offloads after which the edge stops offloading for a cool-down (default: "
        f"{failures}; 0: never)",
    )
    p.add_argument(
        "--breaker-cooldown-s",
        type=_positive,
        default=cooldown,
        metavar="S",
        help=f"seconds the edge answers without the cloud before one probe offload (default: {cooldown:g})",
    )


def _offload_kwargs(args: argparse.Namespace) -> dict[str, float | int]:
    return {
        "deadline": args.offload_deadline_ms / 1e3,
        "breaker_failures": args.breaker_failures,
        "breaker_cooldown": args.breaker_cooldown_s,
    }


@command("serve-edge")
def run_serve_edge(args: argparse.Namespace) -> None:
    from edgeexit.serving.edge_app import serve_edge
    from edgeexit.threads import check_threads

    check_threads(args.threads)
    _check_limits(args)
    _prepare_runtime(args.run_dir, args.runtime, args.host, args.port)
    serve_edge(
        Path(args.run_dir),
        cloud_url=args.cloud,
        strategy=args.strategy,
        alpha=args.alpha,
        k=args.k,
        precision=args.precision,
        host=args.host,
        port=args.port,
        token=args.token,
        cloud_token=args.cloud_token,
        runtime=args.runtime,
        threads=args.threads,
        max_concurrency=args.max_concurrency,
        idle_timeout=args.idle_timeout,
        **_offload_kwargs(args),
    )


def add_serve_edge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-edge", help="the edge server: classifies images, offloads the hard ones")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--cloud", required=True, help="cloud server URL, e.g. http://10.0.0.2:8000")
    _add_policy_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--token", default=None, help="require this bearer token from clients")
    _add_limit_flags(p)
    _add_offload_flags(p)
    _add_serving_runtime(p)


@command("classify")
def run_classify(args: argparse.Namespace) -> None:
    from edgeexit.serving.edge_runner import classify_files, load_runner
    from edgeexit.threads import set_threads

    set_threads(args.threads)
    _prepare_runtime(args.run, args.runtime)
    runner = load_runner(
        Path(args.run),
        strategy=args.strategy,
        alpha=args.alpha,
        k=args.k,
        cloud_url=args.cloud,
        precision=args.precision,
        token=args.cloud_token,
        runtime=args.runtime,
        **_offload_kwargs(args),
    )
    for path, answer in zip(args.images, classify_files([Path(p) for p in args.images], runner), strict=True):
        if args.json:
            print(json.dumps({"image": path, **answer.model_dump()}))
        else:
            where = f"exit {answer.exit}" if answer.answered_at == "edge" else "cloud"
            note = "" if answer.outcome == "ok" else f"  [{answer.outcome}: {answer.detail}]"
            print(
                f"{path}: {answer.class_name} ({answer.confidence:.3f}) at {where}, "
                f"{answer.time_ms:.1f} ms, {answer.macs / 1e6:.2f} MMACs, {answer.bytes_sent} B sent{note}"
            )


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify image files at the edge, offloading to a cloud server")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--run", required=True, help="run directory with the trained, calibrated model")
    p.add_argument(
        "--cloud", default=None, help="cloud server URL (without one, offloads fall back to the edge)"
    )
    _add_policy_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    _add_offload_flags(p)
    _add_serving_runtime(p)


@command("link")
def run_link(args: argparse.Namespace) -> None:
    import time

    from edgeexit.serving.link import LinkSpec, run_link_in_thread

    spec = LinkSpec.parse(args.rtt, args.bandwidth)
    handle = run_link_in_thread(args.listen, args.to, spec)
    print(
        f"link emulator: {args.listen} (port {handle.port}) -> {args.to}, RTT {spec.rtt_ms} ms, "
        f"{spec.bandwidth_mbit} Mbit/s each way; Ctrl-C to stop",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    finally:
        handle.close()


def add_link(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("link", help="a TCP proxy that emulates a link (delay and bandwidth each way)")
    p.add_argument("--listen", required=True, help="address to listen on, e.g. 127.0.0.1:9000")
    p.add_argument("--to", required=True, help="address to forward to, e.g. 127.0.0.1:8000")
    p.add_argument("--rtt", default="11.91ms", help="round-trip time added (default: 11.91ms, the paper's)")
    p.add_argument("--bandwidth", default="93.9mbit", help="rate each way (default: 93.9mbit, the paper's)")


@command("probe-link")
def run_probe_link(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from edgeexit.serving.probe import probe_link

    m = probe_link(args.url, pings=args.pings, transfers=args.transfers, transfer_bytes=args.bytes)
    if args.json:
        print(json.dumps(asdict(m)))
    else:
        print(
            f"RTT {m.rtt_ms_mean:.2f} ms (sd {m.rtt_ms_sd:.2f}); up {m.up_mbit_mean:.1f} Mbit/s "
            f"(sd {m.up_mbit_sd:.1f}); down {m.down_mbit_mean:.1f} Mbit/s (sd {m.down_mbit_sd:.1f})"
        )


def add_probe_link(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-link", help="measure RTT and throughput to a cloud server (like ping + iPerf3)")
    p.add_argument("url", metavar="URL")
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--transfers", type=int, default=5)
    p.add_argument("--bytes", type=int, default=2_000_000, help="bytes per throughput transfer")
    p.add_argument("--json", action="store_true")
