"""The fast infer path end to end: the real server on loopback, raw sockets and aiohttp."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from rollguard.proxy.guard import LIMITS
from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve, write_remote_version
from tests.proxy.test_app import _upstream

Response = tuple[int, dict[str, str], bytes]


@functools.cache
def _rows() -> np.ndarray:
    return load_eval_data()[0]


def _row(i: int = 0, request_id: str | None = None) -> bytes:
    x = _rows()
    doc: dict[str, object] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": x[i].tolist()}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def _post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Type: application/json\r\n"
    head += "".join(f"{line}\r\n" for line in extra)
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


async def _read(reader: asyncio.StreamReader) -> Response:
    """One response with a Content-Length body, after any interim (1xx) answers."""
    status = 100
    while status < 200:
        status_line = await reader.readline()
        assert status_line, "connection closed before a response"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


@asynccontextmanager
async def _connect(
    server: Server,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def _until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _label(body: bytes) -> int:
    doc = orjson.loads(body)
    label = next(o for o in doc["outputs"] if o["name"] == "label")
    return int(label["data"][0])


INFER = "/v2/models/fraud/infer"


async def test_keep_alive_and_pipelining_answer_in_order(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server, _connect(server) as (r, w):
        for i in range(30):
            w.write(_post(INFER, _row(i, f"k-{i}")))
            status, headers, body = await _read(r)
            assert status == 200
            assert headers["server"] == "rollguard"  # answered by the fast path
            assert headers["x-request-id"] == f"k-{i}" == orjson.loads(body)["id"]
            assert headers["x-rollguard-variant"] == "1.0.0"
            assert headers["content-type"] == "application/json"
            assert "date" in headers
        # Three requests in one write, answered in the order asked.
        w.write(b"".join(_post(INFER, _row(i, f"p-{i}")) for i in range(3)))
        for i in range(3):
            status, headers, body = await _read(r)
            assert (status, orjson.loads(body)["id"]) == (200, f"p-{i}")
        # A request id from the header when the body has none.
        w.write(_post(INFER, _row(0), "X-Request-Id: from-header"))
        assert (await _read(r))[1]["x-request-id"] == "from-header"


async def test_other_requests_are_handed_to_aiohttp(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        async with _connect(server) as (r, w):
            w.write(_post(INFER, _row(0, "a")))
            assert (await _read(r))[0] == 200
            w.write(_get("/metrics"))
            status, headers, body = await _read(r)
            assert status == 200 and b"rollguard_requests_total" in body
            assert headers["server"] != "rollguard"  # aiohttp answered
            w.write(_post(INFER, _row(1, "b")))  # the connection stays aiohttp's
            status, _, body = await _read(r)
            assert (status, orjson.loads(body)["id"]) == (200, "b")
        # Infer, then a GET in the same write: the GET is cut out of the read exactly.
        async with _connect(server) as (r, w):
            w.write(_post(INFER, _row(0, "c")) + _get("/v2/health/live") + _post(INFER, _row(2)))
            assert [(await _read(r))[0] for _ in range(3)] == [200, 200, 200]
        # Percent-escapes in the path are decoded as aiohttp's router does.
        async with _connect(server) as (r, w):
            w.write(_post("/v2/models/fr%61ud/infer?q=1", _row(0)))
            status, headers, _ = await _read(r)
            assert (status, headers["server"]) == (200, "rollguard")
        # Expect: 100-continue goes to aiohttp, which sends the interim answer.
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}{INFER}"
            async with http.post(url, data=_row(0, "e"), expect100=True) as resp:
                assert resp.status == 200 and (await resp.json())["id"] == "e"
            async with http.get(f"{server.url}{INFER}") as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "POST"
            async with http.post(f"{server.url}/v2/models/nope/infer", data=_row(0)) as resp:
                assert resp.status == 404 and "error" in await resp.json()
                assert resp.headers["x-request-id"]


async def test_chunked_body_connection_close_and_http10(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    body = _row(3, "ch")
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        async with _connect(server) as (r, w):
            head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 50]), body[i : i + 50])
                              for i in range(0, len(body), 50))  # fmt: skip
            w.write(head.encode() + chunks + b"0\r\n\r\n")
            status, headers, answer = await _read(r)
            assert (status, orjson.loads(answer)["id"]) == (200, "ch")
            w.write(_post(INFER, body, "Connection: close"))
            status, headers, _ = await _read(r)
            assert (status, headers["connection"]) == (200, "close")
            assert await r.read() == b""  # closed
        async with _connect(server) as (r, w):
            w.write(_post(INFER, body, version="1.0"))
            whole = await r.read()  # all of it: the server closes after the answer
            status_head, _, answer = whole.partition(b"\r\n\r\n")
            assert status_head.startswith(b"HTTP/1.0 200") and b"Connection" not in status_head
            assert orjson.loads(answer)["id"] == "ch"
        async with _connect(server) as (r, w):
            w.write(_post(INFER, body, "Connection: keep-alive", version="1.0"))
            status, headers, _ = await _read(r)
            assert (status, headers["connection"]) == (200, "keep-alive")
            w.write(_post(INFER, body, "Connection: keep-alive", version="1.0"))
            assert (await _read(r))[0] == 200


async def test_oversized_and_malformed_requests(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path, registry, max_body_bytes=4096) as server:
        async with _connect(server) as (r, w):
            w.write(_post(INFER, b"x" * 5000, "X-Request-Id: big"))
            status, headers, body = await _read(r)
            assert (status, headers["x-request-id"]) == (413, "big")
            assert orjson.loads(body)["error"] == "body of 5000 bytes exceeds the limit of 4096"
            assert await r.read() == b""
        async with _connect(server) as (r, w):  # chunked: found too large while reading
            head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            w.write(head.encode() + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(5)))
            status, _, body = await _read(r)
            assert status == 413
            assert orjson.loads(body)["error"] == "body exceeds the limit of 4096 bytes"
        async with _connect(server) as (r, w):
            w.write(_post(INFER, _row(0, "before")) + b"NOT HTTP AT ALL\r\n\r\n")
            status, _, body = await _read(r)
            assert (status, orjson.loads(body)["id"]) == (200, "before")
            status, headers, body = await _read(r)
            assert status == 400 and "malformed HTTP request" in orjson.loads(body)["error"]
            assert headers["x-request-id"]
            assert await r.read() == b""
        # Still healthy, nothing left counted in flight.
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{server.url}{INFER}", data=_row(0)) as resp,
        ):
            assert resp.status == 200
        assert server.app[LIMITS].inflight == 0


async def test_client_leaving_mid_body_or_mid_request(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.3.0")  # 1.3.0: ~50 ms a call
    async with serve(tmp_path, registry) as server:
        limits = server.app[LIMITS]
        async with _connect(server) as (r, w):
            w.write(_post(INFER, _row(0))[:-40])  # the body cut short
            await w.drain()
        async with _connect(server) as (r, w):
            w.write(_post("/v2/models/fraud/versions/1.3.0/infer", _row(0)))
            await _until(lambda: limits.inflight == 1)
        await _until(lambda: limits.inflight == 0)
        async with _connect(server) as (r, w):
            w.write(_post(INFER, _row(0, "after")))
            status, _, body = await _read(r)
            assert (status, orjson.loads(body)["id"]) == (200, "after")


async def test_overload_answers_503_with_retry_after(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.3.0")
    async with serve(tmp_path, registry, max_inflight=1) as server:
        url = "/v2/models/fraud/versions/1.3.0/infer"
        async with _connect(server) as (r1, w1), _connect(server) as (r2, w2):
            w1.write(_post(url, _row(0)))
            await _until(lambda: server.app[LIMITS].inflight == 1)
            w2.write(_post(url, _row(0), "X-Request-Id: turned-away"))
            status, headers, body = await _read(r2)
            assert (status, headers["retry-after"]) == (503, "1")
            assert headers["x-request-id"] == "turned-away"
            assert "in flight" in orjson.loads(body)["error"]
            assert (await _read(r1))[0] == 200
        text = server.gateway.metrics.registry.get_sample_value(
            "rollguard_rejected_requests_total", {"model": "fraud", "reason": "overloaded"}
        )
        assert text == 1.0


async def test_upstream_model_through_the_fast_path(tmp_path: Path) -> None:
    upstream, endpoint = await _upstream("ok")
    write_remote_version(tmp_path / "registry", "1", endpoint)
    body = orjson.dumps(
        {
            "id": "u-1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
        }
    )
    try:
        async with serve(tmp_path, tmp_path / "registry") as server, _connect(server) as (r, w):
            for _ in range(3):
                w.write(_post("/v2/models/remote/infer", body))
                status, headers, answer = await _read(r)
                assert (status, headers["server"]) == (200, "rollguard")
                doc = orjson.loads(answer)
                assert (doc["model_name"], doc["id"]) == ("remote", "u-1")
                assert _label(answer) == 1
    finally:
        await upstream.cleanup()


async def test_idle_connections_close_and_shutdown_lets_requests_finish(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.3.0")
    async with (
        serve(tmp_path, registry, {"keepalive_s": 0.2}) as server,
        _connect(server) as (r, w),
    ):
        w.write(_post(INFER, _row(0)))
        assert (await _read(r))[0] == 200
        assert await asyncio.wait_for(r.read(), 5.0) == b""  # idle past keepalive_s
    slow = "/v2/models/fraud/versions/1.3.0/infer"
    async with serve(tmp_path, registry) as server:
        reader, writer = await asyncio.open_connection(*server.url[7:].split(":"))
        writer.write(_post(slow, _row(0, "last")))
        await _until(lambda: server.app[LIMITS].inflight == 1)
    # The server is closed now; the request that was running was still answered.
    status, headers, body = await _read(reader)
    assert (status, orjson.loads(body)["id"], headers["connection"]) == (200, "last", "close")
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("fast_path", [True, False])
async def test_fast_path_setting(
    tmp_path: Path, make_registry: MakeRegistry, fast_path: bool
) -> None:
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), fast_path=fast_path) as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}{INFER}", data=_row(0, "s")) as resp,
    ):
        assert resp.status == 200 and (await resp.json())["id"] == "s"
        assert (resp.headers["server"] == "rollguard") is fast_path


_SAME_AS_AIOHTTP = [
    "/v2/models/fraud/infer",
    "/v2/models/fr%61ud/infer",
    "/v2/models/fraud/infer?x=1&y=%2F",
    "/v2/models/fraud/infer/",
    "//v2/models/fraud/infer",
    "/v2/models/fraud/versions/1.0.0/infer",
    "/v2/models/fraud/versions/1%2E0%2E0/infer",
    "/v2/models/fraud/versions/9.9/infer",
    "/v2/models/fr%2Fud/infer",
    "/v2/models/fr%25ud/infer",
    "/v2/models/%7Bfraud%7D/infer",
    "/v2/models/fra%ZZud/infer",
    "/v2/models/fraud%3Fx/infer",
    "/v2/models/caf%C3%A9/infer",
    "/v2/models//infer",
]


async def test_answers_match_aiohttps_byte_for_byte(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Every request, to a server with the fast path and one without: same answers."""
    import gzip

    registry = make_registry("fraud/1.0.0")
    row = _row(0)
    requests = [_post(path, row, "X-Request-Id: same") for path in _SAME_AS_AIOHTTP]
    requests += [
        _post(INFER, b"not json", "X-Request-Id: same"),
        _post(INFER, _row(1, "body-id")),
        _post(INFER, _row(1, "body-id"), "X-REQUEST-ID: header-id"),
        _post(INFER, _row(0, "a\r\nb"), "X-Request-Id: same"),
        _post(INFER, gzip.compress(row), "Content-Encoding: gzip", "X-Request-Id: same"),
        _post(INFER, row, "Expect: 100-continue", "X-Request-Id: same"),
    ]
    answers: dict[bool, list[tuple[int, dict[str, str], object]]] = {}
    for fast_path in (True, False):
        answers[fast_path] = []
        async with serve(tmp_path / str(fast_path), registry, fast_path=fast_path) as server:
            for request in requests:
                async with _connect(server) as (r, w):
                    w.write(request)
                    status, headers, body = await _read(r)
                    kept = ("content-type", "x-request-id", "x-rollguard-variant", "retry-after")
                    answers[fast_path].append(
                        (
                            status,
                            {k: v for k, v in headers.items() if k in kept},
                            orjson.loads(body),
                        )
                    )
    for request, fast, slow in zip(requests, answers[True], answers[False], strict=True):
        assert fast == slow, request
