"""Tests of the link emulator and the link probe, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fastapi
import httpx
import pytest
import uvicorn

from edgeexit.errors import UserError
from edgeexit.serving.link import LinkProxy, LinkSpec, parse_address, run_link_in_thread
from edgeexit.serving.probe import MAX_SOURCE_BYTES, probe_link, probe_router

pytestmark = pytest.mark.slow  # starts real servers
TIMING_SENSITIVE = True  # bandwidth and RTT measured on the wall clock: run alone (tests/conftest.py)

RTT_MS = 20.0
MBIT = 40.0


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    """A uvicorn server with the probe router, in a thread, on an ephemeral port."""
    app = fastapi.FastAPI()
    app.include_router(probe_router)
    # IPPROTO_TCP (not 0) so that asyncio sets TCP_NODELAY on accepted sockets: without it Nagle and
    # delayed ACKs add ~40 ms to every response that uvicorn writes in two parts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _link_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("edgeexit-link")]


@pytest.mark.parametrize(
    ("rtt", "bw", "expected"),
    [
        ("11.91ms", "93.9mbit", (11.91, 93.9)),
        ("0.5s", "1gbit", (500.0, 1000.0)),
        ("11.91", "500kbit", (11.91, 0.5)),
        ("800us", "2000000bit", (0.8, 2.0)),
        (" 20 MS ", "40 Mbit", (20.0, 40.0)),
        ("0", ".5gbit", (0.0, 500.0)),
    ],
)
def test_linkspec_parse_accepts(rtt: str, bw: str, expected: tuple[float, float]) -> None:
    spec = LinkSpec.parse(rtt, bw)
    assert (spec.rtt_ms, spec.bandwidth_mbit) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rtt", "bw", "match"),
    [
        ("", "40mbit", "RTT"),
        ("abc", "40mbit", "RTT"),
        ("-5ms", "40mbit", "RTT"),
        ("5min", "40mbit", "RTT"),
        ("nan", "40mbit", "RTT"),
        ("1e3ms", "40mbit", "RTT"),
        ("20ms", "40", "bandwidth"),
        ("20ms", "0mbit", "bandwidth"),
        ("20ms", "10mbps", "bandwidth"),
        ("20ms", "-1mbit", "bandwidth"),
        ("20ms", "infmbit", "bandwidth"),
    ],
)
def test_linkspec_parse_rejects(rtt: str, bw: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        LinkSpec.parse(rtt, bw)
    assert "expected" in str(info.value)


def test_linkspec_validates_numbers() -> None:
    with pytest.raises(UserError):
        LinkSpec(rtt_ms=-1.0, bandwidth_mbit=10.0)
    with pytest.raises(UserError):
        LinkSpec(rtt_ms=1.0, bandwidth_mbit=0.0)
    assert LinkSpec(20.0, 40.0).one_way_s == pytest.approx(0.01)
    assert LinkSpec(20.0, 40.0).bytes_per_s == pytest.approx(5e6)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        (":8000", ("127.0.0.1", 8000)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:443", ("::1", 443)),
    ],
)
def test_parse_address_accepts(s: str, expected: tuple[str, int]) -> None:
    assert parse_address(s) == expected


@pytest.mark.parametrize(
    "s", ["", "8000", "localhost", "host:", "host:99999", "host:http", "a b:80", "http://h:80"]
)
def test_parse_address_rejects(s: str) -> None:
    with pytest.raises(UserError, match="HOST:PORT"):
        parse_address(s)


def test_direct_rtt_is_far_below_the_emulated_one(server_port: int) -> None:
    m = probe_link(f"http://127.0.0.1:{server_port}", pings=20, transfers=1, transfer_bytes=200_000)
    assert m.n == 20 and m.n_transfers == 1
    assert m.rtt_ms_median < 5.0
    assert m.rtt_ms_sd >= 0 and m.up_mbit_mean > 0 and m.down_mbit_mean > 0


def test_probe_through_link_measures_its_rtt_and_bandwidth(server_port: int) -> None:
    """The issue's acceptance test: RTT and throughput through the proxy within 15% of the spec.

    RTT is judged on the minimum of 30 pings, as ping prints it: on this shared 2-core machine every
    scheduling delay only adds time (under heavy load the median can double), while the delay the link
    itself adds shows in the fastest sample. What HTTP costs without the link is measured and taken out.
    Throughput is judged on medians of 5 transfers of 0.4 s each.
    """
    url = f"http://127.0.0.1:{server_port}"
    base = probe_link(url, pings=30, transfers=1, transfer_bytes=2_000_000)
    with run_link_in_thread("127.0.0.1:0", f"127.0.0.1:{server_port}", LinkSpec(RTT_MS, MBIT)) as link:
        m = probe_link(f"http://127.0.0.1:{link.port}", pings=30, transfers=5, transfer_bytes=2_000_000)
    assert m.n == 30 and m.n_transfers == 5
    assert m.rtt_ms_min >= RTT_MS, m  # the link never delivers early
    assert m.rtt_ms_min - base.rtt_ms_min == pytest.approx(RTT_MS, rel=0.15), m
    assert m.rtt_ms_min <= m.rtt_ms_median <= m.rtt_ms_max
    assert m.up_mbit_median == pytest.approx(MBIT, rel=0.15), m
    assert m.down_mbit_median == pytest.approx(MBIT, rel=0.15), m


def test_long_rtt_does_not_throttle_a_long_transfer(server_port: int) -> None:
    """Chunks are pipelined: with RTT 100 ms a 1 MB transfer still runs at the link's bandwidth."""
    with run_link_in_thread("127.0.0.1:0", f"127.0.0.1:{server_port}", LinkSpec(100.0, MBIT)) as link:
        m = probe_link(f"http://127.0.0.1:{link.port}", pings=3, transfers=1, transfer_bytes=1_000_000)
    assert m.rtt_ms_min >= 100.0
    assert m.up_mbit_median == pytest.approx(MBIT, rel=0.15), m
    assert m.down_mbit_median == pytest.approx(MBIT, rel=0.15), m


def test_many_concurrent_connections_through_the_link(server_port: int) -> None:
    n = 100_000

    def one(i: int) -> int:
        with httpx.Client(base_url=f"http://127.0.0.1:{link.port}", timeout=30) as c:
            if i % 2:
                r = c.post("/v1/probe/sink", content=bytes(n))
                return int(r.json()["bytes"])
            r = c.get("/v1/probe/source", params={"bytes": n})
            r.raise_for_status()
            return len(r.content)

    with run_link_in_thread("127.0.0.1:0", f"127.0.0.1:{server_port}", LinkSpec(10.0, 100.0)) as link:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == [n] * 8


def test_proxy_stops_cleanly(server_port: int) -> None:
    before = _link_threads()
    link = run_link_in_thread("127.0.0.1:0", f"127.0.0.1:{server_port}", LinkSpec(2.0, 100.0))
    client = httpx.Client(base_url=f"http://127.0.0.1:{link.port}", timeout=10)
    assert client.get("/v1/probe/ping").json() == {"ok": True}  # leaves a keep-alive connection open
    link.close()
    assert _refused(link.port)
    assert _link_threads() == before  # loop thread and timer thread are gone
    with pytest.raises(httpx.TransportError):
        client.get("/v1/probe/ping")  # the open connection was closed and nobody listens any more
    client.close()
    link.close()  # a second close is harmless


def test_half_close_is_forwarded_after_the_data() -> None:
    """A client that sends, then shuts down its write side, still gets the whole answer, then EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def echo_after_eof() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.append(data)
            conn.sendall(data[::-1])

    thread = threading.Thread(target=echo_after_eof, daemon=True)
    thread.start()
    payload = bytes(range(256)) * 2000  # 512 kB: several chunks, several ms of link time
    with run_link_in_thread(
        "127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}", LinkSpec(4.0, 500.0)
    ) as link:
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    thread.join(10)
    listener.close()
    assert received == [payload]
    assert answer == payload[::-1]


def test_unreachable_target_closes_the_client_connection() -> None:
    port = _free_port()
    with run_link_in_thread("127.0.0.1:0", f"127.0.0.1:{port}", LinkSpec(1.0, 100.0)) as link:
        with pytest.raises(UserError, match=f"127.0.0.1:{link.port}"):
            probe_link(f"http://127.0.0.1:{link.port}", pings=1, transfers=1, timeout=5)
        with pytest.raises(UserError, match="cannot listen"):
            run_link_in_thread(f"127.0.0.1:{link.port}", f"127.0.0.1:{port}", LinkSpec(1.0, 100.0))


def test_probe_of_an_unreachable_url_names_it() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UserError, match=f"cannot reach link probe at {url}"):
        probe_link(url, pings=1, transfers=1, timeout=5)
    with pytest.raises(UserError, match="not valid"):
        probe_link("http://host:notaport", pings=1, transfers=1)
    with pytest.raises(UserError, match="transfer_bytes"):
        probe_link(url, transfer_bytes=0)


def test_probe_endpoints(server_port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{server_port}") as c:
        assert c.get("/v1/probe/ping").json() == {"ok": True}
        assert c.post("/v1/probe/sink", content=b"").json() == {"bytes": 0}
        r = c.get("/v1/probe/source", params={"bytes": 70_000})
        assert r.status_code == 200 and r.content == bytes(70_000)
        assert r.headers["content-type"] == "application/octet-stream"
        assert c.get("/v1/probe/source", params={"bytes": 0}).content == b""
        assert c.get("/v1/probe/source", params={"bytes": MAX_SOURCE_BYTES + 1}).status_code == 422
        assert c.get("/v1/probe/source", params={"bytes": -1}).status_code == 422
        assert c.get("/v1/probe/source").status_code == 422
        wrong = c.get("/v1/probe/ping", params={"x": 1})
        assert wrong.status_code == 200  # unknown query parameters are ignored, as FastAPI does


def test_a_server_without_the_probe_router_is_named() -> None:
    app = fastapi.FastAPI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(UserError, match="HTTP 404 for /v1/probe/ping"):
            probe_link(url, pings=1, transfers=1)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_link_proxy_stop_leaves_no_tasks(server_port: int) -> None:
    """Stopping with a connection still open closes it and ends every task the proxy started."""

    async def scenario() -> None:
        proxy = LinkProxy("127.0.0.1", 0, "127.0.0.1", server_port, LinkSpec(2.0, 100.0))
        with pytest.raises(RuntimeError, match="not started"):
            _ = proxy.port
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /v1/probe/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await proxy.stop()  # the keep-alive connection is still open here
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed it
        assert asyncio.all_tasks() == {asyncio.current_task()}
        writer.close()
        await writer.wait_closed()

    asyncio.run(scenario())
