"""UpstreamPool against real servers on loopback: aiohttp, and raw asyncio sockets that
answer byte for byte what a test scripts (chunked, close, HTTP/1.0, garbage, silence)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from aiohttp import web

from rollguard.serving.errors import UpstreamError, UpstreamTimeout
from rollguard.serving.upstream import UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes] | None:
    """(request line, body) of the next request on a connection; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return lines[0], await reader.readexactly(length)


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class RawServer:
    """An asyncio TCP server on 127.0.0.1: `handler(reader, writer, n)` runs for the n-th
    connection; the server counts connections and notes when each one has ended."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.active = 0  # connections whose handler has not finished
        self.ended = asyncio.Event()  # set each time a connection's handler finishes
        self.url = ""
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()  # ends handlers still reading
        await wait_for(lambda: self.active == 0, self.ended)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        index = self.connections
        self.connections += 1
        self.active += 1
        try:
            await self.handler(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self.active -= 1
            self.ended.set()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    """Keep-alive: answers every request with its own body."""
    while (request := await read_request(reader)) is not None:
        writer.write(ok(request[1]))


async def wait_for(condition: Callable[[], bool], event: asyncio.Event) -> None:
    """Wait (at most 5 s) until `condition` holds, re-checking whenever `event` fires."""
    async with asyncio.timeout(5):
        while not condition():
            event.clear()
            await event.wait()


# --- against aiohttp ---------------------------------------------------------------------


class AiohttpUpstream:
    def __init__(self) -> None:
        self.transports: set[object] = set()
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.transports.add(request.transport)
        self.paths.append(request.path)
        name = request.match_info["name"]
        if name == "echo":
            body = await request.read()
            return web.Response(body=body, content_type="application/json")
        if name == "missing":
            return web.json_response({"error": "no such model"}, status=404)
        if name == "big":
            return web.Response(body=bytes(range(256)) * 8192)  # 2 MiB
        response = web.StreamResponse()  # "chunked"
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"alpha-", b"beta-", b"gamma"):
            await response.write(piece)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def aiohttp_server(
    upstream: AiohttpUpstream, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/v2/{name}", upstream.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


async def test_aiohttp_server_keep_alive_prefix_statuses_chunked_and_big() -> None:
    upstream = AiohttpUpstream()
    async with aiohttp_server(upstream) as url:
        pool = UpstreamPool(f"{url}/v2/", timeout_s=5)
        headers = {"Content-Type": "application/json"}
        assert await pool.request("POST", "/echo", b'{"id": 1}', headers) == (200, b'{"id": 1}')
        assert await pool.request("POST", "/echo", b"", headers) == (200, b"")
        status, body = await pool.request("GET", "/missing")
        assert (status, body) == (404, b'{"error": "no such model"}')
        assert await pool.request("GET", "/chunked") == (200, b"alpha-beta-gamma")
        assert await pool.request("GET", "/big") == (200, bytes(range(256)) * 8192)
        await pool.close()
    assert upstream.paths == ["/v2/echo", "/v2/echo", "/v2/missing", "/v2/chunked", "/v2/big"]
    assert len(upstream.transports) == 1  # all five on one kept-alive connection


async def test_https_with_a_trusted_self_signed_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        *("-addext", "subjectAltName=IP:127.0.0.1"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    upstream = AiohttpUpstream()
    async with aiohttp_server(upstream, server_context) as url:
        pool = UpstreamPool(url, timeout_s=5, ssl_context=ssl.create_default_context(cafile=cert))
        assert await pool.request("POST", "/v2/echo", b"secret") == (200, b"secret")
        assert await pool.request("GET", "/v2/chunked") == (200, b"alpha-beta-gamma")
        await pool.close()
        untrusting = UpstreamPool(url, timeout_s=5)  # the system store does not know the cert
        with pytest.raises(UpstreamError, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
            await untrusting.request("GET", "/v2/chunked")
        await untrusting.close()


# --- framing, against raw servers (also run on the default event loop below) --------------


async def test_chunked_body_split_across_writes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            await writer.drain()
            writer.write(b"lo\r\n6\r\n world\r\n0\r\n\r\n")

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=5)
        assert await pool.request("GET", "/") == (200, b"hello world")
        assert await pool.request("GET", "/") == (200, b"hello world")
        await pool.close()
    assert server.connections == 1


async def test_connection_close_and_http_1_0_are_not_reused() -> None:
    answers = [
        ok(b"first", "Connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
        b"HTTP/1.0 201 Created\r\n\r\nthird, ended by EOF",  # no length: the body runs to EOF
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"fourth"),  # an interim 1xx first
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if await read_request(reader) is not None:
            writer.write(answers[n])

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=5)
        assert await pool.request("GET", "/") == (200, b"first")
        assert await pool.request("GET", "/") == (200, b"second")
        assert await pool.request("GET", "/") == (201, b"third, ended by EOF")
        assert await pool.request("GET", "/") == (200, b"fourth")
        await pool.close()
    assert server.connections == 4


async def test_a_reused_connection_dropped_under_a_request_is_retried_once() -> None:
    """The server answers one request per connection and drops the next one unanswered."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        request = await read_request(reader)
        assert request is not None
        writer.write(ok(f"{request[1].decode()} on {n}".encode()))
        await read_request(reader)  # the next request arrives: close without an answer

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=5)
        assert await pool.request("POST", "/", b"a") == (200, b"a on 0")
        assert await pool.request("POST", "/", b"b") == (200, b"b on 1")  # 0 dropped it
        assert await pool.request("POST", "/", b"c") == (200, b"c on 2")
        await pool.close()
    assert server.connections == 3


async def test_an_idle_connection_closed_by_the_server_is_not_used() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if await read_request(reader) is not None:
            writer.write(ok(b"bye"))  # keep-alive by the headers, closed all the same

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=5)
        for _ in range(3):
            assert await pool.request("GET", "/") == (200, b"bye")
        await pool.close()
    assert server.connections == 3


async def test_a_new_connection_closed_before_an_answer_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=5)
        with pytest.raises(UpstreamError, match=f"{server.url}/x: connection closed before"):
            await pool.request("POST", "/x", b"{}")
        await pool.close()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "connection lost mid-response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "lost mid-response"),
        (b"HTTP/1.1 200 O", "connection lost mid-response"),
        (b"SMTP ready\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1025\r\n\r\n", "larger than 1024 bytes"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n"
            + b"201\r\n"
            + b"x" * 513
            + b"\r\n0\r\n\r\n",
            "larger than 1024 bytes",
        ),
    ],
)
@pytest.mark.parametrize("server_closes", [True, False])
async def test_broken_truncated_and_oversized_answers_raise(
    answer: bytes, error: str, server_closes: bool
) -> None:
    """Each fails the request and closes the connection; a truncated answer with the
    connection left open is a timeout instead."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if await read_request(reader) is not None:
            writer.write(answer)
            await writer.drain()
        if not server_closes:
            await reader.read()  # until the client closes

    truncated = "lost" in error
    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=0.3, max_response_bytes=1024)
        expected = UpstreamTimeout if truncated and not server_closes else UpstreamError
        with pytest.raises(
            expected, match=error if expected is UpstreamError else "no answer"
        ) as info:
            await pool.request("GET", "/v2/x")
        assert str(info.value).startswith(f"{server.url}/v2/x: ")
        await wait_for(lambda: server.active == 0, server.ended)  # the client closed it
        assert server.connections == 1
        await pool.close()


async def test_silence_is_a_timeout_and_the_connection_is_closed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=0.2)
        with pytest.raises(
            UpstreamTimeout, match=rf"^{server.url}/infer: no answer within 0\.2 s$"
        ):
            await pool.request("POST", "/infer", b"{}")
        await wait_for(lambda: not server.active, server.ended)  # client closed it
        await pool.close()


async def answer_or_hang(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
) -> None:
    """Keep-alive: answers `/answer` at once; any other request never (returns when the
    client closes)."""
    while (request := await read_request(reader)) is not None:
        if " /answer " in request[0]:
            writer.write(ok(b"{}"))
            await writer.drain()
        else:
            await reader.read()
            return


async def test_each_silent_request_times_out_by_its_own_deadline_and_others_are_answered() -> None:
    """Requests sent at different times each give up at their own deadline; a request
    answered meanwhile on another connection is not touched."""

    limit = 0.5
    async with RawServer(answer_or_hang) as server:
        pool = UpstreamPool(server.url, timeout_s=limit)
        loop = asyncio.get_running_loop()

        async def timed(path: str) -> float:
            started = loop.time()
            with pytest.raises(UpstreamTimeout, match=r"no answer within 0\.5 s"):
                await pool.request("GET", path)
            return loop.time() - started

        first = asyncio.create_task(timed("/silent/1"))
        await asyncio.sleep(0.2)  # the second request starts later: a deadline of its own
        second = asyncio.create_task(timed("/silent/2"))
        status, _ = await pool.request("GET", "/answer")
        assert status == 200
        for took in (await first, await second):
            assert limit <= took < limit + 5  # its own deadline, never the first's; not hung
        await pool.close()


async def test_a_kept_alive_connection_times_out_each_request_by_its_own_deadline() -> None:
    """One connection's timer outlives the request it was set for (it moves only when a
    deadline comes earlier): a request answered, then a silent one on the same
    connection, which gives up at its own deadline, never at the first one's."""

    limit = 0.5
    async with RawServer(answer_or_hang) as server:
        pool = UpstreamPool(server.url, timeout_s=limit, max_connections=1)
        loop = asyncio.get_running_loop()
        status, _ = await pool.request("GET", "/answer")
        assert status == 200
        await asyncio.sleep(0.3)  # the next request's deadline is 0.3 s past the first's
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match=r"no answer within 0\.5 s"):
            await pool.request("GET", "/silent")
        assert limit <= loop.time() - started < limit + 5
        assert server.connections == 1  # the same connection: its timer, re-armed
        status, _ = await pool.request("GET", "/answer")  # a new connection answers
        assert status == 200
        await pool.close()


async def test_refused_port_is_an_upstream_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    pool = UpstreamPool(url, timeout_s=5)
    with pytest.raises(UpstreamError, match=f"^{url}/ready: unreachable: ") as info:
        await pool.request("GET", "/ready")
    assert not isinstance(info.value, UpstreamTimeout)
    await pool.close()


async def test_many_concurrent_requests_share_eight_connections() -> None:
    async with RawServer(echo) as server:
        pool = UpstreamPool(server.url, timeout_s=10, max_connections=8)
        ids = [f'{{"id": "{n}"}}'.encode() for n in range(200)]
        answers = await asyncio.gather(*(pool.request("POST", "/infer", i) for i in ids))
        assert answers == [(200, i) for i in ids]
        assert 1 <= server.connections <= 8
        await pool.close()


async def test_waiters_beyond_the_limit_are_served_in_order() -> None:
    release = asyncio.Event()
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request[1])
            await release.wait()
            writer.write(ok(request[1]))

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=10, max_connections=1)
        bodies = [str(n).encode() for n in range(6)]
        tasks = [asyncio.create_task(pool.request("POST", "/", b)) for b in bodies]
        release.set()
        assert await asyncio.gather(*tasks) == [(200, b) for b in bodies]
        assert seen == bodies
        assert server.connections == 1
        await pool.close()


async def test_waiting_for_a_connection_counts_against_the_deadline() -> None:
    seen: list[str] = []
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request[0])
            arrived.set()  # and never answers

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=30, max_connections=1)
        holder = asyncio.create_task(pool.request("GET", "/a"))  # holds the only connection
        await arrived.wait()
        pool.timeout_s = 0.2
        with pytest.raises(UpstreamTimeout, match=r"/b: no answer within 0\.2 s"):
            await pool.request("GET", "/b")
        assert seen == ["GET /a HTTP/1.1"]  # /b timed out waiting, never sent
        await pool.close()
        with pytest.raises(UpstreamError, match="/a: "):
            await holder
        assert server.connections == 1


async def test_a_cancelled_request_closes_its_connection() -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            await read_request(reader)
            arrived.set()
            await reader.read()  # until the client closes: never answers
        else:
            await echo(reader, writer, n)

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=10, max_connections=1)
        task = asyncio.create_task(pool.request("POST", "/", b"lost"))
        await arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: server.connections == 1 and not server.active, server.ended)
        assert await pool.request("POST", "/", b"next") == (200, b"next")
        assert server.connections == 2
        await pool.close()


async def test_close_fails_requests_in_flight_waiting_and_later() -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()

    async with RawServer(handler) as server:
        pool = UpstreamPool(server.url, timeout_s=10, max_connections=1)
        in_flight = asyncio.create_task(pool.request("GET", "/a"))
        waiting = asyncio.create_task(pool.request("GET", "/b"))
        await arrived.wait()
        await pool.close()
        for task in (in_flight, waiting):
            with pytest.raises(UpstreamError):
                await task
        with pytest.raises(UpstreamError, match="pool is closed"):
            await pool.request("GET", "/c")
        assert server.connections == 1


# --- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kwargs", "error"),
    [
        ("ftp://host/x", {}, "not an http"),
        ("http:///path", {}, "not an http"),
        ("http://host/x?q=1", {}, "query"),
        ("http://host", {"max_connections": 0}, "must be > 0"),
        ("http://host", {"timeout_s": 0}, "must be > 0"),
    ],
)
def test_bad_construction_is_a_value_error(url: str, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        UpstreamPool(url, **{"timeout_s": 1.0, **kwargs})


async def test_crlf_in_a_request_field_is_refused() -> None:
    pool = UpstreamPool("http://127.0.0.1:9", timeout_s=1)
    with pytest.raises(ValueError, match="CR/LF"):
        await pool.request("GET", "/x", None, {"X-Id": "1\r\nInjected: yes"})
    with pytest.raises(ValueError, match="CR/LF"):
        await pool.request("GET", "/x HTTP/1.1\r\nHost: evil\r\n\r\nGET /y")
    await pool.close()


# --- the same scenarios on asyncio's own event loop --------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [
        test_chunked_body_split_across_writes,
        test_connection_close_and_http_1_0_are_not_reused,
        test_a_reused_connection_dropped_under_a_request_is_retried_once,
        test_an_idle_connection_closed_by_the_server_is_not_used,
        test_silence_is_a_timeout_and_the_connection_is_closed,
        test_refused_port_is_an_upstream_error,
        test_many_concurrent_requests_share_eight_connections,
        test_a_cancelled_request_closes_its_connection,
        test_close_fails_requests_in_flight_waiting_and_later,
    ],
)
def test_on_the_default_event_loop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(scenario())


def test_forwarded_header_lines_refuse_what_could_split_or_is_not_a_field() -> None:
    lines = UpstreamPool.header_lines([("X-Request-Id", "abc"), ("traceparent", "00-ab-cd-01")])
    assert lines == b"X-Request-Id: abc\r\ntraceparent: 00-ab-cd-01\r\n"
    for name, value in [
        ("X Request", "a"),  # not a token
        ("X-Id:", "a"),
        ("", "a"),
        ("X-Request-Id", "a\r\nX-Evil: 1"),  # a name seen before, a value that splits
        ("X-Request-Id", "a\nb"),
        ("X-Request-Id", "caf\u00e9\u20ac"),  # not latin-1
    ]:
        with pytest.raises(ValueError, match="forward"):
            UpstreamPool.header_lines([(name, value)])
