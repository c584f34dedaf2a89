"""Hostile and broken connections on the data port: silent, half-sent and trickling
clients are cut off by the time limits, and the connection caps turn extra connections
away, while a legitimate client keeps being served. The real gateway, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.rawhttp import Stream, address, closed, connect, exchange, get, post, read, until
from tests.proxy.support import Server, serve

INFER = "/v2/models/fraud/infer"


@functools.cache
def _body() -> bytes:
    row = load_eval_data()[0][0].tolist()
    return orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": row}]}
    )


async def _served_meanwhile(server: Server, stop: asyncio.Event) -> list[int]:
    """A legitimate client, until `stop`: kept-alive inference and a fresh connection's
    health check in turn. The statuses it got."""
    statuses: list[int] = []
    async with connect(server.url) as (r, w):
        while not stop.is_set():
            w.write(post(INFER, _body()))
            statuses.append((await read(r)).status)
            statuses.append((await exchange(server.url, get("/v2/health/ready"))).status)
            await asyncio.sleep(0.05)
    return statuses


def _sample(server: Server, name: str, **labels: str) -> float:
    value = server.running.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.slow
async def test_300_idle_and_half_sent_connections_are_closed_while_a_client_is_served(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    limits = {"header_timeout_s": 1.0, "body_timeout_s": 2.0, "keepalive_s": 1.0}
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), **limits) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        stop = asyncio.Event()
        legit = asyncio.create_task(_served_meanwhile(server, stop))
        streams = [await stack.enter_async_context(connect(server.url)) for _ in range(300)]
        silent, heads, bodies = streams[:100], streams[100:200], streams[200:]
        started = time.monotonic()
        for i, (_, w) in enumerate(heads):
            w.write(f"POST {INFER} HTTP/1.1\r\nHost: t\r\nX-N: {i}".encode())
        body = _body()
        for _, w in bodies:
            w.write(post(INFER, body)[: -len(body)] + body[:10])

        async def trickle(stream: Stream) -> None:
            """A byte every 0.3 s: never a pause long enough for a pause limit alone."""
            for byte in body[10:]:
                await asyncio.sleep(0.3)
                stream[1].write(bytes([byte]))

        tricklers = [asyncio.create_task(trickle(s)) for s in bodies]

        async def timed_out(stream: Stream) -> bool:
            answer = await read(stream[0], timeout_s=10.0)
            assert answer.status == 408 and "did not arrive in time" in answer.json()["error"]
            return await closed(stream[0])

        results = await asyncio.gather(
            *(closed(r, timeout_s=10.0) for r, _ in silent),
            *(timed_out(s) for s in heads + bodies),
        )
        elapsed = time.monotonic() - started
        for task in tricklers:
            task.cancel()
        stop.set()
        statuses = await legit
        assert all(results)
        assert elapsed >= 0.9  # the limits, not something sooner, closed them
        assert len(statuses) >= 4 and set(statuses) == {200}, statuses
        await until(lambda: server.running.capacity.connections == 0)
        for phase in ("idle", "head", "body"):
            assert _sample(server, "rollguard_connection_timeouts_total", phase=phase) >= 100
        assert (await exchange(server.url, post(INFER, _body()))).status == 200


async def test_connection_caps_turn_extra_connections_away_with_503(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    caps = {"max_connections": 30, "max_connections_per_client": 10}
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), **caps) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        capacity = server.running.capacity
        host, port = address(server.url)

        async def open_from(source: str) -> Stream:
            """A connection from another loopback address (127.0.0.0/8 is all ours)."""
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            stack.push_async_callback(_shut, writer)
            return reader, writer

        async def turned_away(source: str, cap: str) -> None:
            r, _ = await open_from(source)
            answer = await read(r)
            assert (answer.status, answer.headers["retry-after"]) == (503, "1")
            assert cap in answer.json()["error"] and answer.headers["connection"] == "close"
            assert await closed(r)

        greedy = [await open_from("127.0.0.2") for _ in range(10)]
        await until(lambda: capacity.client_connections("127.0.0.2") == 10)
        await turned_away("127.0.0.2", "max_connections_per_client")
        # The greedy client's own connections still work; other clients are served.
        greedy[0][1].write(get("/v2/health/live"))
        assert (await read(greedy[0][0])).status == 200
        assert (await exchange(server.url, post(INFER, _body()))).status == 200
        # The total: 10 + 20 more from two other addresses fill it.
        _ = [await open_from(f"127.0.0.{3 + i // 10}") for i in range(20)]
        await until(lambda: capacity.connections == 30)
        await turned_away("127.0.0.9", "max_connections")
        await turned_away("127.0.0.1", "max_connections")
        assert _sample(server, "rollguard_capacity_refusals_total",
                       reason="max_connections_per_client") == 1  # fmt: skip
        assert _sample(server, "rollguard_capacity_refusals_total", reason="max_connections") == 2
        # Room again once some close.
        for _, writer in greedy[:5]:
            await _shut(writer)
        await until(lambda: capacity.connections == 25)
        assert (await exchange(server.url, post(INFER, _body()))).status == 200


async def test_a_flood_of_connections_never_exhausts_the_cap_for_good(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Connections opened and dropped at once, or turned away, are all given back."""
    caps = {"max_connections": 20, "max_connections_per_client": 0}
    async with serve(tmp_path, make_registry("fraud/1.0.0"), **caps) as server:
        host, port = address(server.url)

        async def hit_and_run() -> None:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v2/models/fraud/infer HTTP/1.1\r\nContent-Length: 99\r\n\r\n{")
            await _shut(writer)

        results = await asyncio.gather(*(hit_and_run() for _ in range(200)),
                                       return_exceptions=True)  # fmt: skip
        assert all(r is None or isinstance(r, ConnectionError) for r in results), results
        await until(lambda: server.running.capacity.connections == 0)
        assert server.running.capacity.buffered == 0
        assert (await exchange(server.url, post(INFER, _body()))).status == 200


async def _shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def test_the_connection_cap_is_fitted_to_the_open_file_limit() -> None:
    """With 400 descriptors and no way to raise them, 4096 connections cannot be held:
    the cap is lowered so it bites before the descriptors run out."""
    code = (
        "import resource, logging; logging.basicConfig();"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400));"
        "from rollguard.proxy.gateway import _fit_to_descriptors as fit;"
        "print(fit(4096), fit(100))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["144", "100"]
    assert "does not fit the open-file limit 400: using 144" in done.stderr
