"""Measure a link as the paper did with ping and iPerf3: RTT, upload and download throughput over HTTP.

The cloud server mounts `probe_router`; `probe_link` runs on the edge against it. HTTP adds a little
server time to each RTT sample, so the RTT here slightly overestimates what ping would report.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import fastapi
import httpx
from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from edgeexit.errors import UserError
from edgeexit.serving.http import body_chunks

__all__ = ["MAX_SOURCE_BYTES", "LinkMeasurement", "probe_link", "probe_router"]

log = logging.getLogger(__name__)

MAX_SOURCE_BYTES = 64 * 1024 * 1024
_SOURCE_CHUNK = bytes(64 * 1024)

probe_router = fastapi.APIRouter(tags=["probe"])


@probe_router.get("/v1/probe/ping")
async def ping() -> dict[str, bool]:
    """A tiny answer: its round trip is the RTT sample."""
    return {"ok": True}


@probe_router.post("/v1/probe/sink")
async def sink(request: Request) -> dict[str, int]:
    """Read a body of any size as a stream and say how many bytes came (upload throughput); 408 if it stalls."""
    n = 0
    async for chunk in body_chunks(request):
        n += len(chunk)
    return {"bytes": n}


@probe_router.get("/v1/probe/source")
async def source(
    n: Annotated[int, Query(alias="bytes", ge=0, le=MAX_SOURCE_BYTES, description="bytes to send")],
) -> StreamingResponse:
    """Stream `bytes` zero bytes back (download throughput); more than 64 MiB is a 422."""

    async def body() -> AsyncIterator[bytes]:
        left = n
        while left > 0:
            step = min(left, len(_SOURCE_CHUNK))
            yield _SOURCE_CHUNK[:step]
            left -= step

    return StreamingResponse(
        body(), media_type="application/octet-stream", headers={"Content-Length": str(n)}
    )


@dataclass
class LinkMeasurement:
    """RTT (ms) and throughput (Mbit/s, 1 Mbit = 1e6 bit) of a link: mean and sample sd, plus medians."""

    rtt_ms_mean: float
    rtt_ms_sd: float
    up_mbit_mean: float
    up_mbit_sd: float
    down_mbit_mean: float
    down_mbit_sd: float
    n: int  # RTT samples
    # Beyond the paper's mean and sd: min and max as ping prints them, and medians, which resist the odd
    # scheduling hiccup of a loaded machine (such noise only ever adds time). n_transfers: samples per direction.
    rtt_ms_min: float = math.nan
    rtt_ms_median: float = math.nan
    rtt_ms_max: float = math.nan
    up_mbit_median: float = math.nan
    down_mbit_median: float = math.nan
    n_transfers: int = 0


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _sunk_bytes(r: httpx.Response) -> int | None:
    """The byte count in a sink answer, or None when the answer is not one."""
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("bytes") if isinstance(body, dict) else None


def _mbit(nbytes: int, seconds: float, rtt_s: float) -> float:
    """Throughput of one transfer with one RTT of request/response overhead taken out."""
    payload_s = seconds - rtt_s
    if payload_s <= 0.1 * seconds:
        log.warning(
            "transfer of %d bytes took %.2f ms, about one RTT: increase transfer_bytes", nbytes, seconds * 1e3
        )
        payload_s = seconds
    return nbytes * 8 / payload_s / 1e6


def probe_link(
    base_url: str,
    *,
    pings: int = 20,
    transfers: int = 5,
    transfer_bytes: int = 2_000_000,
    timeout: float = 30,
) -> LinkMeasurement:
    """Measure RTT and throughput to a server that mounts `probe_router`, on one warm keep-alive connection.

    RTT: the time of `GET /v1/probe/ping` (includes a little server time, unlike ICMP ping).
    Throughput: ``transfer_bytes * 8 / t`` for a POST to `/v1/probe/sink` (up) and a GET from
    `/v1/probe/source` (down), where ``t`` is the transfer's time minus the mean measured RTT: one request
    over one TCP connection pays one RTT of request/response overhead on top of the bytes' own time.
    Transfers should be large next to RTT x bandwidth (e.g. 2 MB at 40 Mbit/s = 0.4 s).
    """
    if pings < 1 or transfers < 1 or not 1 <= transfer_bytes <= MAX_SOURCE_BYTES:
        raise UserError(
            f"probe_link(pings={pings}, transfers={transfers}, transfer_bytes={transfer_bytes}); expected "
            f"pings >= 1, transfers >= 1 and 1 <= transfer_bytes <= {MAX_SOURCE_BYTES}"
        )
    payload = bytes(transfer_bytes)
    rtts: list[float] = []
    ups: list[float] = []
    downs: list[float] = []
    try:
        client = httpx.Client(base_url=base_url, timeout=timeout)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UserError(
            f"link probe URL {base_url!r} is not valid ({exc}); expected e.g. http://host:port"
        ) from None
    with client:
        try:
            for _ in range(3):  # warm up: connect, and let both ends' first-request costs pass
                client.get("/v1/probe/ping").raise_for_status()
            for _ in range(pings):
                t0 = time.perf_counter()
                client.get("/v1/probe/ping").raise_for_status()
                rtts.append(time.perf_counter() - t0)
            rtt_s = statistics.fmean(rtts)
            for _ in range(transfers):
                t0 = time.perf_counter()
                r = client.post(
                    "/v1/probe/sink", content=payload, headers={"Content-Type": "application/octet-stream"}
                )
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if _sunk_bytes(r) != transfer_bytes:
                    raise UserError(
                        f"link probe at {base_url} answered {r.text[:80]!r} to {transfer_bytes} bytes"
                    )
                ups.append(_mbit(transfer_bytes, dt, rtt_s))
                t0 = time.perf_counter()
                r = client.get("/v1/probe/source", params={"bytes": transfer_bytes})
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if len(r.content) != transfer_bytes:
                    raise UserError(
                        f"link probe at {base_url} sent {len(r.content)} of {transfer_bytes} bytes"
                    )
                downs.append(_mbit(transfer_bytes, dt, rtt_s))
        except httpx.HTTPStatusError as exc:
            raise UserError(
                f"link probe at {base_url} answered HTTP {exc.response.status_code} for {exc.request.url.path}; "
                "expected a server that mounts edgeexit's probe_router"
            ) from None
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach link probe at {base_url} ({type(exc).__name__}: {exc})") from None
    rtt_ms = [x * 1e3 for x in rtts]
    m = LinkMeasurement(
        rtt_ms_mean=statistics.fmean(rtt_ms),
        rtt_ms_sd=_sd(rtt_ms),
        up_mbit_mean=statistics.fmean(ups),
        up_mbit_sd=_sd(ups),
        down_mbit_mean=statistics.fmean(downs),
        down_mbit_sd=_sd(downs),
        n=len(rtts),
        rtt_ms_min=min(rtt_ms),
        rtt_ms_median=statistics.median(rtt_ms),
        rtt_ms_max=max(rtt_ms),
        up_mbit_median=statistics.median(ups),
        down_mbit_median=statistics.median(downs),
        n_transfers=transfers,
    )
    log.debug("link probe %s: %s", base_url, m)
    return m
