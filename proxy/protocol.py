"""The data port's HTTP/1.1 server: one asyncio protocol per connection.

A connection reads requests with proxy/reading.py (keep-alive, pipelining, chunked and
gzip/deflate bodies), hands each to the `handle` coroutine and writes the answers in
order. It owns what a server must around that:

- capacity (proxy/capacity.py): connections over `max_connections` in total or
  `max_connections_per_client` from one address are answered 503 and closed before a
  byte of them is read; a body is admitted before it is buffered;
- time limits: a request head must arrive within `header_timeout_s` of its first byte,
  a body within `body_timeout_s` of its head, never pausing longer than
  `header_timeout_s` (408, then close), and an idle kept-alive connection closes after
  `keepalive_s`;
- backpressure: at most `MAX_QUEUED` pipelined requests are buffered before the socket
  is no longer read, and a client that reads slower than we answer is waited for;
- `100 Continue` sent when a client waits for it, never before an earlier answer;
- refusals (malformed, too large) answered, then the connection closed;
- a graceful `shutdown`: no new requests, the running one finishes, those queued
  behind it are answered 503, then close; `give_up` answers the running one 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from rollguard.proxy.capacity import Capacity, Refusal
from rollguard.proxy.errors import InvalidResponse, ProxyError, RequestTimeout, TooBusy
from rollguard.proxy.reading import CONTINUE, Read, Refused, RequestReader
from rollguard.proxy.wire import HttpDate, Request, Response, encode_response

log = logging.getLogger("rollguard")

MAX_QUEUED = 4  # pipelined requests buffered before the socket is no longer read
LINGER_S = 10.0  # a closing connection drains the client this long, so no reset loses bytes
REFUSED_LINGER_S = 1.0  # the same for a connection turned away or timed out: it costs a fd
_TURNED_AWAY = {
    Refusal.MAX_CONNECTIONS: "the gateway holds max_connections connections; retry later",
    Refusal.MAX_CONNECTIONS_PER_CLIENT: (
        "this client address holds max_connections_per_client connections; retry later"
    ),
}
_SHUTTING_DOWN = "the gateway is shutting down; retry on another instance"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handle = Callable[[Request], Awaitable[Response]]
Refuse = Callable[[ProxyError, Mapping[str, str]], Response]


@dataclass(eq=False)
class Server:
    """What every connection of the data port shares; called, it makes a connection."""

    handle: Handle  # answers a request; never raises
    refuse: Refuse  # the answer to a request we could not read (its headers so far)
    max_body: int
    header_timeout_s: float  # a head's arrival from its first byte; a body's longest pause
    body_timeout_s: float  # a body's arrival from the end of its head
    keepalive_s: float
    capacity: Capacity
    date: HttpDate = field(default_factory=HttpDate)
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False  # shutting down: every answer closes its connection

    def __call__(self) -> Connection:
        return Connection(self)


class Connection(asyncio.Protocol):
    """One client connection: reads requests, answers them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._reader = RequestReader(server.max_body, self._received, server.capacity)
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
        self._phase = "idle"  # what the deadline waits for: "idle", "head" or "body"
        self._body_until = 0.0  # the body being read must be whole by then
        self._peer = ""  # the client's IP address, given to each request
        self._counted = False  # in the server's capacity (not turned away)
        self._stopping = False  # shut down: requests not started are answered 503
        self._giving_up = False  # the shutdown grace is over for the running request

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        refusal = self._server.capacity.connect(self._peer)
        if refusal is not None:
            self._turn_away(self._transport, refusal)
            return
        self._counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._server.connections.add(self)
        self._arm(self._server.keepalive_s, "idle")

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if not reader.reading:
            return  # closing, or a request that ends the connection is being answered
        begun, in_body = reader.begun, reader.in_body
        reader.feed(data)
        if reader.in_body:
            now = self._loop.time()
            if not in_body or reader.begun != begun:  # a body began in these bytes
                self._body_until = now + self._server.body_timeout_s
            self._arm_body(now)
        elif reader.in_message and reader.begun != begun:
            self._arm(self._server.header_timeout_s, "head")  # from the head's first byte

    def eof_received(self) -> bool:
        self._peer_eof = True
        if not self._queue:
            return False  # the transport closes itself
        self._closing = True  # answer what was asked, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.discard(self)
        if self._counted:
            self._counted = False
            self._server.capacity.disconnect(self._peer)
        self._reader.stop()  # a body half read gives back what it held
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
        if isinstance(item, Request):
            item.peer = self._peer
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
                    version, keep_alive = item.version, item.keep_alive
                    head_only = item.method == "HEAD"
                    if self._stopping:  # queued behind the request running at shutdown
                        response = server.refuse(TooBusy(_SHUTTING_DOWN), item.headers)
                    else:
                        response = await self._answer(item)
                    if item.reserved:
                        server.capacity.release(item.reserved)
                        item.reserved = 0
                else:
                    response = server.refuse(item.error, item.headers)
                    version, keep_alive = "1.1", False
                if self._drained is not None:
                    await self._drained  # the client reads slower than we answer
                queue.popleft()
                transport = self._transport
                if transport is None:
                    break  # the client left: the answer is dropped
                closing = self._closing or server.draining or self._giving_up
                close = not keep_alive or (closing and not queue)
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
            for item in queue:
                if isinstance(item, Request) and item.reserved:
                    server.capacity.release(item.reserved)
            queue.clear()
        elif self._reader.in_body:
            self._arm_body(self._loop.time())
        elif self._reader.in_message:
            self._arm(server.header_timeout_s, "head")
        else:
            self._arm(server.keepalive_s, "idle")

    async def _answer(self, request: Request) -> Response:
        """The handler's answer; 503 if the shutdown grace ran out before it came."""
        try:
            return await self._server.handle(request)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._giving_up or task is None:
                raise
            task.uncancel()
            log.info("%s %s: unanswered when the shutdown grace ran out", request.method,
                     request.path)  # fmt: skip
            return self._server.refuse(TooBusy(_SHUTTING_DOWN), request.headers)

    # --- connection state ----------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _arm(self, seconds: float, phase: str) -> None:
        """Expire the connection `seconds` from now: idle keep-alive, or a request's head
        or body that stopped arriving."""
        self._arm_at(self._loop.time() + seconds, phase)

    def _arm_body(self, now: float) -> None:
        """A body: whole by `_body_until`, and no pause longer than the header limit."""
        self._arm_at(min(self._body_until, now + self._server.header_timeout_s), "body")

    def _arm_at(self, deadline: float, phase: str) -> None:
        self._deadline = deadline
        self._phase = phase
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
        transport = self._transport
        if transport is None or self._worker is not None or self._queue:
            return
        phase = self._phase
        self._server.capacity.timed_out[phase] += 1
        if phase == "idle":
            transport.close()
            return
        # A head or a body that stopped arriving: say so, and close.
        limit = "header_timeout_s" if phase == "head" else "body_timeout_s / header_timeout_s"
        error = RequestTimeout(f"the request {phase} did not arrive in time ({limit})")
        self._write_final(transport, self._server.refuse(error, {}))
        self._close(transport, REFUSED_LINGER_S)

    def _turn_away(self, transport: asyncio.Transport, refusal: Refusal) -> None:
        """A connection over a cap: 503 before reading anything, then close."""
        self._reader.stop()
        log.debug("connection from %s refused: %s", self._peer, refusal.value)
        self._write_final(transport, self._server.refuse(TooBusy(_TURNED_AWAY[refusal]), {}))
        self._close(transport, REFUSED_LINGER_S)

    def _write_final(self, transport: asyncio.Transport, response: Response) -> None:
        transport.write(encode_response(response, self._server.date(), "1.1", False))

    def _close(self, transport: asyncio.Transport, linger_s: float = LINGER_S) -> None:
        """Close after the answer is sent: FIN, then drain the client until its EOF or
        `linger_s`, so that unread bytes do not turn into a reset that loses the answer."""
        self._reader.stop()
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()
        self._disarm()
        self._loop.call_later(linger_s, transport.abort)  # a no-op once it has closed

    @property
    def worker(self) -> asyncio.Task[None] | None:
        """The task answering this connection's requests, while there are any."""
        return self._worker

    def shutdown(self) -> None:
        """Take no new requests: close now if idle, else once the one running is answered
        (and those queued behind it, 503: they never started)."""
        self._reader.stop()
        self._closing = self._stopping = True
        if not self._queue and self._transport is not None:
            self._transport.close()

    def give_up(self) -> None:
        """The shutdown grace is over: the request running is answered 503, then close."""
        self._giving_up = True
        if self._worker is not None:
            self._worker.cancel()
        elif self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
