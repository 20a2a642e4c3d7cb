"""A TCP proxy that emulates a network link: a one-way delay and a rate limit in each direction.

Used to run the edge and the cloud on one machine as if they sat on the paper's link (RTT 11.91 ms,
93.9 Mbit/s). Each direction is modelled as a serialising link followed by a propagation delay: a chunk
read from the source occupies the link for ``bytes * 8 / rate`` seconds once the link is free (one
"link free at" clock per direction, shared by every connection through the proxy, so concurrent
connections share the bandwidth), and reaches the destination RTT/2 after it has been sent. Delays are
applied by a writer task that releases queued chunks at their release times, never by sleeping in the
reader, so a long transfer pipelines: its throughput is set by the bandwidth, not by the RTT.
Not emulated: loss, jitter, TCP slow start on the emulated path.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

from edgeexit.errors import UserError

__all__ = ["LinkHandle", "LinkProxy", "LinkSpec", "parse_address", "run_link_in_thread"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # largest read; also the most one chunk can occupy the link at once
_BUFFER_BYTES = 4 * CHUNK_BYTES  # queue at the bottleneck beyond the bytes in propagation

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RTT_RE = re.compile(rf"{_NUMBER}\s*(us|ms|s)?", re.IGNORECASE)
_BW_RE = re.compile(rf"{_NUMBER}\s*(bit|kbit|mbit|gbit)", re.IGNORECASE)
_RTT_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_BW_UNIT_MBIT = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_ADDR_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class LinkSpec:
    """An emulated link: round-trip time added (RTT/2 each way) and bandwidth in each direction."""

    rtt_ms: float  # round trip time added: RTT/2 one-way delay in EACH direction
    bandwidth_mbit: float  # rate in each direction, 1 Mbit = 1e6 bit

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"link RTT {self.rtt_ms!r} ms; expected a finite number >= 0")
        if not (math.isfinite(self.bandwidth_mbit) and self.bandwidth_mbit > 0):
            raise UserError(f"link bandwidth {self.bandwidth_mbit!r} Mbit/s; expected a finite number > 0")

    @classmethod
    def parse(cls, rtt: str, bandwidth: str) -> LinkSpec:
        """Parse e.g. ("11.91ms" | "0.5s" | "800us" | "11.91" [ms], "93.9mbit" | "1gbit" | "500kbit")."""
        m = _RTT_RE.fullmatch(rtt.strip())
        if m is None:
            raise UserError(
                f"link RTT {rtt!r}; expected a number with an optional unit us/ms/s, e.g. '11.91ms'"
            )
        rtt_ms = float(m.group(1)) * _RTT_UNIT_MS[(m.group(2) or "ms").lower()]
        b = _BW_RE.fullmatch(bandwidth.strip())
        if b is None:
            raise UserError(
                f"link bandwidth {bandwidth!r}; expected a number with a unit bit/kbit/mbit/gbit, e.g. '93.9mbit'"
            )
        return cls(rtt_ms=rtt_ms, bandwidth_mbit=float(b.group(1)) * _BW_UNIT_MBIT[b.group(2).lower()])

    @property
    def one_way_s(self) -> float:
        """Propagation delay of one direction, in seconds."""
        return self.rtt_ms / 2000.0

    @property
    def bytes_per_s(self) -> float:
        """Rate of one direction, in bytes per second."""
        return self.bandwidth_mbit * 1e6 / 8.0


def parse_address(s: str) -> tuple[str, int]:
    """Parse "HOST:PORT" ("127.0.0.1:8000", "localhost:0", "[::1]:80"; ":8000" means 127.0.0.1)."""
    m = _ADDR_RE.fullmatch(s.strip())
    if m is None or int(m.group("port")) > 65535:
        raise UserError(f"address {s!r}; expected HOST:PORT with PORT in 0..65535, e.g. '127.0.0.1:8000'")
    host = m.group("v6") or m.group("host") or "127.0.0.1"
    return host, int(m.group("port"))


class _Timer:
    """One thread that resolves asyncio futures at precise times.

    asyncio's own timers wake up late by up to ~1-2 ms (the selector rounds its timeout up to whole
    milliseconds, twice), which would add a systematic 10-20% to an emulated 12 ms RTT.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edgeexit-link-timer", daemon=True)
        self._thread.start()

    def sleep(self, delay: float) -> asyncio.Future[None]:
        """A future of the running loop that completes `delay` seconds from now."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), loop, fut))
            self._cond.notify()
        return fut

    def close(self) -> None:
        """Stop the thread; pending futures are left to their (cancelled) waiters."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, loop, fut = heapq.heappop(self._heap)
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # that loop has closed: nobody waits any more
                    pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a cancelled waiter has already given up on it
        fut.set_result(None)


class _Direction:
    """The shared "link free at" clock of one direction of the link."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.free_at = 0.0


class LinkProxy:
    """Asyncio TCP proxy from a listen address to a target address over an emulated link."""

    def __init__(
        self, listen_host: str, listen_port: int, target_host: str, target_port: int, spec: LinkSpec
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.spec = spec
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._timer: _Timer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._up = _Direction("up")  # client -> target
        self._down = _Direction("down")  # target -> client
        # Room for the bytes in propagation (one-way bandwidth-delay product) plus a small bottleneck queue;
        # beyond it the reader stops reading, so TCP back-pressure reaches the sender as on a real link.
        self._queue_limit = int(spec.bytes_per_s * spec.one_way_s) + _BUFFER_BYTES

    @property
    def port(self) -> int:
        """The port the proxy listens on (the real one when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("LinkProxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening; a busy or invalid listen address raises UserError."""
        try:
            self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        except OSError as exc:
            raise UserError(
                f"cannot listen on {self.listen_host}:{self.listen_port} ({exc.strerror or exc}); "
                "expected a free local address"
            ) from None
        self._timer = _Timer()
        log.debug(
            "link proxy %s:%d -> %s:%d (%s)",
            self.listen_host,
            self.port,
            self.target_host,
            self.target_port,
            self.spec,
        )

    async def stop(self) -> None:
        """Stop listening, close every open connection and wait for their tasks to end."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        while self._conns:
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*list(self._conns), return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._stopping = False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Serve one accepted connection: open one to the target and pump both directions."""
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or self._server is None:  # accepted just as stop() began
            client_w.close()
            return
        self._conns.add(task)
        peer = client_w.get_extra_info("peername")
        writers = [client_w]
        try:
            try:
                target_r, target_w = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError as exc:
                log.warning(
                    "link proxy: cannot reach target %s:%d (%s)", self.target_host, self.target_port, exc
                )
                return
            writers.append(target_w)
            log.debug("link proxy: %s connected", peer)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(client_r, target_w, self._up))
                    tg.create_task(self._pump(target_r, client_w, self._down))
            except* (OSError, EOFError) as eg:
                log.debug("link proxy: %s aborted (%s)", peer, eg.exceptions[0])
            log.debug("link proxy: %s closed", peer)
        except asyncio.CancelledError:
            # asyncio's stream server calls task.exception() on this task, which would log a cancelled
            # task as an error: end normally when stop() is what cancelled us.
            if not self._stopping:
                raise
            log.debug("link proxy: %s closed by stop()", peer)
        finally:
            self._conns.discard(task)
            for w in writers:
                w.close()
            for w in writers:
                try:
                    await asyncio.wait_for(w.wait_closed(), timeout=1.0)
                except (OSError, TimeoutError):
                    pass

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, d: _Direction) -> None:
        """Copy one direction: a reader stamps release times, a writer releases chunks at those times."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        space = asyncio.Event()
        queued = 0
        rate = self.spec.bytes_per_s
        one_way = self.spec.one_way_s
        timer = self._timer
        assert timer is not None

        async def read() -> None:
            nonlocal queued
            while True:
                while queued >= self._queue_limit:
                    space.clear()
                    await space.wait()
                chunk = await src.read(CHUNK_BYTES)
                now = loop.time()
                if not chunk:  # EOF: the FIN follows this connection's last byte after one propagation delay
                    queue.put_nowait((now + one_way, b""))
                    return
                d.free_at = max(d.free_at, now) + len(chunk) / rate
                queued += len(chunk)
                queue.put_nowait((d.free_at + one_way, chunk))

        async def write() -> None:
            nonlocal queued
            while True:
                release, chunk = await queue.get()
                delay = release - loop.time()
                if delay > 0:
                    await timer.sleep(delay)
                if not chunk:
                    if dst.can_write_eof() and not dst.is_closing():
                        dst.write_eof()  # half-close: the other direction keeps flowing
                    return
                dst.write(chunk)
                queued -= len(chunk)
                space.set()
                await dst.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(read())
            tg.create_task(write())


@dataclass
class LinkHandle:
    """A LinkProxy running on its own event loop in a daemon thread; `close()` stops it."""

    host: str
    port: int
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _stop: asyncio.Event = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the proxy (closing its connections) and join its thread; safe to call twice."""
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop has already closed
                pass
            self._thread.join(timeout)

    def __enter__(self) -> LinkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_link_in_thread(listen: str, target: str, spec: LinkSpec) -> LinkHandle:
    """Start a LinkProxy from `listen` to `target` ("HOST:PORT") in a daemon thread and return its handle."""
    listen_host, listen_port = parse_address(listen)
    target_host, target_port = parse_address(target)
    if target_port == 0:
        raise UserError(f"target address {target!r}; expected a real port, not 0")
    proxy = LinkProxy(listen_host, listen_port, target_host, target_port, spec)
    ready = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            await proxy.start()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc
            ready.set()
            return
        box.update(loop=asyncio.get_running_loop(), stop=stop, port=proxy.port)
        ready.set()
        try:
            await stop.wait()
        finally:
            await proxy.stop()

    thread = threading.Thread(
        target=asyncio.run, args=(serve(),), name=f"edgeexit-link-{listen}", daemon=True
    )
    thread.start()
    ready.wait()
    if "error" in box:
        thread.join()
        raise box["error"]  # type: ignore[misc]
    return LinkHandle(
        host=listen_host,
        port=box["port"],  # type: ignore[arg-type]
        _loop=box["loop"],  # type: ignore[arg-type]
        _stop=box["stop"],  # type: ignore[arg-type]
        _thread=thread,
    )
