"""The data port's HTTP/1.1 server: one asyncio protocol per connection.

A connection reads requests with proxy/reading.py (keep-alive, pipelining, chunked and
gzip/deflate bodies), hands each to the `handle` coroutine and writes the answers in
order. It owns what a server must around that:

- time limits: a request head must arrive within `header_timeout_s` of its first byte,
  a body may pause at most that long between reads, and an idle kept-alive connection
  closes after `keepalive_s`;
- backpressure: at most `MAX_QUEUED` pipelined requests are buffered before the socket
  is no longer read, and a client that reads slower than we answer is waited for;
- `100 Continue` sent when a client waits for it, never before an earlier answer;
- refusals (malformed, too large) answered, then the connection closed;
- a graceful `shutdown`: no new requests, the running one finishes, then close.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from rollguard.proxy.errors import InvalidResponse, ProxyError
from rollguard.proxy.reading import CONTINUE, Read, Refused, RequestReader
from rollguard.proxy.wire import HttpDate, Request, Response, encode_response

log = logging.getLogger("rollguard")

MAX_QUEUED = 4  # pipelined requests buffered before the socket is no longer read
LINGER_S = 10.0  # a closing connection drains the client this long, so no reset loses bytes
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handle = Callable[[Request], Awaitable[Response]]
Refuse = Callable[[ProxyError, Mapping[str, str]], Response]


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


class Connection(asyncio.Protocol):
    """One client connection: reads requests, answers them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._reader = RequestReader(server.max_body, self._received)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Refused] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._peer_eof = False
        self._closing = False
        self._continue_due = False  # a 100 Continue waits for earlier answers to go out
        # One timer per connection, moved lazily: arming is a store, not a new handle.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the scheduled handle fires
        self._deadline: float | None = None  # when the connection expires; None: never

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._server.connections.add(self)
        self._arm(self._server.keepalive_s)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        begun = reader.begun
        reader.feed(data)
        if reader.in_body or (reader.in_message and reader.begun != begun):
            # A head is due within the limit of its first byte; a body may pause that long.
            self._arm(self._server.header_timeout_s)

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

    # --- answering -----------------------------------------------------------------------

    def _received(self, item: Read) -> None:
        """What the reader made of the bytes: a request to answer in turn, or a 100."""
        if item is CONTINUE:
            transport = self._transport
            # A 100 must not overtake an earlier answer: else it goes once they are out.
            if transport is not None and not self._queue and self._worker is None:
                transport.write(_CONTINUE)
            else:
                self._continue_due = True
            return
        assert isinstance(item, Request | Refused)
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
                    failed = server.refuse(InvalidResponse("the answer could not be written"), {})
                    data = encode_response(failed, date, version, not close)
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
        elif not self._reader.in_message:
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
        self._reader.stop()
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
        self._reader.stop()
        self._closing = True
        while len(self._queue) > 1:
            self._queue.pop()
        if not self._queue and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
