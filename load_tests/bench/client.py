"""Small aiohttp load clients: closed loop (N connections) and open loop (a fixed arrival rate).

wrk is the benchmark's client; these serve the smoke test, the shadow benchmark's
open-loop arrivals, and a fallback when wrk cannot be had. The open loop measures each
latency from the request's scheduled start, so a stalled server cannot hide its queue
(no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import numpy as np

Headers = Callable[[int], Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load run measured; latencies in milliseconds."""

    requests: int  # answered with a 2xx
    errors: int  # non-2xx answers, timeouts and connection errors
    duration_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def summarise(latencies_s: list[float], errors: int, duration_s: float, client: str) -> LoadResult:
    p50, p95, p99 = (
        np.percentile(np.asarray(latencies_s) * 1000, [50, 95, 99])
        if latencies_s
        else (float("nan"),) * 3
    )
    return LoadResult(
        len(latencies_s), errors, duration_s, float(p50), float(p95), float(p99), client
    )


def user_headers(header: str) -> Headers:
    """A different stickiness key per request, as many users would send."""
    return lambda i: {"Content-Type": "application/json", header: f"user-{i}"}


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> bool:
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return 200 <= response.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False


async def closed_loop(
    url: str, body: bytes, *, connections: int, duration_s: float, headers: Headers
) -> LoadResult:
    """`connections` callers, each sending its next request when the last one is answered."""
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        end = time.perf_counter() + duration_s

        async def caller() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < end:
                if await _one(session, url, body, headers(next(counter))):
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    return summarise(latencies, errors, elapsed, "aiohttp closed loop")


async def open_loop(
    url: str,
    body: bytes,
    *,
    rate: float,
    duration_s: float,
    headers: Headers,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Requests start every 1/rate s whatever the server does; latency from scheduled start."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(i: int, scheduled: float) -> None:
            nonlocal errors
            if await _one(session, url, body, headers(i)):
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors += 1

        tasks: list[asyncio.Task[None]] = []
        began = time.perf_counter()
        total = int(rate * duration_s)
        for i in range(total):
            scheduled = began + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    return summarise(latencies, errors, elapsed, f"aiohttp open loop at {rate:g}/s")
