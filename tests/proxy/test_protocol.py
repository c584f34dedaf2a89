"""The data port's HTTP/1.1 server end to end: the real gateway on loopback, raw sockets.

Raw bytes rather than an HTTP client: pipelining, interim answers, malformed and
half-sent requests are what a client library hides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import socket
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from rollguard.proxy.wire import Request
from rollguard.serving.demo.build import load_eval_data
from tests.proxy import rawhttp
from tests.proxy.conftest import MakeRegistry
from tests.proxy.rawhttp import chunked, closed, connect, exchange, get, post, read, until
from tests.proxy.support import serve, start_upstream, write_remote_version

INFER = "/v2/models/fraud/infer"
REMOTE = "/v2/models/remote/infer"


@functools.cache
def _rows() -> np.ndarray:
    return load_eval_data()[0]


def _row(i: int = 0, request_id: str | None = None) -> bytes:
    doc: dict[str, object] = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": _rows()[i].tolist()}
        ]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def _remote_row(request_id: str | None = None) -> bytes:
    doc: dict[str, object] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


# --- a slow upstream: a `framework: http` version whose answers wait for the test ------


@dataclass
class Upstream:
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: int = 0  # infer requests that reached the upstream


@contextlib.asynccontextmanager
async def _slow_remote(tmp_path: Path) -> AsyncIterator[tuple[Path, Upstream]]:
    """A registry with model `remote` served by a loopback upstream whose infer answers
    only once `release` is set."""
    upstream = Upstream()

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        doc = await request.json()
        upstream.entered += 1
        await upstream.release.wait()
        outputs = [{"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}]
        return web.json_response(
            {"model_name": "m", "model_version": "1", "id": doc.get("id"), "outputs": outputs}
        )

    app = web.Application()
    app.router.add_get("/v2/models/m/versions/1/ready", ready)
    app.router.add_post("/v2/models/m/versions/1/infer", infer)
    runner, base = await start_upstream(app)
    registry = tmp_path / "registry"
    write_remote_version(registry, "1", f"{base}/v2/models/m/versions/1")
    try:
        yield registry, upstream
    finally:
        upstream.release.set()
        await runner.cleanup()


# --- the V2 routes ---------------------------------------------------------------------


async def test_v2_routes_answer_the_specs_json(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        url = server.url
        metadata = {
            "name": "rollguard",
            "version": "0.1.0",
            "extensions": ["binary_tensor_data", "statistics", "feedback"],
        }
        for path in ("/v2", "/v2/"):
            answer = await exchange(url, get(path))
            assert (answer.status, answer.json()) == (200, metadata), path
            assert answer.headers["content-type"] == "application/json"
        answer = await exchange(url, get("/v2/health/live"))
        assert (answer.status, answer.json()) == (200, {"live": True})
        answer = await exchange(url, get("/v2/health/ready"))
        assert (answer.status, answer.json()) == (200, {"ready": True})
        answer = await exchange(url, get("/v2/models/fraud/ready"))
        assert (answer.status, answer.json()) == (200, {"name": "fraud", "ready": True})
        answer = await exchange(url, get("/v2/models/fraud/versions/1.0.0/ready"))
        assert (answer.status, answer.json()) == (200, {"name": "fraud", "ready": True})
        answer = await exchange(url, get("/v2/models/fraud"))
        assert answer.status == 200
        doc = answer.json()
        assert (doc["name"], doc["versions"]) == ("fraud", ["1.0.0"])
        assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]

        answer = await exchange(url, get("/v2/nowhere"))
        assert answer.status == 404 and isinstance(answer.json()["error"], str)
        answer = await exchange(url, get("/v2/models/nope/ready"))
        assert answer.status == 404 and isinstance(answer.json()["error"], str)
        answer = await exchange(url, post("/v2/models/nope/infer", _row(0)))
        assert answer.status == 404 and isinstance(answer.json()["error"], str)
        answer = await exchange(url, get(INFER))
        assert (answer.status, answer.headers["allow"]) == (405, "POST")
        assert isinstance(answer.json()["error"], str)
        answer = await exchange(url, post("/v2", b"{}"))
        assert (answer.status, answer.headers["allow"]) == (405, "GET, HEAD")

        # An infer answer: the body's id echoed, the variant that answered, the server's
        # own headers.
        answer = await exchange(url, post(INFER, _row(0, "r-1")))
        assert answer.status == 200 and answer.json()["id"] == "r-1"
        assert answer.headers["x-request-id"] == "r-1"
        assert answer.headers["x-rollguard-variant"] == "1.0.0"
        assert answer.headers["server"] == "rollguard"
        assert answer.headers["date"].endswith("GMT")
        # Percent-escapes decoded and the query ignored.
        answer = await exchange(url, post("/v2/models/fr%61ud/infer?q=1", _row(0)))
        assert answer.status == 200 and answer.json()["model_name"] == "fraud"


async def test_metrics_and_admin_only_on_the_admin_port(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        for path in ("/metrics", "/admin/rollouts"):
            answer = await exchange(server.url, get(path))
            assert answer.status == 404 and "error" in answer.json(), path
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.admin_url}/metrics") as resp:
                assert resp.status == 200
                assert "rollguard_" in await resp.text()
            async with http.get(f"{server.admin_url}/admin/rollouts") as resp:
                assert resp.status == 200  # loopback, no token set


# --- connections: keep-alive, pipelining, HTTP/1.0, Connection: close ------------------


async def test_keep_alive_reuses_the_connection(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(INFER, _row(0, "first")))
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "first")
        assert "connection" not in answer.headers  # HTTP/1.1 keeps alive by default
        w.write(get("/v2/health/live"))
        assert (await read(r)).json() == {"live": True}
        w.write(post(INFER, _row(1, "third")))
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "third")
        assert len(server.running._server.connections) == 1


async def test_pipelined_requests_are_answered_in_order(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        w.write(b"".join(post(INFER, _row(i, f"p-{i}")) for i in range(3)))
        for i in range(3):
            answer = await read(r)
            assert (answer.status, answer.json()["id"]) == (200, f"p-{i}")
            assert answer.headers["x-request-id"] == f"p-{i}"
        # More than the server buffers before it stops reading, mixed with GETs and
        # errors: all answered, in order.
        mixed = [post(INFER, _row(i, f"q-{i}")) for i in range(12)]
        mixed[3] = get("/v2/health/live")
        mixed[7] = get("/v2/nowhere")
        w.write(b"".join(mixed))
        for i in range(12):
            answer = await read(r)
            if i == 3:
                assert answer.json() == {"live": True}
            elif i == 7:
                assert answer.status == 404
            else:
                assert (answer.status, answer.json()["id"]) == (200, f"q-{i}")


async def test_http10_keeps_alive_only_when_asked(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        async with connect(server.url) as (r, w):
            w.write(post(INFER, _row(0, "ten"), version="1.0"))
            answer = await read(r)
            assert (answer.version, answer.status, answer.json()["id"]) == ("1.0", 200, "ten")
            assert "connection" not in answer.headers  # 1.0 closes unless told otherwise
            assert await closed(r)
        async with connect(server.url) as (r, w):
            for i in range(2):
                w.write(post(INFER, _row(i, f"ka-{i}"), "Connection: keep-alive", version="1.0"))
                answer = await read(r)
                assert (answer.version, answer.status) == ("1.0", 200)
                assert answer.headers["connection"] == "keep-alive"
                assert answer.json()["id"] == f"ka-{i}"
            w.write(get("/v2/health/live", version="1.0"))
            answer = await read(r)
            assert answer.status == 200 and "connection" not in answer.headers
            assert await closed(r)


async def test_connection_close_closes_after_the_answer(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(INFER, _row(0, "a")))
        assert (await read(r)).status == 200
        # What follows a `Connection: close` request is not read, let alone answered.
        w.write(post(INFER, _row(1, "last"), "Connection: close") + post(INFER, _row(2, "no")))
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "last")
        assert answer.headers["connection"] == "close"
        assert await closed(r)


# --- bodies: chunked, compressed, Expect: 100-continue ---------------------------------


async def test_chunked_request_body(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        w.write(head.encode() + chunked(_row(3, "ch")))
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "ch")
        # Chunks sent one write at a time, the connection kept alive after.
        w.write(head.encode())
        body = _row(4, "ch-2")
        for i in range(0, len(body), 17):
            w.write(b"%x\r\n%s\r\n" % (len(body[i : i + 17]), body[i : i + 17]))
            await w.drain()
        w.write(b"0\r\n\r\n")
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "ch-2")


async def test_compressed_request_bodies(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        url = server.url
        gzipped = gzip.compress(_row(0, "gz"))
        answer = await exchange(url, post(INFER, gzipped, "Content-Encoding: gzip"))
        assert (answer.status, answer.json()["id"]) == (200, "gz")
        deflated = zlib.compress(_row(0, "df"))
        answer = await exchange(url, post(INFER, deflated, "Content-Encoding: deflate"))
        assert (answer.status, answer.json()["id"]) == (200, "df")
        answer = await exchange(url, post(INFER, _row(0), "Content-Encoding: br"))
        assert answer.status == 415 and "br" in answer.json()["error"]
        answer = await exchange(url, post(INFER, _row(0), "Content-Encoding: gzip"))
        assert answer.status == 400 and "gzip" in answer.json()["error"]
        answer = await exchange(
            url, post(INFER, gzip.compress(_row(0))[:-12], "Content-Encoding: gzip")
        )
        assert answer.status == 400 and "truncated" in answer.json()["error"]
        answer = await exchange(url, post(INFER, _row(0, "id"), "Content-Encoding: identity"))
        assert (answer.status, answer.json()["id"]) == (200, "id")


async def test_gzip_bomb_is_refused_once_inflated(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0"), max_body_bytes=2048) as server:
        bomb = gzip.compress(b" " * 100_000)
        assert len(bomb) < 2048
        answer = await exchange(server.url, post(INFER, bomb, "Content-Encoding: gzip"))
        assert answer.status == 413 and "inflated" in answer.json()["error"]


async def test_expect_100_continue(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        body = _row(0, "cont")
        head = post(INFER, body, "Expect: 100-continue")[: -len(body)]
        w.write(head)
        # The interim answer comes before the body is sent.
        version, status, _ = await asyncio.wait_for(rawhttp.read_head(r), 5.0)
        assert (version, status) == ("1.1", 100)
        w.write(body)
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "cont")
        # An expectation the server does not know.
        w.write(post(INFER, body, "Expect: something-else"))
        answer = await read(r)
        assert answer.status == 415 and "Expect" in answer.json()["error"]
        assert await closed(r)


# --- refusals: 413, malformed bytes -----------------------------------------------------


async def test_declared_length_over_the_limit_is_413_before_the_body(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), max_body_bytes=2048) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(INFER, b"x" * 5000)[:-5000])  # the head only: the body never comes
        answer = await read(r)
        assert answer.status == 413
        assert answer.json() == {"error": "body of 5000 bytes exceeds the limit of 2048"}
        assert answer.headers["connection"] == "close" and answer.headers["x-request-id"]
        assert await closed(r)
        # A body at the limit is read.
        assert (await exchange(server.url, post(INFER, b" " * 2048))).status == 400


async def test_chunked_body_growing_past_the_limit_is_413(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), max_body_bytes=2048) as server,
        connect(server.url) as (r, w),
    ):
        head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        w.write(head.encode() + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(3)))
        answer = await read(r)
        assert answer.status == 413
        assert answer.json() == {"error": "body exceeds the limit of 2048 bytes"}
        assert answer.headers["x-request-id"]
        assert await closed(r)


async def test_413_echoes_the_clients_request_id(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0"), max_body_bytes=2048) as server:
        answer = await exchange(server.url, post(INFER, b"x" * 5000, "X-Request-Id: big"))
        assert (answer.status, answer.headers["x-request-id"]) == (413, "big")


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /v2 HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"POST /v2/models/fraud/infer HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /v2 HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ],
)
async def test_malformed_bytes_are_400_and_close(
    tmp_path: Path, make_registry: MakeRegistry, garbage: bytes
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        async with connect(server.url) as (r, w):
            w.write(garbage)
            answer = await read(r)
            assert answer.status == 400 and "malformed HTTP request" in answer.json()["error"]
            assert answer.headers["connection"] == "close" and answer.headers["x-request-id"]
            assert await closed(r)
        # After a good request on the same connection: that one answered, then the 400.
        async with connect(server.url) as (r, w):
            w.write(post(INFER, _row(0, "before")) + garbage)
            answer = await read(r)
            assert (answer.status, answer.json()["id"]) == (200, "before")
            assert (await read(r)).status == 400
            assert await closed(r)
        assert (await exchange(server.url, get("/v2/health/live"))).status == 200
        assert server.running.data_plane.inflight == 0


# --- request ids ------------------------------------------------------------------------


async def test_request_ids(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        url = server.url
        # From the header when the body has none; the body's wins over the header's.
        answer = await exchange(url, post(INFER, _row(0), "X-Request-Id: from-header"))
        assert answer.headers["x-request-id"] == "from-header"
        answer = await exchange(url, post(INFER, _row(0, "from-body"), "X-Request-Id: h"))
        assert answer.headers["x-request-id"] == "from-body"
        generated = await exchange(url, post(INFER, _row(0)))
        assert generated.status == 200 and generated.headers["x-request-id"]
        # A control character in the header's id, or a newline in the body's: 400.
        answer = await exchange(url, post(INFER, _row(0), "X-Request-Id: a\x01b"))
        assert answer.status == 400 and "error" in answer.json()
        assert answer.headers["x-request-id"] and "\x01" not in answer.headers["x-request-id"]
        answer = await exchange(url, get("/v2/health/live", "X-Request-Id: a\x7fb"))
        assert answer.status == 400  # both refused by the parser already
        # A tab passes the parser; the data plane refuses it, on any route.
        for request in (
            get("/v2/health/live", "X-Request-Id: a\tb"),
            post(INFER, _row(0), "X-Request-Id: a\tb"),
            get("/v2/nowhere", "X-Request-Id: a\tb"),
        ):
            answer = await exchange(url, request)
            assert answer.status == 400 and "control characters" in answer.json()["error"]
            assert answer.headers["x-request-id"] and "\t" not in answer.headers["x-request-id"]
        answer = await exchange(url, post(INFER, _row(0, "a\nb"), "X-Request-Id: fine"))
        assert answer.status == 400 and "control characters" in answer.json()["error"]
        assert answer.headers["x-request-id"] == "fine"
        answer = await exchange(url, post(INFER, _row(0, "a\r\nb")))
        assert answer.status == 400 and answer.headers["x-request-id"]
        # Every answer has one: success, 404, 405, 400, 413.
        for request in (
            get("/v2/health/live"),
            get("/v2/nowhere"),
            get(INFER),
            post(INFER, b"not json"),
            post(INFER, b"x" * (server.settings.max_body_bytes + 1)),
        ):
            answer = await exchange(url, request)
            assert answer.headers.get("x-request-id"), (answer.status, request[:40])
        answer = await exchange(url, get("/v2/nowhere", "X-Request-Id: lost"))
        assert (answer.status, answer.headers["x-request-id"]) == (404, "lost")
        ids = {(await exchange(url, get("/v2/health/live"))).headers["x-request-id"] for _ in "ab"}
        assert len(ids) == 2  # generated ids differ


# --- timeouts ---------------------------------------------------------------------------


async def test_half_sent_head_is_closed_while_others_are_answered(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    timeout = 0.3
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), header_timeout_s=timeout) as server,
        connect(server.url) as (slow_r, slow_w),
    ):
        started = time.monotonic()
        slow_w.write(f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Le".encode())
        await slow_w.drain()
        answer = await exchange(server.url, post(INFER, _row(0, "meanwhile")))
        assert (answer.status, answer.json()["id"]) == (200, "meanwhile")
        assert await _timed_out(slow_r, "head", timeout + 3.0)
        assert time.monotonic() - started >= timeout * 0.9
        # A body that stops arriving is cut off alike.
        async with connect(server.url) as (r, w):
            started = time.monotonic()
            w.write(post(INFER, _row(0))[:-20])
            assert await _timed_out(r, "body", timeout + 3.0)
            assert time.monotonic() - started >= timeout * 0.9


async def test_a_trickled_body_is_cut_off_by_the_body_limit(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """A byte at a time, each within the pause limit: the whole body's limit still holds."""
    settings = {"header_timeout_s": 1.0, "body_timeout_s": 0.5}
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), **settings) as server,
        connect(server.url) as (r, w),
    ):
        body = _row(0)
        w.write(post(INFER, body)[: -len(body)])
        started = time.monotonic()

        async def trickle() -> None:
            for byte in body[:-1]:
                w.write(bytes([byte]))
                await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        assert await _timed_out(r, "body", 5.0)
        trickling.cancel()
        assert time.monotonic() - started >= 0.45
        assert server.running.capacity.timed_out["body"] == 1


async def _timed_out(reader: asyncio.StreamReader, phase: str, timeout_s: float) -> bool:
    """A 408 naming `phase`, then the close."""
    answer = await read(reader, timeout_s)
    assert answer.status == 408 and f"request {phase} did not arrive" in answer.json()["error"]
    assert answer.headers["connection"] == "close"
    return await closed(reader)


async def test_idle_kept_alive_connection_is_closed(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    keepalive = 0.3
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), keepalive_s=keepalive) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(INFER, _row(0)))
        assert (await read(r)).status == 200
        idle_since = time.monotonic()
        assert await closed(r, timeout_s=keepalive + 3.0)
        assert time.monotonic() - idle_since >= keepalive * 0.9
        await until(lambda: not server.running._server.connections)


async def test_many_idle_connections_all_closed_by_the_timeout(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    settings = {"keepalive_s": 0.3, "header_timeout_s": 0.3}
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), **settings) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = [await stack.enter_async_context(connect(server.url)) for _ in range(50)]
        for i, (_, w) in enumerate(streams[:25]):  # half of them sent half a head
            w.write(f"GET /v2/health/live HTTP/1.1\r\nX-N: {i}".encode())
        results = await asyncio.gather(
            *(_timed_out(r, "head", 5.0) for r, _ in streams[:25]),
            *(closed(r, timeout_s=5.0) for r, _ in streams[25:]),
        )
        assert all(results)
        await until(lambda: not server.running._server.connections)
        assert (await exchange(server.url, get("/v2/health/live"))).status == 200


# --- admission and clients that leave --------------------------------------------------


async def test_overload_is_503_with_retry_after_while_health_answers(tmp_path: Path) -> None:
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry, max_inflight=1) as server,
        connect(server.url) as (r1, w1),
    ):
        plane = server.running.data_plane
        w1.write(post(REMOTE, _remote_row("held")))
        await until(lambda: upstream.entered == 1 and plane.inflight == 1)
        answer = await exchange(server.url, post(REMOTE, _remote_row(), "X-Request-Id: away"))
        assert (answer.status, answer.headers["retry-after"]) == (503, "1")
        assert answer.headers["x-request-id"] == "away"
        assert "in flight" in answer.json()["error"]
        answer = await exchange(server.url, get("/v2/health/live"))
        assert (answer.status, answer.json()) == (200, {"live": True})
        assert (await exchange(server.url, get("/v2/health/ready"))).status == 200
        assert upstream.entered == 1  # the refused request never reached the upstream
        upstream.release.set()
        answer = await read(r1)
        assert (answer.status, answer.json()["id"]) == (200, "held")
        assert plane.inflight == 0
        assert (await exchange(server.url, post(REMOTE, _remote_row("next")))).status == 200
        # Refused at the end of its head, before its body was buffered.
        rejected = server.running.metrics.registry.get_sample_value(
            "rollguard_capacity_refusals_total", {"reason": "overloaded"}
        )
        assert rejected == 1.0


async def test_client_leaving_mid_request_does_not_break_the_server(tmp_path: Path) -> None:
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry) as server,
    ):
        plane = server.running.data_plane
        # Mid-body: the head and part of the body, then gone.
        async with connect(server.url) as (_, w):
            w.write(post(REMOTE, _remote_row())[:-10])
            await w.drain()
        # Mid-head.
        async with connect(server.url) as (_, w):
            w.write(b"POST /v2/models/remote/infer HTTP/1.1\r\nHo")
            await w.drain()
        connections = server.running._server.connections
        await until(lambda: not connections)
        # While its request runs: the request finishes, its answer is dropped (the
        # server cannot tell a half-close from a close, so it tries to answer).
        async with connect(server.url) as (_, w):
            w.write(post(REMOTE, _remote_row("left")))
            await until(lambda: plane.inflight == 1)
        upstream.release.set()
        await until(lambda: plane.inflight == 0 and not connections)
        answer = await exchange(server.url, post(REMOTE, _remote_row("after")))
        assert (answer.status, answer.json()["id"]) == (200, "after")
        assert upstream.entered == 2


# --- graceful shutdown ------------------------------------------------------------------


async def test_close_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry, shutdown_grace_s=5.0) as server,
    ):
        running = server.running
        plane = running.data_plane
        reader, writer = await asyncio.open_connection(*rawhttp.address(server.url))
        idle_r, idle_w = await asyncio.open_connection(*rawhttp.address(server.url))
        try:
            writer.write(post(REMOTE, _remote_row("last")))
            await until(lambda: upstream.entered == 1)
            closing = asyncio.create_task(running.close())
            await until(lambda: plane.draining)
            ready = await plane.handle(Request("GET", "/v2/health/ready", "", {}, b"", "1.1", True))
            assert ready.status == 503 and b"shutting down" in ready.body
            assert await closed(idle_r)  # idle connections close at once
            assert not closing.done()  # waits for the request in flight
            upstream.release.set()
            answer = await read(reader)
            assert (answer.status, answer.json()["id"]) == (200, "last")
            assert answer.headers["connection"] == "close"
            assert await closed(reader)
            await asyncio.wait_for(closing, 5.0)
            with pytest.raises(OSError):  # no longer accepting
                await asyncio.open_connection(*rawhttp.address(server.url))
        finally:
            for w in (writer, idle_w):
                w.close()


async def test_slow_reader_gets_every_answer_in_order(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """A client that writes many requests and reads nothing for a while: the server stops
    writing (and reading) until the client catches up; nothing is lost or reordered."""
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up soon
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, rawhttp.address(server.url))
        r, w = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            n = 20_000
            w.write(b"".join(get(f"/v2/models/fraud?n={i}", f"X-Request-Id: s-{i}")
                             for i in range(n)))  # fmt: skip
            (conn,) = server.running._server.connections
            await until(lambda: conn._drained is not None)  # the server waits for us
            for i in range(n):
                answer = await read(r)
                assert (answer.status, answer.headers["x-request-id"]) == (200, f"s-{i}")
            w.write(get("/v2/health/live"))
            assert (await read(r)).json() == {"live": True}
        finally:
            w.close()


async def test_an_upgrade_offer_is_ignored_and_the_connection_stays_http(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """A server may ignore Upgrade: the offer is answered as HTTP/1.1; bytes that follow
    it are read as HTTP (a client that sent frames before a 101 gets a 400 and a close)."""
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        offer = get("/v2/health/live", "Connection: Upgrade", "Upgrade: websocket")
        w.write(offer + get("/v2/health/ready"))
        answer = await read(r)
        assert (answer.status, answer.json()) == (200, {"live": True})
        answer = await read(r)
        assert (answer.status, answer.json()) == (200, {"ready": True})
        w.write(offer + b"\x81\x05")
        answer = await read(r)
        assert (answer.status, answer.json()) == (200, {"live": True})
        answer = await read(r)
        assert answer.status == 400
        assert await closed(r)


async def test_upgrade_offer_with_a_body_is_ignored(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    h2c = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQ")
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        answer = await exchange(server.url, post(INFER, _row(0, "h2c"), *h2c))
        assert (answer.status, answer.json().get("id")) == (200, "h2c"), answer.json()


async def test_bodies_past_the_buffer_budget_are_503_also_behind_an_upgrade_offer(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    h2c = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQ")
    async with serve(tmp_path, make_registry("fraud/1.0.0"), max_buffered_bytes=1024) as server:
        big = b'{"inputs": [], "pad": "' + b"x" * 2000 + b'"}'
        head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        for request in (post(INFER, big), post(INFER, big, *h2c), head.encode() + chunked(big)):
            answer = await exchange(server.url, request)
            assert (answer.status, answer.headers["retry-after"]) == (503, "1")
            assert "max_buffered_bytes" in answer.json()["error"]
        assert server.running.capacity.buffered == 0
        assert (await exchange(server.url, post(INFER, _row(0, "small")))).status == 200


async def test_100_continue_behind_a_running_request(tmp_path: Path) -> None:
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry, header_timeout_s=1.0) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(REMOTE, _remote_row("first")))
        await until(lambda: upstream.entered == 1)
        body = _remote_row("second")
        w.write(post(REMOTE, body, "Expect: 100-continue")[: -len(body)])
        await w.drain()
        upstream.release.set()
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "first")
        # The client waits for the interim answer before it sends the body.
        _, status, _ = await asyncio.wait_for(rawhttp.read_head(r), 3.0)
        assert status == 100
        w.write(body)
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "second")


async def test_close_drops_queued_requests_and_answers_the_running_one(tmp_path: Path) -> None:
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(REMOTE, _remote_row("running")) + get("/v2/health/live"))
        await until(lambda: upstream.entered == 1)
        closing = asyncio.create_task(server.running.close())
        await until(lambda: server.running.data_plane.draining)
        upstream.release.set()
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "running")
        assert answer.headers.get("connection") != "close"
        answer = await read(r)  # the queued GET never ran: 503, retry elsewhere
        assert (answer.status, answer.headers["retry-after"]) == (503, "1")
        assert "shutting down" in answer.json()["error"]
        assert answer.headers["connection"] == "close"
        assert await closed(r)
        await asyncio.wait_for(closing, 5.0)


async def test_close_gives_up_on_requests_after_the_grace_period(tmp_path: Path) -> None:
    grace = 0.3
    async with (
        _slow_remote(tmp_path) as (registry, upstream),
        serve(tmp_path, registry, shutdown_grace_s=grace) as server,
        connect(server.url) as (r, w),
    ):
        plane = server.running.data_plane
        w.write(post(REMOTE, _remote_row("stuck")))
        await until(lambda: upstream.entered == 1)
        started = time.monotonic()
        await asyncio.wait_for(server.running.close(), grace + 3.0)
        assert time.monotonic() - started >= grace * 0.9
        answer = await read(r)  # answered 503 rather than cut off
        assert (answer.status, answer.headers["connection"]) == (503, "close")
        assert "shutting down" in answer.json()["error"]
        assert await closed(r)
        assert plane.inflight == 0


async def test_head_answer_has_no_body(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        w.write(rawhttp.request("HEAD", "/v2/health/live") + get("/v2/health/live"))
        _, status, _ = await asyncio.wait_for(rawhttp.read_head(r), 5.0)
        assert status in (200, 405)
        # A HEAD answer ends with its head, whatever its Content-Length says.
        version, status, _ = await asyncio.wait_for(rawhttp.read_head(r), 5.0)
        assert (version, status) == ("1.1", 200)


async def test_absolute_form_target(tmp_path: Path, make_registry: MakeRegistry) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        answer = await exchange(server.url, get("http://t/v2/health/live"))
        assert (answer.status, answer.json()) == (200, {"live": True})
