"""Connection limits of the servers, on real servers in subprocesses started the way the serve commands start
theirs (serving.server.run_server): idle and slow connections closed, bounded request heads, the cap on
requests in progress, /healthz beside 1,000 idle sockets, quiet disconnects, rate-limited accept errors."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeexit.cli import main
from edgeexit.serving.limits import MAX_HEADER_BYTES
from edgeexit.serving.server import JOIN_MAX_BYTES, _OneWritePerTurn, raise_fd_limit

pytestmark = pytest.mark.slow  # starts real servers

IDLE_S = 1.5  # the test servers' idle timeout
SLACK_S = 1.5  # for a loaded 2-core machine
MAX_CONCURRENCY = 2
STALL_S = (
    4.0  # the test servers' body stall timeout (limits.BODY_STALL_TIMEOUT_S): long enough for the cap test
)

# The server: new_app (the HTTP plumbing the cloud and edge apps share) with the link-probe routes, whose
# /v1/probe/sink reads a body as it comes: a request whose body never ends stays in progress.
SERVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from edgeexit.serving import limits
from edgeexit.serving.http import new_app
from edgeexit.serving.probe import probe_router
from edgeexit.serving.server import run_server
port, idle, loop, cap = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
limits.BODY_STALL_TIMEOUT_S = float(sys.argv[5])
app, api = new_app("limits test", None, None, max_concurrency=cap)
api.include_router(probe_router)
app.include_router(api)
run_server(app, host="127.0.0.1", port=port, idle_timeout=idle, loop=loop, log_level="info")
"""


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        """One unlabelled sample of the server's /metrics."""
        status, _, body = self.get("/metrics")
        assert status == 200
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        raise AssertionError(f"{name} not in /metrics")

    def stop(self) -> str:
        """SIGINT (uvicorn shuts down gracefully), then the whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(log: Path, *, loop: str = "auto", fd_limits: tuple[int, int] | None = None) -> Server:
    port = _free_port()

    def limit_fds() -> None:
        if fd_limits is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, fd_limits)

    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(IDLE_S), loop, str(MAX_CONCURRENCY), str(STALL_S)],
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_fds,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out.close()
    server = Server(port, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if server.get("/healthz", timeout=2)[0] == 200:
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"the test server did not start:\n{server.log_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _start(tmp_path_factory.mktemp("limits") / "server.log")
    yield srv
    srv.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_after(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed `s` (recv returned b''), or None if it was still open after `timeout`."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return time.monotonic() - t0
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - t0


def _read_answer(s: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one answer with a Content-Length, read from `s`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed after {head + body!r}"
        body += chunk
    return head, body


def _start_sink(port: int, declared: int = 1000) -> socket.socket:
    """A POST to /v1/probe/sink whose body stops after 3 of its `declared` bytes: in progress until closed."""
    s = _connect(port)
    s.sendall(f"POST /v1/probe/sink HTTP/1.1\r\nHost: t\r\nContent-Length: {declared}\r\n\r\nabc".encode())
    return s


# --- idle and slow connections -------------------------------------------------------------------------------


def test_silent_idle_and_slow_connections_are_closed_after_the_idle_timeout(server: Server) -> None:
    t0 = time.monotonic()
    silent = [_connect(server.port) for _ in range(20)]  # connected, never send a byte
    kept = _connect(server.port)  # one answer, then idle on keep-alive
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert _read_answer(kept)[0].startswith(b"HTTP/1.1 200")
    slow = _connect(server.port)  # a head trickled a byte at a time: activity, but never a whole head

    def trickle() -> None:
        try:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            for _ in range(int((IDLE_S + SLACK_S) / 0.1)):
                slow.sendall(b"a")
                time.sleep(0.1)
        except OSError:
            pass  # closed by the server: what the test expects

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    waits = [_closed_after(s, IDLE_S + SLACK_S) for s in (*silent, kept, slow)]
    sender.join()
    assert all(w is not None for w in waits), f"still open after {IDLE_S + SLACK_S} s: {waits}"
    # Closed by the timeout, not at once: the earliest close is at least most of IDLE_S after connecting.
    assert time.monotonic() - t0 >= 0.8 * IDLE_S
    for s in (*silent, kept, slow):
        s.close()


def test_healthz_answers_fast_beside_1000_idle_sockets(server: Server) -> None:
    soft, _ = raise_fd_limit()  # this process holds the 1,000 client ends
    if soft < 1200:
        pytest.skip(f"this process may open only {soft} files")
    base = server.metric("process_open_fds")
    idle = [_connect(server.port) for _ in range(1000)]
    try:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            status, _, body = server.get("/healthz")
            times.append(time.perf_counter() - t0)
            assert status == 200 and body == b'{"status":"ok"}'
        held = server.metric("process_open_fds") - base
        # The server held the idle sockets while answering (a few may have timed out on a slow machine).
        assert held >= 900, held
        assert min(times) < 0.1, times  # generous: about 1 ms on an idle machine
        time.sleep(IDLE_S + SLACK_S)
        still_open = 0
        for s in idle:
            s.setblocking(False)
            try:
                still_open += s.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except ConnectionResetError:
                pass
        assert still_open == 0
        assert server.metric("process_open_fds") - base < 50
    finally:
        for s in idle:
            s.close()


# --- request heads -------------------------------------------------------------------------------------------


def test_a_1mb_header_line_is_refused_without_memory_growth(server: Server) -> None:
    rss = server.metric("process_resident_memory_bytes")
    for _ in range(10):
        s = _connect(server.port)
        answer = b""
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            while chunk := s.recv(4096):  # until the server closes
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while the client was still sending (the kernel resets it): refused as well
        finally:
            s.close()
        if answer:
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
            assert b"connection: close" in answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("request head over")
    assert server.metric("process_resident_memory_bytes") - rss < 8 << 20
    # A head under the bound is served.
    s = _connect(server.port)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Ok: " + b"a" * (MAX_HEADER_BYTES // 2) + b"\r\n\r\n")
    assert _read_answer(s)[0].startswith(b"HTTP/1.1 200")
    s.close()


def test_bodies_are_not_counted_as_heads(server: Server) -> None:
    # A head, then a 1 MiB body in 64 KiB writes, twice on one keep-alive connection.
    s = _connect(server.port)
    body = bytes(1 << 20)
    for _ in range(2):
        s.sendall(f"POST /v1/probe/sink HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 1 << 16):
            s.sendall(body[i : i + (1 << 16)])
        head, answer = _read_answer(s)
        assert head.startswith(b"HTTP/1.1 200") and answer == b'{"bytes":1048576}', head + answer
    s.close()


# --- the cap on requests in progress -------------------------------------------------------------------------


def test_requests_beyond_the_cap_get_503_with_retry_after(server: Server) -> None:
    busy = [_start_sink(server.port) for _ in range(MAX_CONCURRENCY)]
    try:
        time.sleep(0.3)  # both are in progress (reading their bodies)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/probe/sink", body=b"x")
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 503
        assert r.getheader("Retry-After") == "1"
        detail = json.loads(body)["detail"]
        assert "\n" not in detail and f"{MAX_CONCURRENCY} requests in progress" in detail
        assert server.get("/healthz")[0] == 200  # never capped
        assert server.get("/metrics")[0] == 200
    finally:
        for s in busy:
            s.close()
    time.sleep(0.3)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/probe/sink", body=b"xyz")
    r = conn.getresponse()
    assert (r.status, json.loads(r.read())) == (200, {"bytes": 3})
    conn.close()


def test_a_stalled_body_gets_408_and_frees_its_request_slot(server: Server) -> None:
    """A body that pauses longer than the stall timeout: 408 with a one-line detail, the connection closed, and
    the request's slot under the cap free again (the head's idle timeout does not cover a body)."""
    stalled = _start_sink(server.port)  # 3 of 1000 bytes, then nothing
    t0 = time.monotonic()
    try:
        head, body = _read_answer(stalled)
        took = time.monotonic() - t0
        assert head.startswith(b"HTTP/1.1 408")
        assert b"connection: close" in head.lower()
        assert "stalled" in json.loads(body)["detail"]
        assert STALL_S - 0.5 < took < STALL_S + SLACK_S
        assert _closed_after(stalled, SLACK_S) is not None
    finally:
        stalled.close()
    busy = [_start_sink(server.port) for _ in range(MAX_CONCURRENCY - 1)]  # with the stalled one gone: room
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/probe/sink", body=b"xyz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        before = len(server.log_text())
        for s in busy:
            s.close()
    _new_log(server, before, "went away")  # its one line is logged before the next test reads the log


# --- quiet disconnects ---------------------------------------------------------------------------------------


def _new_log(server: Server, before: int, needle: str, timeout: float = 5.0) -> str:
    """The server's log written after offset `before`, once it holds `needle` (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_text()[before:]
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("when", ["mid-body", "mid-answer"])
def test_a_client_that_disconnects_is_one_info_line(server: Server, when: str) -> None:
    before = len(server.log_text())
    if when == "mid-body":
        s = _start_sink(server.port)
        time.sleep(0.3)
        path = "/v1/probe/sink"
    else:  # a 64 MiB answer, of which the client reads a little
        s = _connect(server.port)
        s.sendall(b"GET /v1/probe/source?bytes=67108864 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        path = "/v1/probe/source"
    s.close()
    text = _new_log(server, before, "went away")
    assert server.get("/healthz")[0] == 200
    text = server.log_text()[before:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert re.fullmatch(
        rf"INFO edgeexit\.serving\.server: client 127\.0\.0\.1:\d+ went away .*'{path}'.*", lines[0]
    )


# --- file descriptors and accept errors ----------------------------------------------------------------------


def test_out_of_descriptors_accept_errors_are_rate_limited(tmp_path: Path) -> None:
    # asyncio's own loop (uvloop, the default where installed, accepts and closes the excess silently): with
    # 64 descriptors, 150 connections make accept() fail with EMFILE over and over. The server raised its soft
    # limit (32) to the hard one (64) at start.
    server = _start(tmp_path / "server.log", loop="asyncio", fd_limits=(32, 64))
    try:
        assert server.metric("process_max_fds") == 64
        flood = []
        for _ in range(150):
            try:
                flood.append(_connect(server.port))
            except OSError:
                break
        time.sleep(2.5)  # two more retries of the accept loop, each failing for every waiting connection
        for s in flood:
            s.close()
        time.sleep(1.5)  # the loop retries accepting a second after a failure
        assert server.get("/healthz")[0] == 200
    finally:
        text = server.stop()
    accept_lines = [line for line in text.splitlines() if "socket.accept()" in line]
    assert len(accept_lines) == 2, text[-3000:]
    assert "Too many open files" in accept_lines[0] and "0 more failures" in accept_lines[0]
    held = re.search(r"failed (\d+) more times", accept_lines[1])
    assert held and int(held.group(1)) > 0, accept_lines
    assert "Traceback" not in text and len(text) < 5000


def test_serve_commands_check_the_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-cloud", str(tmp_path), "--max-concurrency", "0"]) == 2
    assert "max concurrency must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["serve-edge", str(tmp_path), "--cloud", "http://x:1", "--idle-timeout", "inf"]) == 2
    assert "idle timeout must be a finite number of seconds > 0, got inf" in capsys.readouterr().err


# --- one write per answer -------------------------------------------------------------------------------------


class _Recording(asyncio.Transport):
    """An asyncio transport that records its writes (a stand-in for the socket, not one of ours)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_an_answers_small_writes_go_out_as_one_and_large_ones_at_once() -> None:
    async def go() -> _Recording:
        raw = _Recording()
        t = _OneWritePerTurn(raw, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert raw.writes == []  # gathered until the turn ends
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"head")
        big = b"x" * (JOIN_MAX_BYTES + 1)
        t.write(big)  # too large to gather: what was gathered, then it, at once (flow control sees it)
        assert raw.writes[1:] == [b"head", big]
        t.write(b"last")
        t.close()  # closing writes what was gathered first
        assert raw.writes[3:] == [b"last"] and raw.closed
        assert t.is_closing()  # everything else is the transport's
        return raw

    raw = asyncio.run(go())
    assert len(raw.writes) == 4
