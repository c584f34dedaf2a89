"""A lean pooled HTTP/1.1 client for one upstream origin: asyncio.Protocol + httptools.

Why not aiohttp's ClientSession: a forwarded infer request needs a status and a body,
and ClientSession spends several times the Python of the whole round trip on
headers, cookies, tracing and stream readers it does not need (load_tests/bench_upstream.py).

One request costs one pre-built bytes buffer written with one `transport.write`, one
Future and one timer handle; the parser (llhttp in C) calls back into Python only for
the handful of headers, the body and the end of the message.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from serving.errors import UpstreamError, UpstreamTimeout

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class _Failed(Exception):
    """The exchange failed; the text is the reason, the caller adds the URL."""


class _Stale(_Failed):
    """A reused keep-alive connection closed before any byte of the response."""


class _Expired(Exception):
    """The request's deadline passed."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._got_bytes = False
        self._headers_done = False
        self._delimited = False  # Content-Length or chunked: the body does not end at EOF
        self._failure = ""
        self.reused = False
        self.reusable = False
        self.idle = False
        self.lost: asyncio.Future[None] = loop.create_future()

    def exchange(self, payload: bytes, deadline: float) -> asyncio.Future[tuple[int, bytes]]:
        """Send one request; the Future gives (status, body) or fails with _Failed/_Expired."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._chunks = []
        self._size = 0
        self._got_bytes = self._headers_done = self._delimited = self.reusable = False
        self._timer = self._loop.call_at(deadline, self._expire)
        assert self._transport is not None
        if self._transport.is_closing():  # the server's FIN is in, connection_lost is not yet
            self._fail(_Stale("kept-alive connection closed before the request"))
        else:
            self._transport.write(payload)
        return waiter

    def abort(self) -> None:
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.abort()

    def _expire(self) -> None:
        self._fail(_Expired())

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the stream is out of step
            self.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_Failed("malformed response: unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(_Failed(self._failure or f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if not self.lost.done():
            self.lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is None:
            if self.idle:
                self._pool._drop_idle(self)
            return
        if self._headers_done and not self._delimited:
            self._finish()  # an HTTP/1.0-style body that ends where the connection does
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if self._got_bytes:
            self._fail(_Failed(f"connection lost mid-response{reason}"))
        elif self.reused:
            self._fail(_Stale(f"kept-alive connection closed before a response{reason}"))
        else:
            self._fail(_Failed(f"connection closed before a response{reason}"))

    # --- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self._delimited = True
            if int(value) > self._pool.max_response_bytes:
                self._too_large()
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._delimited = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._pool.max_response_bytes:
            self._too_large()
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is None:
            return
        status = self._parser.get_status_code()
        if status < 200 and status != 101:  # an interim 1xx: the real answer follows
            self._chunks = []
            self._size = 0
            self._headers_done = self._delimited = False
            return
        self._finish()

    def _too_large(self) -> None:
        self._failure = f"response body larger than {self._pool.max_response_bytes} bytes"
        raise _Failed(self._failure)  # httptools re-raises it as HttpParserCallbackError

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        assert self._timer is not None and self._transport is not None
        self._timer.cancel()
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.reused = True
        self.reusable = self._parser.should_keep_alive() and not self._transport.is_closing()
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))
        if not self.reusable:
            self._transport.close()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request's head up to its Content-Length (see `UpstreamPool.prepare`)."""

    head: bytes
    path: str


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one `http://host[:port][/prefix]` upstream.

    `https://` URLs are supported through `loop.create_connection(ssl=...)` with the
    system's trust store, or `ssl_context` when given. Request paths are appended to the
    URL's path prefix.

    Idle connections are reused newest first; with none idle a new one is opened, up to
    `max_connections`, beyond which requests wait in FIFO order. One deadline of
    `timeout_s` covers waiting for a connection, connecting, writing and the whole
    response. A connection that timed out, failed or whose request was cancelled is
    closed, never reused.

    Retries: a request whose *reused* keep-alive connection turns out closed before any
    byte of the response (the server dropped the idle connection as the request went
    out) is sent once more on another connection. That replays the request, which is
    safe for what this client sends (V2 infer POSTs and GETs are idempotent for our
    purposes); a request on a new connection, or one that saw response bytes, is never
    replayed (Go's net/http draws the same line).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        max_connections: int = 64,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL {base_url!r} is not an http(s)://host URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"upstream URL {base_url!r} has a query, fragment or user info")
        if not timeout_s > 0 or max_connections < 1 or max_response_bytes < 1:
            raise ValueError(
                f"upstream {base_url!r}: timeout_s ({timeout_s}), max_connections "
                f"({max_connections}) and max_response_bytes ({max_response_bytes}) must be > 0"
            )
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (
            (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        )
        self._host_header = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._connections: set[_Connection] = set()
        self._slots = 0  # connections open or being opened, each held by a request or idle
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; UpstreamError / UpstreamTimeout name the URL."""
        return await self.send(self.prepare(method, path, headers), body)

    def prepare(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> Prepared:
        """A request head checked and encoded once, for any number of this pool's `send`s."""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
        lines = 2
        if headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            lines += len(headers)
        # A CR or LF inside a method, path or header would split the request in two.
        if head.count("\n") != lines or head.count("\r") != lines or method == "HEAD":
            raise ValueError(f"{method!r} {path!r} {headers!r}: no CR/LF in fields, no HEAD")
        return Prepared(head.encode("latin-1"), path)

    async def send(self, prepared: Prepared, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a prepared request with `body` (None: no Content-Length)."""
        path = prepared.path
        if self._closed:
            raise UpstreamError(f"{self.url}{path}: the connection pool is closed")
        if body is None:
            payload = prepared.head + b"\r\n"
        else:
            payload = b"%sContent-Length: %d\r\n\r\n%s" % (prepared.head, len(body), body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        conn = self._idle.pop() if self._idle else None
        retried = False
        try:
            while True:
                if conn is None:
                    conn = await self._connect(loop, deadline)
                else:
                    conn.idle = False
                try:
                    return await conn.exchange(payload, deadline)
                except _Stale:
                    if retried:
                        raise
                    retried = True
                    self._release(conn)
                    conn = None
        except (_Expired, TimeoutError):
            raise UpstreamTimeout(
                f"{self.url}{path}: no answer within {self.timeout_s:g} s"
            ) from None
        except _Failed as exc:
            raise UpstreamError(f"{self.url}{path}: {exc}") from None
        except OSError as exc:
            raise UpstreamError(f"{self.url}{path}: unreachable: {exc}") from None
        finally:
            if conn is not None:
                self._release(conn)

    async def close(self) -> None:
        """Close every connection; requests in flight, waiting or later raise UpstreamError."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_Failed("the connection pool was closed"))
        self._idle.clear()
        for conn in self._connections:
            conn.abort()
        lost = [conn.lost for conn in self._connections]
        self._connections.clear()
        if lost:
            await asyncio.wait(lost, timeout=1.0)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        """A connection holding one slot: handed over by a finished request, or new."""
        if self._closed:
            raise _Failed("the connection pool was closed")
        if self._slots < self.max_connections:
            self._slots += 1
        else:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._give(waiter.result())  # handed over as we gave up: pass it on
                waiter.cancel()
                raise
            if handed is not None:
                handed.idle = False
                return handed
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except BaseException:
            self._give(None)
            raise
        if self._closed:
            conn.abort()
            self._give(None)
            raise _Failed("the connection pool was closed")
        self._connections.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            self._give(conn)
        else:
            conn.abort()
            self._connections.discard(conn)
            self._give(None)

    def _give(self, conn: _Connection | None) -> None:
        """Pass a slot (a live connection, or None: the right to open one) on."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._slots -= 1
        else:
            conn.idle = True
            self._idle.append(conn)

    def _drop_idle(self, conn: _Connection) -> None:
        """An idle connection was closed by the server: free its slot."""
        conn.idle = False
        self._connections.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
            self._give(None)
