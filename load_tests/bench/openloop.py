"""An open-loop client: requests start at a fixed rate whatever the server does.

wrk is closed-loop: a slow answer delays the next request, so a server that stalls is
sent less and its queue never shows (coordinated omission). Here request i is due at
`start + i / rate`; it goes on an idle keep-alive connection (a new one while fewer than
`max_connections` are open, else it waits for one), and its latency runs from when it
was due to when its answer was read. A late send counts against the server's latency.

Written on raw asyncio transports (uvloop), pre-encoded requests and a minimal HTTP/1.1
reader, so that a few thousand requests a second cost the client a small share of a core
on the machine it shares with the servers it measures (aiohttp's client would take most
of one).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import numpy as np

from load_tests.bench.client import LoadResult

_HEAD_END = b"\r\n\r\n"


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, done: Callable[[_Conn, int, float], None]) -> None:
        self._done = done
        self.transport: asyncio.Transport | None = None
        self.due = 0.0
        self._buffer = bytearray()
        self._need = -1  # bytes of the whole answer, once its head is read
        self._status = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._need < 0:
            end = buffer.find(_HEAD_END)
            if end < 0:
                return
            head = bytes(buffer[:end]).decode("latin-1")
            self._status = int(head[9:12])
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            self._need = end + 4 + length
        if len(buffer) >= self._need:
            del buffer[: self._need]
            self._need = -1
            self._done(self, self._status, self.due)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self._need >= 0 or self.due:
            self._done(self, 0, self.due)  # an answer that never came


async def run(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    rate: float,
    duration_s: float,
    max_connections: int = 256,
    grace_s: float = 5.0,
) -> LoadResult:
    """Send `requests` (cycled) at `rate` a second for `duration_s`; latency from due time.

    Answers that are not 2xx, connections lost and requests still unanswered `grace_s`
    after the last one was due are errors."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    idle: list[_Conn] = []
    conns: list[_Conn] = []
    waiting: deque[tuple[int, float]] = deque()  # (request index, due) with no connection
    total = int(rate * duration_s)
    finished = 0
    all_done = loop.create_future()

    def done(conn: _Conn, status: int, due: float) -> None:
        nonlocal errors, finished
        now = time.perf_counter()
        conn.due = 0.0
        finished += 1
        if 200 <= status < 300:
            latencies.append(now - due)
        else:
            errors += 1
        if conn.transport is not None:
            if waiting:
                i, next_due = waiting.popleft()
                conn.send(requests[i % len(requests)], next_due)
            else:
                idle.append(conn)
        if finished >= total and not all_done.done():
            all_done.set_result(None)

    opening = 0

    async def open_and_send(i: int, due: float) -> None:
        nonlocal opening, errors, finished
        opening += 1
        try:
            _, conn = await loop.create_connection(lambda: _Conn(done), host, port)
        except OSError:
            errors += 1
            finished += 1
            return
        finally:
            opening -= 1
        conns.append(conn)
        conn.send(requests[i % len(requests)], due)

    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter()
    interval = 1.0 / rate
    for i in range(total):
        due = began + i * interval
        delay = due - time.perf_counter()
        if delay > 0.0005:  # sleep only when it is worth a timer; else send at once
            await asyncio.sleep(delay)
        while idle and idle[-1].transport is None:  # closed by the server while idle
            idle.pop()
        if len(conns) + opening >= max_connections:
            conns[:] = [c for c in conns if c.transport is not None]
        if idle:
            idle.pop().send(requests[i % len(requests)], due)
        elif len(conns) + opening < max_connections:
            tasks.append(loop.create_task(open_and_send(i, due)))
        else:
            waiting.append((i, due))
    last_due = began + total * interval
    try:
        await asyncio.wait_for(
            asyncio.shield(all_done), max(last_due + grace_s - time.perf_counter(), 0.1)
        )
    except TimeoutError:
        errors += total - finished
    elapsed = time.perf_counter() - began
    for conn in conns:
        if conn.transport is not None:
            conn.due = 0.0
            conn.transport.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    if latencies:
        p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    else:
        p50 = p95 = p99 = float("nan")
    return LoadResult(
        len(latencies),
        errors,
        elapsed,
        float(p50),
        float(p95),
        float(p99),
        f"open loop at {rate:g}/s",
    )


def v2_requests(path: str, host: str, body: bytes, key_header: str, n: int = 1024) -> list[bytes]:
    """`n` keep-alive POSTs of `body` to `path`, each with its own stickiness key."""
    out = []
    for i in range(n):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{key_header}: user-{i * 7919 % 100_000_000}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


def run_url(
    url: str, body: bytes, key_header: str, *, rate: float, duration_s: float
) -> LoadResult:
    """`run` against an http://host:port/path URL, in a fresh uvloop event loop."""
    import uvloop

    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    requests = v2_requests("/" + path, hostport, body, key_header)
    return uvloop.run(run(host, int(port), requests, rate=rate, duration_s=duration_s))
