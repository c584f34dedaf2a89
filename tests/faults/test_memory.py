"""Bounded memory: 100 slow clients each trickling most of an 8 MB body into a real
gateway process. What it buffers is capped by `max_buffered_bytes`, the rest are turned
away with 503, the slow ones are cut off by the body time limits, and the memory comes
back once they are gone (RSS read from /proc/<pid>/status)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rollguard.proxy.process import GatewayProcess
from tests.proxy.rawhttp import address, exchange, get, read
from tests.proxy.support import start_upstream, write_remote_version

MiB = 1024 * 1024
BUFFER_CAP = 64 * MiB
BODY = 8_000_000  # declared; each client sends 7.5 MB of it, then stalls or leaves
SENT = 7_500_000
PIECE = 64 * 1024
KEPT = 24 * MiB  # what may stay once they are gone: allocator and interpreter caches

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/status")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def _remote(registry: Path) -> AsyncIterator[None]:
    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/v2/models/remote/versions/1/ready", ready)
    runner, base = await start_upstream(app)
    write_remote_version(registry, "1", f"{base}/v2/models/remote/versions/1")
    try:
        yield
    finally:
        await runner.cleanup()


async def _upload(url: str, leave: bool, outcome: list[int]) -> None:
    """Send the head of an 8 MB body and 7.5 MB of it, a piece at a time; then stall (or
    leave, when `leave`). `outcome` gets the answer's status (0: none, the client left)."""
    reader, writer = await asyncio.open_connection(*address(url))
    head = (f"POST /v2/models/remote/infer HTTP/1.1\r\nHost: t\r\n"
            f"Content-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n")  # fmt: skip
    answer = asyncio.create_task(read(reader, timeout_s=60.0))
    try:
        writer.write(head.encode())
        piece = b" " * PIECE
        for _ in range(SENT // PIECE):
            if answer.done():
                break  # refused: stop sending
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        if leave and not answer.done():
            answer.cancel()
            outcome.append(0)
            return
        outcome.append((await answer).status)
    except (ConnectionError, asyncio.IncompleteReadError):
        outcome.append(-1)  # reset before an answer could be read
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _sample_peak(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss(pid))
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_100_slow_8mb_uploads_keep_rss_bounded_and_give_it_back(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    env = {**os.environ, "ROLLGUARD_MAX_BUFFERED_BYTES": str(BUFFER_CAP),
           "ROLLGUARD_HEADER_TIMEOUT_S": "2", "ROLLGUARD_BODY_TIMEOUT_S": "4",
           "ROLLGUARD_ADMIN_AUTH": "none"}  # fmt: skip
    async with _remote(registry):
        (tmp_path / "policies").mkdir()
        gateway = GatewayProcess(
            registry=registry, policies=tmp_path / "policies", state=tmp_path / "state",
            log=tmp_path / "gateway.log", env=env,
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:
                await gateway.wait_ready(http)
            pid = gateway.proc.pid
            for _ in range(20):  # warm up the paths a request takes
                await exchange(gateway.url, get("/v2/health/ready"))
            baseline = _rss(pid)
            stop, peak = asyncio.Event(), [baseline]
            sampler = asyncio.create_task(_sample_peak(pid, stop, peak))
            outcome: list[int] = []
            await asyncio.gather(*(_upload(gateway.url, i % 2 == 0, outcome) for i in range(100)))
            settled = await _settled_rss(gateway, baseline)
            stop.set()
            await sampler
            grew, kept = peak[0] - baseline, settled - baseline
            print(f"\nRSS baseline {baseline / MiB:.0f} MiB, peak +{grew / MiB:.0f} MiB, "
                  f"after +{kept / MiB:.0f} MiB; outcomes {sorted(set(outcome))}: "
                  f"{ {s: outcome.count(s) for s in set(outcome)} }")  # fmt: skip
            # Bound: the buffer cap, plus one body's copy at completion and slack for the
            # read buffers of 100 connections.
            assert grew <= BUFFER_CAP + 48 * MiB, grew / MiB
            assert kept <= KEPT, kept / MiB
            assert outcome.count(503) >= 50  # turned away once the buffer was full
            assert set(outcome) <= {0, -1, 408, 503}
            answer = await exchange(gateway.url, get("/v2/health/ready"))
            assert answer.status == 200
            metrics = await _metrics(gateway.admin_url)
            assert 'rollguard_capacity_refusals_total{reason="buffer_full"}' in metrics
            assert "rollguard_request_body_buffered_bytes 0.0" in metrics
        finally:
            gateway.stop()
        assert "Traceback" not in (tmp_path / "gateway.log").read_text()


async def _settled_rss(gateway: GatewayProcess, baseline: int, limit_s: float = 20.0) -> int:
    """RSS once the gateway holds no connection and no body any more, and RSS is back
    within `KEPT` of `baseline` (or `limit_s` has passed: then what it is)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        metrics = await _metrics(gateway.admin_url)
        idle = "rollguard_connections_open 0.0" in metrics
        empty = "rollguard_request_body_buffered_bytes 0.0" in metrics
        if idle and empty and _rss(gateway.proc.pid) - baseline <= KEPT:
            break
        await asyncio.sleep(0.2)
    return _rss(gateway.proc.pid)


async def _metrics(admin_url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{admin_url}/metrics") as r:
        return await r.text()
