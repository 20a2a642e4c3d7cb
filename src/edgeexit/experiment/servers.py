"""Start and stop the cloud server (a subprocess) and the link emulator for an experiment."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from edgeexit.errors import UserError

__all__ = ["free_port", "cloud_server_process"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may still take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def cloud_server_process(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 120.0,
    attempts: int = 3,
    *,
    runtime: str = "torch",
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run `edgeexit serve-cloud RUN_DIR --runtime RUNTIME [extra_args]` in a subprocess until the block ends;
    yields its base URL.

    Port 0 picks a free port (and retries with another if it was taken meanwhile). The server's output goes
    to RUN_DIR/cloud_server.log. The server is stopped on exit, on Ctrl-C and on error.
    """
    log_path = Path(run_dir) / "cloud_server.log"
    last_error = ""
    for _ in range(attempts):
        chosen = port or free_port(host)
        cmd = [
            sys.executable,
            "-m",
            "edgeexit",
            "serve-cloud",
            str(run_dir),
            "--host",
            host,
            "--port",
            str(chosen),
            "--runtime",
            runtime,
            *extra_args,
        ]
        log.info("starting cloud server: %s", " ".join(cmd))
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
        url = f"http://{host}:{chosen}"
        try:
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:  # its last log line says why (output goes to the log file)
                    last_error = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                    break
                try:
                    if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                        yield url
                        return
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise UserError(f"cloud server did not answer at {url} within {startup_timeout:.0f} s")
        finally:
            _stop(proc)
        if port:  # a fixed port the user asked for: no other to try
            break
    raise UserError(f"cloud server failed to start on {host}:{port or 'a free port'}: {' '.join(last_error)}")
