"""The cloud server on Ray Serve (`edgeexit serve-cloud RUN_DIR --engine ray`): the app of the uvicorn engine,
`cloud_app.create_cloud_app`, served by N replicas that Ray may place on several machines.

Each replica is a Ray actor that sets its threads, loads the models and builds its own app (routes, auth,
limits, batcher, whatever middleware `create_cloud_app` installs) through Serve's late-bound ASGI ingress
(`__serve_build_asgi_app__`). The app and its batcher live in the replica's event loop, so the requests that
reach one replica share forward passes as they do under uvicorn. Serve's HTTP proxy (one per node with a
replica) takes the requests on host:port and spreads them over the replicas; every answer names the replica
that made it in the `x-edgeexit-replica` header.

Without an address a local Ray instance starts in this process and stops with it. An address ("auto",
"HOST:6379" or "ray://HOST:10001") joins a running cluster (`ray start --head`, then `ray start
--address=HEAD:6379` on the others), where every node needs edgeexit installed and the run directory at the
same path. Ray is an optional extra (`pip install 'edgeexit[ray]'`), imported only here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from edgeexit.errors import UserError
from edgeexit.serving.limits import DEFAULT_IDLE_TIMEOUT_S, check_idle_timeout
from edgeexit.threads import SERVER_THREADS, check_threads

__all__ = ["REPLICA_HEADER", "RayCloud", "check_ray_options", "serve_ray_cloud", "start_ray_cloud"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-edgeexit-replica"
APP_NAME = "edgeexit-cloud"
CONNECT_TIMEOUT_S = 5  # an unreachable --address fails within about this, not Ray's 20 s of retries
_INSTALL_HINT = (
    "engine 'ray' needs Ray Serve, which is not installed; install it with: pip install 'edgeexit[ray]'"
)
# Serve logs every request at INFO in each replica (forwarded to the driver's terminal): warnings only.
_QUIET = {"log_level": "WARNING", "enable_access_log": False}


def _import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), or a one-line UserError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError(_INSTALL_HINT) from None
    return ray, serve


class ReplicaHeader:
    """ASGI middleware: adds `x-edgeexit-replica: <replica id>` to every HTTP response, errors included."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_tagged)


class CloudReplica:
    """One Serve replica of the cloud app. Serve calls `__serve_build_asgi_app__` after the constructor, in the
    replica's event loop, and serves the app it returns."""

    def __init__(self, run_dir: str, app_options: dict[str, Any], threads: int) -> None:
        from edgeexit.threads import set_threads

        set_threads(threads)
        self.run_dir = Path(run_dir)
        self.app_options = app_options

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from edgeexit.serving.cloud_app import create_cloud_app

        app = create_cloud_app(self.run_dir, **self.app_options)
        replica = serve.get_replica_context().replica_tag
        app.state.replica = replica
        from prometheus_client import Info

        registry = app.state.metrics.registry  # serving.metrics.ServerMetrics: this replica's /metrics
        Info("edgeexit_replica", "the Ray Serve replica that answers", registry=registry).info(
            {"replica": replica}
        )
        app.add_middleware(ReplicaHeader, replica=replica)  # added last, so outermost: 401s carry it too
        return app


def _check_address(address: str) -> None:
    """A UserError within CONNECT_TIMEOUT_S when `address` is malformed or nothing answers at its HOST:PORT
    ("auto" is left to Ray, which fails at once when no cluster runs here)."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(
            f"Ray address {address!r}; expected 'auto', HOST:PORT (the head's GCS, port 6379) or "
            "ray://HOST:PORT (Ray Client, port 10001)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); start it with 'ray start "
            "--head' on that machine, or fix --address (without it a local Ray instance starts)"
        ) from None


def check_ray_options(replicas: object, address: str | None) -> None:
    """A one-line UserError for a replica count below 1, Ray not installed, or a malformed or unreachable
    address: what `start_ray_cloud` checks first, for the CLI to check before it exports a run."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise UserError(f"replicas must be an integer >= 1, got {replicas!r}")
    _import_ray()
    if address is not None:
        _check_address(address)


def _keep_sigterm_in_python(before: Any) -> None:
    """After `ray.init`: Ray's core worker catches SIGTERM in C++ and aborts the process, which leaves the local
    instance's agents running; a Python handler again (the one from before, else Ray's own `sys.exit`) makes
    SIGTERM unwind like Ctrl-C, through `RayCloud.stop`."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


def _connect(ray: Any, address: str | None, cpus: int, temp_dir: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray instance with `cpus` CPUs; True if we started it."""
    if ray.is_initialized():  # this process called ray.init itself: deploy there, leave Ray running
        return False
    before = signal.getsignal(signal.SIGTERM)
    try:
        return _init(ray, address, cpus, temp_dir)
    finally:
        if ray.is_initialized():
            _keep_sigterm_in_python(before)


def _init(ray: Any, address: str | None, cpus: int, temp_dir: str | None) -> bool:
    if address is None:
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            **({"_temp_dir": temp_dir} if temp_dir is not None else {}),
        )
        return True
    # Ray retries a GCS that does not answer for about 20 s (a head restarting); a server command should say
    # soon that the address is wrong. Set for this call only (a local instance started later in this process
    # waits for its own GCS with the same setting); the user's own setting wins.
    wait_var = "RAY_gcs_server_port_wait_time_s"
    given = os.environ.get(wait_var)
    os.environ.setdefault(wait_var, str(CONNECT_TIMEOUT_S))
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot join the Ray cluster at {address!r} ({first[:120]}); check that it runs ('ray start "
            "--head') and, for a cluster with token authentication (Ray's default), set RAY_AUTH_MODE=token "
            "and its token here (RAY_AUTH_TOKEN, from 'ray get-auth-token' on the head)"
        ) from None
    finally:
        if given is None:
            os.environ.pop(wait_var, None)
    return False


def _free_port(host: str) -> int:
    """A port free on `host` now: Serve's proxy binds its port itself, it cannot be handed a bound socket."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RayCloud:
    """The cloud app deployed on Ray Serve: `.url`, `.replicas`, `.stop()`, and a context manager."""

    def __init__(
        self, host: str, port: int, replicas: int, *, owns_ray: bool, disconnect: bool, temp_dir: str | None
    ) -> None:
        self.host, self.port, self.replicas = host, port, replicas
        self._owns_ray = owns_ray  # a local instance we started: Serve and Ray stop with us
        self._disconnect = disconnect  # we called ray.init: ray.shutdown() on stop
        self._temp_dir = temp_dir

    @property
    def url(self) -> str:
        """Base URL of Serve's HTTP proxy, e.g. http://127.0.0.1:54321."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Delete the app and disconnect; a local Ray instance we started stops with Serve, and a cluster's
        Serve is shut down too when no other application is left on it."""
        ray, serve = _import_ray()
        if not ray.is_initialized():
            return
        try:
            if self._owns_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
                if not serve.status().applications:
                    serve.shutdown()
        finally:
            if self._disconnect:
                ray.shutdown()
            if self._temp_dir is not None and self._owns_ray:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ray_cloud(
    run_dir: Path | str,
    *,
    replicas: int = 1,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int = SERVER_THREADS,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    temp_dir: str | None = None,
    **app_options: Any,
) -> RayCloud:
    """Deploy the cloud app for RUN_DIR on Ray Serve with `replicas` replicas; returns once all of them answer.

    `address` None starts a local Ray instance (its files in `temp_dir`, removed on stop; default Ray's
    /tmp/ray), else joins that cluster. `port` 0 picks a free one. Each replica reserves `threads` CPUs and
    computes with that many threads. `idle_timeout` is the keep-alive timeout of Serve's HTTP proxy (rounded up
    to whole seconds). `app_options` go to `create_cloud_app` (token, max_body_bytes, max_batch, max_wait_ms,
    runtime, max_concurrency: per replica). The handle's `.stop()` undeploys; it is a context manager.
    """
    check_ray_options(replicas, address)
    check_threads(threads)
    keep_alive_s = math.ceil(check_idle_timeout(idle_timeout))  # Serve takes whole seconds
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port must be in 0..65535, got {port!r}")
    ray, serve = _import_ray()
    from edgeexit.model.checkpoint import load_spec
    from edgeexit.rundir import RunDir

    run_dir = Path(run_dir).resolve()
    load_spec(RunDir(run_dir).ee)  # a bad run directory fails here, once, rather than in every replica
    port = port or _free_port(host)
    was_connected = ray.is_initialized()
    owns_ray = _connect(ray, address, max(os.cpu_count() or 1, replicas * threads), temp_dir)
    handle = RayCloud(
        host, port, replicas, owns_ray=owns_ray, disconnect=not was_connected, temp_dir=temp_dir
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not one INFO line per step of the deployment
    try:
        serve.start(
            http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive_s},
            logging_config=_QUIET,
        )
        deployment = serve.deployment(
            serve.ingress()(CloudReplica),
            name="cloud",
            num_replicas=replicas,
            ray_actor_options={
                "num_cpus": threads,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
            },
            # Serve's default (5 requests in a replica at once) would cap the batches the batcher can form.
            max_ongoing_requests=max(8, 2 * app_options.get("max_batch", 64)),
            logging_config=_QUIET,
        )
        t0 = time.perf_counter()
        serve.run(
            deployment.bind(str(run_dir), app_options, threads),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        log.info("%d Ray Serve replicas ready in %.1f s", replicas, time.perf_counter() - t0)
    except BaseException:
        handle.stop()
        raise
    return handle


def serve_ray_cloud(run_dir: Path, **options: Any) -> None:
    """Serve the cloud app on Ray Serve (`start_ray_cloud`'s options) until interrupted, then undeploy it."""
    cloud = start_ray_cloud(run_dir, **options)
    print(
        f"edgeexit cloud on Ray Serve at {cloud.url} ({cloud.replicas} replicas); Ctrl-C to stop", flush=True
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cloud.stop()
