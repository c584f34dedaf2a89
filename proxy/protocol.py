"""The data port's HTTP/1.1 server: one asyncio protocol per connection, httptools parsing.

A connection reads requests (keep-alive, pipelining, chunked bodies), hands each to the
`handle` coroutine and writes the answers in order. It owns what a server must:

- limits: a request head must arrive within `header_timeout_s` of its first byte, a
  body may pause at most that long between reads, an idle kept-alive connection closes
  after `keepalive_s`; bodies over `max_body` are refused with 413 before they are read;
- backpressure: at most `MAX_QUEUED` pipelined requests are buffered before the socket is
  no longer read, and a client that reads slower than we answer is waited for;
- `Expect: 100-continue` answered before the body is read, gzip/deflate bodies inflated
  within the body limit, malformed bytes answered 400 and the connection closed;
- a graceful `shutdown`: no new requests, the running one finishes, then close.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, cast

import httptools

from rollguard.proxy.errors import BodyTooLarge, MalformedRequest, ProxyError, UnsupportedEncoding
from rollguard.proxy.wire import HttpDate, Request, Response, encode_response

log = logging.getLogger("rollguard")

MAX_QUEUED = 4  # pipelined requests buffered before the socket is no longer read
LINGER_S = 10.0  # a closing connection drains the client this long, so no reset loses bytes
_MAX_URL = 8190
_MAX_HEADERS = 128
_MAX_HEADER_BYTES = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handle = Callable[[Request], Awaitable[Response]]
Refuse = Callable[[ProxyError, Mapping[str, str]], Response]


@dataclass(slots=True)
class _Refused:
    """A request we could not read, with the headers read before it went wrong."""

    error: ProxyError
    headers: Mapping[str, str]


@dataclass(eq=False)
class Server:
    """What every connection of the data port shares; called, it makes a connection."""

    handle: Handle  # answers a request; never raises
    refuse: Refuse  # the answer to a request we could not read (its headers so far)
    max_body: int
    header_timeout_s: float
    keepalive_s: float
    date: HttpDate = field(default_factory=HttpDate)
    connections: set[Connection] = field(default_factory=set)

    def __call__(self) -> Connection:
        return Connection(self)


class _Stop(Exception):
    """Raised in a parser callback: read nothing more on this connection."""


class Connection(asyncio.Protocol):
    """One client connection: reads requests, answers them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | _Refused] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._reading = True  # parse what arrives; False once closing or refused
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._peer_eof = False
        self._closing = False
        # One timer per connection, moved lazily: arming is a store, not a new handle.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the scheduled handle fires
        self._deadline: float | None = None  # when the connection expires; None: never
        self._in_message = False
        self._in_body = False
        # The message being read.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._encoding = ""
        self._continue_due = False  # a 100 Continue waits for earlier answers to go out
        # A request that offered an Upgrade, held until its body is read (see _feed).
        self._held: Request | None = None
        self._held_length = 0
        self._held_body = b""

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._server.connections.add(self)
        self._arm(self._server.keepalive_s)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return  # closing: read and dropped
        if self._in_body or self._held is not None:
            self._arm(self._server.header_timeout_s)  # a body may pause this long
        if self._held is not None:
            data = self._fill_held(data)
            if not data:
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An Upgrade offer (h2c, websocket) is ignored, as a server may: the
            # connection stays HTTP/1.1. llhttp stops at the end of the head, so the
            # request's body (if any) and what follows are read here.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        except httptools.HttpParserError as exc:
            if self._reading:  # not our own _Stop: the bytes are not HTTP
                self._reading = False
                if not isinstance(exc.__context__, _Stop | None):
                    raise  # a bug in a callback below
                self._enqueue(_Refused(MalformedRequest(f"malformed HTTP request: {exc}"), {}))
            return
        else:
            return
        self._parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if self._held is not None:
            rest = self._fill_held(rest)
        if rest and self._reading:
            self._feed(rest)

    def eof_received(self) -> bool:
        self._peer_eof = True
        if not self._queue:
            return False  # the transport closes itself
        self._closing = True  # answer what was asked, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.discard(self)
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # A request already running finishes and its answer is dropped; queued ones
        # never start.

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._arm(self._server.header_timeout_s)  # the whole head within this
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._chunks = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_URL:
            self._refuse(MalformedRequest(f"request target longer than {_MAX_URL} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if len(self._headers) >= _MAX_HEADERS or self._head_bytes > _MAX_HEADER_BYTES:
            self._refuse(MalformedRequest("request headers too many or too large"))
        key = name.decode("latin-1").lower()
        if key not in self._headers:
            self._headers[key] = value.decode("utf-8", "surrogateescape")

    def on_headers_complete(self) -> None:
        headers = self._headers
        self._encoding = headers.get("content-encoding", "identity").strip().lower()
        if self._encoding not in ("identity", "gzip", "deflate"):
            self._refuse(UnsupportedEncoding(f"Content-Encoding {self._encoding!r} is not taken"))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._server.max_body:
            self._refuse(BodyTooLarge(f"body of {length} bytes exceeds the limit of "
                                      f"{self._server.max_body}"))  # fmt: skip
        expect = headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self._refuse(UnsupportedEncoding(f"Expect {expect!r} is not supported"))
            transport = self._transport
            # A 100 must not overtake an earlier answer: else it goes once they are out.
            if transport is not None and not self._queue and self._worker is None:
                transport.write(_CONTINUE)
            else:
                self._continue_due = True
        self._in_body = True
        self._arm(self._server.header_timeout_s)  # now the body's pauses count

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._server.max_body:  # chunked: no length said up front
            self._refuse(BodyTooLarge(f"body exceeds the limit of {self._server.max_body} bytes"))
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._in_message = self._in_body = False
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if self._encoding != "identity":
            try:
                body = _inflate(body, self._encoding, self._server.max_body)
            except ProxyError as exc:
                self._refuse(exc)
        raw = self._url.decode("utf-8", "surrogateescape")
        if raw[:1] != "/":  # absolute-form (RFC 9112 3.2.2): the path is what is asked for
            raw = _origin_form(raw)
        path, _, query = raw.partition("?")
        request = Request(
            parser.get_method().decode("ascii", "replace"),
            path.partition("#")[0],
            query.partition("#")[0],
            self._headers,
            body,
            parser.get_http_version(),
            keep_alive,
        )
        if parser.should_upgrade():
            length = self._headers.get("content-length", "0")
            if "transfer-encoding" in self._headers or not length.isdigit():
                self._refuse(MalformedRequest("an Upgrade offer needs a Content-Length body"))
            if int(length) > 0:  # llhttp leaves the body to us: hold the request for it
                self._held, self._held_length, self._held_body = request, int(length), b""
                return
        self._enqueue(request)
        if not keep_alive:
            self._reading = False
            raise _Stop  # nothing after this request is read

    def _fill_held(self, data: bytes) -> bytes:
        """Add to the held request's body; once whole, answer it. The bytes beyond it."""
        held = self._held
        assert held is not None
        need = self._held_length - len(self._held_body)
        self._held_body += data[:need]
        if len(self._held_body) < self._held_length:
            return b""
        held.body, self._held = self._held_body, None
        self._enqueue(held)
        if not held.keep_alive:
            self._reading = False
            return b""
        return data[need:]

    def _refuse(self, error: ProxyError) -> NoReturn:
        """Answer `error` for the message being read; read nothing after it."""
        self._reading = False
        self._in_message = self._in_body = False
        self._enqueue(_Refused(error, self._headers))
        raise _Stop

    # --- answering -----------------------------------------------------------------------

    def _enqueue(self, item: Request | _Refused) -> None:
        self._queue.append(item)
        self._disarm()
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())
        elif len(self._queue) >= MAX_QUEUED:
            self._pause_reading()

    async def _work(self) -> None:
        queue = self._queue
        server = self._server
        try:
            while queue and self._transport is not None:
                item = queue[0]
                head_only = False
                if isinstance(item, Request):
                    response = await server.handle(item)
                    version, keep_alive = item.version, item.keep_alive
                    head_only = item.method == "HEAD"
                else:
                    response = server.refuse(item.error, item.headers)
                    version, keep_alive = "1.1", False
                if self._drained is not None:
                    await self._drained  # the client reads slower than we answer
                queue.popleft()
                transport = self._transport
                if transport is None:
                    break  # the client left: the answer is dropped
                close = not keep_alive or (self._closing and not queue)
                date = server.date()
                try:
                    data = encode_response(response, date, version, not close, head_only)
                except ValueError as exc:  # a handler's header that is not HTTP
                    log.error("dropping an invalid response header: %s", exc)
                    data = encode_response(Response(500, b'{"error": "invalid response"}'),
                                           date, version, not close)  # fmt: skip
                transport.write(data)
                if close:
                    self._close(transport)
                    return
                if self._paused and len(queue) < MAX_QUEUED // 2:
                    self._resume_reading()
                if self._continue_due and not queue:
                    self._continue_due = False
                    transport.write(_CONTINUE)
        except Exception:
            log.exception("answering a request failed; closing the connection")
            self.abort()
            return
        finally:
            self._worker = None
        if self._transport is None:
            queue.clear()
        elif not self._in_message:
            self._arm(server.keepalive_s)
        else:
            self._arm(server.header_timeout_s)

    # --- connection state ----------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _arm(self, seconds: float) -> None:
        """Expire the connection `seconds` from now: idle keep-alive, or a request's head
        or body that stopped arriving."""
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        self._deadline = None  # the handle, if any, finds nothing to do

    def _expired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:  # moved later since the handle was made
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expired)
            return
        self._deadline = None
        if self._transport is not None and self._worker is None and not self._queue:
            self._transport.close()  # idle, or a request that never finished arriving

    def _close(self, transport: asyncio.Transport) -> None:
        """Close after the answer is sent: FIN, then drain the client until its EOF or
        LINGER_S, so that unread bytes do not turn into a reset that loses the answer."""
        self._reading = False
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()
        self._disarm()
        self._loop.call_later(LINGER_S, transport.abort)  # a no-op once it has closed

    @property
    def worker(self) -> asyncio.Task[None] | None:
        """The task answering this connection's requests, while there are any."""
        return self._worker

    def shutdown(self) -> None:
        """Take no new requests: close now if idle, else after the one running."""
        self._reading = False
        self._closing = True
        while len(self._queue) > 1:
            self._queue.pop()
        if not self._queue and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, inflated to at most `limit` bytes."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedRequest(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"body exceeds the limit of {limit} bytes once inflated")
    if not inflater.eof:
        raise MalformedRequest(f"body is truncated {encoding} data")
    return out


def _origin_form(target: str) -> str:
    """`http://host/path?q` as `/path?q`; any other form (`*`, authority) as given."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    slash = rest.find("/")
    return rest[slash:] if slash != -1 else "/"
