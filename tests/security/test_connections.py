"""Hostile bytes at both ports: every HTTP-level error is a 4xx/5xx `{"error": ...}`,
request ids with control characters are refused 400 alike, a valid request pipelined
before garbage is answered first, and a client leaving mid-body leaves no traceback."""

from __future__ import annotations

import functools
import logging
from contextlib import AsyncExitStack
from pathlib import Path

import orjson
import pytest

from rollguard.proxy import admin
from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.rawhttp import Answer, closed, connect, exchange, post, read, until
from tests.proxy.support import Server, serve

INFER = "/v2/models/fraud/infer"
CONTROL = ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\t"]


@functools.cache
def _row() -> list[float]:
    return [float(x) for x in load_eval_data()[0][0]]


def _body(request_id: str | None = None) -> bytes:
    doc: dict[str, object] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": _row()}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def _raw_header(path: str, request_id: str, method: str = "GET") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode()
    return head + b"X-Request-Id: " + request_id.encode("latin-1") + b"\r\n\r\n"


def _is_json_error(answer: Answer, status: int | None = None) -> None:
    assert answer.headers["content-type"].startswith("application/json"), answer
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]
    if status is not None:
        assert answer.status == status, (answer.status, answer.body)
    else:
        assert 400 <= answer.status < 600


def _served(server: Server) -> float:
    """Inference answers counted so far, whatever their code."""
    total = 0.0
    for family in server.running.metrics.registry.collect():
        if family.name == "rollguard_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize("char", CONTROL, ids=[f"0x{ord(c):02x}" for c in CONTROL])
async def test_control_characters_in_request_ids_are_400_on_both_ports(
    tmp_path: Path, make_registry: MakeRegistry, char: str
) -> None:
    bad = f"a{char}b"
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        before = _served(server)
        # The data port: in the header, on any route; in a V2 body's id.
        for request in (
            _raw_header("/v2/health/live", bad),
            _raw_header("/v2/nowhere", bad),
            _raw_header(INFER, bad, "POST")[:-2] + b"Content-Length: 2\r\n\r\n{}",
            post(INFER, _body(bad)),
        ):
            answer = await exchange(server.url, request)
            _is_json_error(answer, 400)
            assert answer.headers["x-request-id"].isprintable()
        # The admin port alike.
        answer = await exchange(server.admin_url, _raw_header("/metrics", bad))
        _is_json_error(answer, 400)
        assert _served(server) == before  # refused, never counted as served


async def test_request_ids_longer_than_256_characters_are_400_on_both_ports(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Found by an adversarial probe: a megabyte id was kept whole by the feedback index
    (100 requests: +95 MB of RSS) and echoed in a header clients could not read."""
    longest, bad = "i" * 256, "i" * 257
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        before = _served(server)
        for request in (
            _raw_header("/v2/health/live", bad),
            _raw_header(INFER, bad, "POST")[:-2] + b"Content-Length: 2\r\n\r\n{}",
            post(INFER, _body(bad)),
            post(INFER, _body("i" * 1_000_000)),
        ):
            answer = await exchange(server.url, request)
            _is_json_error(answer, 400)
            assert "at most 256 are taken" in answer.json()["error"]
            assert len(answer.headers["x-request-id"]) <= 256
        answer = await exchange(server.admin_url, _raw_header("/metrics", bad))
        _is_json_error(answer, 400)
        assert _served(server) == before  # refused, never counted as served
        answer = await exchange(server.url, post(INFER, _body(longest)))
        assert answer.status == 200 and answer.headers["x-request-id"] == longest


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on a plain port
        b"GET /metrics HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-Long: " + b"x" * 70_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /admin/rollouts/x/pause HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /admin/rollouts/x/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["not-http", "tls", "bad-header", "long-header", "long-target", "bad-length", "bad-chunk"],
)
async def test_http_level_errors_are_json_on_both_ports(
    tmp_path: Path, make_registry: MakeRegistry, garbage: bytes
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        for url in (server.url, server.admin_url):
            answer = await exchange(url, garbage)
            _is_json_error(answer)
            assert answer.status < 500, (url, answer.status, answer.body)


async def test_admin_body_over_its_limit_is_a_json_413(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
        answer = await exchange(server.admin_url, post("/admin/rollouts/x/pause", big))
        _is_json_error(answer, 413)


async def test_valid_requests_pipelined_before_garbage_are_answered_first(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """The data port (the admin port is served by the same server)."""
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0")) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(INFER, _body("one")) + post(INFER, _body("two")) + b"\x00\x01 junk\r\n\r\n")
        for expected in ("one", "two"):
            answer = await read(r)
            assert (answer.status, answer.json()["id"]) == (200, expected)
        _is_json_error(await read(r), 400)
        assert await closed(r)


async def test_clients_leaving_mid_body_leave_no_traceback(
    tmp_path: Path, make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        for url, path in ((server.url, INFER), (server.admin_url, "/admin/rollouts/x/pause")):
            for _ in range(3):
                async with connect(url) as (_, w):
                    w.write(post(path, _body())[:-40])
                    await w.drain()
        await until(lambda: server.running.capacity.connections == 0)
        await until(lambda: server.running.admin_capacity.connections == 0)
        answer = await exchange(server.url, post(INFER, _body("after")))
        assert answer.status == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.getMessage()) for r in loud]
    assert "Traceback" not in caplog.text


async def test_a_client_holding_every_admin_connection_never_reaches_the_data_port(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """The admin port's connection cap is its own: idle connections filling it turn the
    next admin client away with a JSON 503, and the data port serves as before."""
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server, AsyncExitStack() as held:
        for _ in range(admin.MAX_CONNECTIONS):
            await held.enter_async_context(connect(server.admin_url))
        await until(lambda: server.running.admin_capacity.connections == admin.MAX_CONNECTIONS)
        _is_json_error(await exchange(server.admin_url, b"GET /metrics HTTP/1.1\r\n\r\n"), 503)
        assert (await exchange(server.url, post(INFER, _body("served")))).status == 200
