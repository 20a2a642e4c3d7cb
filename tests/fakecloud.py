"""A scriptable, misbehaving cloud for the edge's tests: a real HTTP/1.1 server on 127.0.0.1 (asyncio, in a
thread), each request answered as `behave(...)` last said.

Behaviours:
- "proxy": forward the request to a real cloud server (`upstream`) and return its answer, optionally with fields
  of the JSON replaced (`edit`, e.g. {"label": 987654}; float("nan") goes out as the JSON literal NaN).
- "slow": the same after `delay` seconds.
- "drip": the real (edited) answer, status line and headers included, one byte every `interval` seconds.
- "hang": read the request, never answer.
- "reset": read the request, then reset the connection (RST).
- "status": answer `status` with {"detail": ...}, or with `body` when given.
- "raw": answer 200 (application/json) with `body`, bytes as they are (a huge answer, nested brackets).
- "bytes": write `data` as the whole answer, status line and headers included, then close the connection.

`requests` counts the requests read, whatever the behaviour; `connections` the connections accepted.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
import threading
from typing import Any
from urllib.parse import urlsplit

_FORWARDED = ("content-type", "x-request-id", "authorization")


class FakeCloud:
    """Start with `FakeCloud(upstream_url)`, stop with `.stop()` (or use it as a context manager)."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.requests = 0
        self.connections = 0
        self._behaviour: tuple[str, dict[str, Any]] = ("proxy", {})
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True, name="fakecloud")
        self._thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self._port}"

    def behave(self, name: str, **params: Any) -> FakeCloud:
        """Answer every later request this way (see the module docstring)."""
        self._behaviour = (name, params)
        return self

    # --- server ----------------------------------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:  # keep-alive: one request after another
                request = await _read_request(reader)
                if request is None:
                    break
                self.requests += 1
                if not await self._answer(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False: the connection is over."""
        name, p = self._behaviour
        if name == "hang":
            await asyncio.sleep(3600)
        if name == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if name == "bytes":
            writer.write(p["data"])
            await writer.drain()
            return False
        if name == "status":
            body = p.get("body", json.dumps({"detail": f"fake failure {p['status']}"}).encode())
            writer.write(_response(p["status"], body))
        elif name == "raw":
            writer.write(_response(200, p["body"]))
        else:  # proxy, slow, drip: a real cloud's answer
            if name == "slow":
                await asyncio.sleep(p["delay"])
            status, body = await asyncio.to_thread(self._forward, request)
            if p.get("edit"):
                body = json.dumps({**json.loads(body), **p["edit"]}).encode()
            data = _response(status, body)
            if name == "drip":
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(p["interval"])
                return True
            writer.write(data)
        await writer.drain()
        return True

    def _forward(self, request: dict[str, Any]) -> tuple[int, bytes]:
        if self.upstream is None:
            raise RuntimeError("behaviour needs an upstream cloud")
        url = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            headers = {k: v for k, v in request["headers"].items() if k in _FORWARDED}
            conn.request(request["method"], request["path"], body=request["body"], headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stop(self) -> None:
        """Close the server and every connection (hanging ones included), then the loop."""

        async def shutdown() -> None:
            self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """One HTTP/1.1 request with a Content-Length body; None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return {"method": method, "path": path, "headers": headers, "body": body}


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body
