"""A lean pooled HTTP/1.1 client for one upstream origin (connections: serving/connection.py).

Why not aiohttp's ClientSession: a forwarded infer request needs a status and a body,
and ClientSession spends several times the Python of the whole round trip on
headers, cookies, tracing and stream readers it does not need (load_tests/bench_upstream.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from rollguard.serving.connection import Connection, Expired, Failed, Reply, Stale
from rollguard.serving.errors import UpstreamError, UpstreamTimeout

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110)
_TOKENS: set[str] = set()  # names seen to be tokens (bounded: a few allow-listed names)


@functools.cache
def _system_trust() -> ssl.SSLContext:
    """The one verifying client context every `https://` pool without its own shares:
    each context holds the system's CA certificates parsed (about 2 MiB), and none is
    changed once made. Read at the first https upstream, not again at each (re)load."""
    return ssl.create_default_context()


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
        self._ssl = (ssl_context or _system_trust()) if parts.scheme == "https" else None
        self._host_header = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._idle: list[Connection] = []
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._connections: set[Connection] = set()
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
        reply = await self.send(self.prepare(method, path, headers), body)
        return reply.status, reply.body

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

    async def send(
        self, prepared: Prepared, body: bytes | None = None, extra: bytes = b""
    ) -> Reply:
        """The Reply to a prepared request with `body` (None: no Content-Length) and
        `extra` header lines (from `header_lines`)."""
        path = prepared.path
        if self._closed:
            raise UpstreamError(f"{self.url}{path}: the connection pool is closed")
        if body is None:
            payload = prepared.head + extra + b"\r\n"
        else:
            payload = b"%s%sContent-Length: %d\r\n\r\n%s" % (prepared.head, extra, len(body), body)
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
                except Stale:
                    if retried:
                        raise
                    retried = True
                    self._release(conn)
                    conn = None
        except (Expired, TimeoutError):
            raise UpstreamTimeout(
                f"{self.url}{path}: no answer within {self.timeout_s:g} s"
            ) from None
        except Failed as exc:
            raise UpstreamError(f"{self.url}{path}: {exc}") from None
        except OSError as exc:
            raise UpstreamError(f"{self.url}{path}: unreachable: {exc}") from None
        finally:
            if conn is not None:
                self._release(conn)

    @staticmethod
    def header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
        """Header lines for `send`'s `extra`; ValueError for a name or value that could
        split the request (CR, LF) or is not a token / not latin-1."""
        lines = []
        for name, value in headers:
            if name not in _TOKENS:  # the allow-list's few names, matched once each
                if not _TOKEN.fullmatch(name):
                    raise ValueError(f"header {name!r} cannot be forwarded as it is")
                if len(_TOKENS) < 1024:
                    _TOKENS.add(name)
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} cannot be forwarded as it is")
            lines.append(f"{name}: {value}\r\n")
        try:
            return "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("a forwarded header value is not latin-1 text") from None

    async def close(self) -> None:
        """Close every connection; requests in flight, waiting or later raise UpstreamError."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Failed("the connection pool was closed"))
        self._idle.clear()
        for conn in self._connections:
            conn.abort()
        lost = [conn.lost for conn in self._connections]
        self._connections.clear()
        if lost:
            await asyncio.wait(lost, timeout=1.0)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        """A connection holding one slot: handed over by a finished request, or new."""
        if self._closed:
            raise Failed("the connection pool was closed")
        if self._slots < self.max_connections:
            self._slots += 1
        else:
            waiter: asyncio.Future[Connection | None] = loop.create_future()
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
                    lambda: Connection(loop, self.max_response_bytes, self._drop_idle),
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
            raise Failed("the connection pool was closed")
        self._connections.add(conn)
        return conn

    def _release(self, conn: Connection) -> None:
        if conn.reusable and not self._closed:
            self._give(conn)
        else:
            conn.abort()
            self._connections.discard(conn)
            self._give(None)

    def _give(self, conn: Connection | None) -> None:
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

    def _drop_idle(self, conn: Connection) -> None:
        """An idle connection was closed by the server: free its slot."""
        conn.idle = False
        self._connections.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
            self._give(None)
