"""The fast infer path: V2 infer requests parsed and answered straight off the socket.

aiohttp's server machinery (request and response objects, router, header multidicts,
stream writer) costs more CPU per request than rollguard's own logic. `FastProtocol`
reads requests with proxy/reader.py (httptools), answers
POST /v2/models/{model}[/versions/{v}]/infer through the same `infer_core`, limits and
error replies as the aiohttp handler, and gives the connection to aiohttp at the first
request it does not serve itself, with every byte from that request's first on.
Requests on a connection are answered one at a time, in order (HTTP/1.1 pipelining).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web
from aiohttp.tcp_helpers import tcp_keepalive

from rollguard.proxy.dataplane import infer_core
from rollguard.proxy.guard import Limits, Reply, error_reply, reply_for
from rollguard.proxy.http1 import HttpDate, encode_reply
from rollguard.proxy.inference import Inference
from rollguard.proxy.reader import Incoming, RequestReader
from rollguard.proxy.state import REQUEST_ID_HEADER

log = logging.getLogger("rollguard")

KEEPALIVE_TIMEOUT_S = 3630.0  # aiohttp 3.14's RequestHandler default: both paths agree
LINGER_S = 10.0  # aiohttp's lingering_time: a closing connection is drained this long
MAX_QUEUED = 4  # pipelined requests buffered before the socket is no longer read


@dataclass(eq=False)
class FastPath:
    """What every connection of one server shares; called, it makes a connection."""

    gateway: Inference
    limits: Limits
    aiohttp: web.Server  # called, it makes the protocol a handed-over connection gets
    keepalive_s: float = KEEPALIVE_TIMEOUT_S
    date: HttpDate = field(default_factory=HttpDate)
    connections: set[FastProtocol] = field(default_factory=set)

    def __call__(self) -> FastProtocol:
        return FastProtocol(self)


class FastProtocol(asyncio.Protocol):
    """One client connection until (unless) it is handed to aiohttp."""

    def __init__(self, shared: FastPath) -> None:
        self._shared = shared
        self._loop = asyncio.get_running_loop()
        self._reader = RequestReader(shared.limits, self._enqueue)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Incoming] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._peer_eof = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    @property
    def worker(self) -> asyncio.Task[None] | None:
        """The task answering this connection's requests, while there are any."""
        return self._worker

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tcp_keepalive(self._transport)  # as aiohttp's connections have
        self._shared.connections.add(self)
        self._idle()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        if reader.handover:
            self._hand_over()

    def eof_received(self) -> bool:
        self._peer_eof = True
        if not self._queue:
            return False  # the transport closes itself
        if not self._reader.handover:
            self._closing = True  # answer what was asked, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._shared.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # A request already running finishes (as in aiohttp, whose handlers are not
        # cancelled by default) and its answer is dropped; queued ones never start.

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- answering -----------------------------------------------------------------------

    def _new_id(self) -> str:
        return self._shared.gateway.new_request_id()

    def _enqueue(self, request: Incoming) -> None:
        self._queue.append(request)
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())
        elif len(self._queue) >= MAX_QUEUED:
            self._pause_reading()

    async def _work(self) -> None:
        queue = self._queue
        try:
            while queue and self._transport is not None:
                request = queue[0]
                reply = await self._answer(request)
                if self._drained is not None:
                    await self._drained  # the client reads slower than we answer
                queue.popleft()
                transport = self._transport
                if transport is None:
                    break  # the client left: the answer is dropped
                close = not request.keep_alive or (self._closing and not queue)
                date = self._shared.date()
                try:
                    data = encode_reply(reply, date, request.version, not close)
                except ValueError as exc:  # a header that would split the response
                    reply = reply_for(exc, self._new_id(), "writing an infer answer")
                    data = encode_reply(reply, date, request.version, not close)
                transport.write(data)
                if close:
                    self._close(transport)
                    return
                if self._paused and len(queue) < MAX_QUEUED // 2:
                    self._resume_reading()
        except Exception:
            log.exception("fast path: answering failed; closing the connection")
            self.abort()
            return
        finally:
            self._worker = None
        if self._transport is None:
            queue.clear()
            return
        self._idle()
        if self._reader.handover:
            self._hand_over()

    async def _answer(self, request: Incoming) -> Reply:
        headers = request.headers
        request_id = headers.get(REQUEST_ID_HEADER)
        if request.refusal is not None:
            status, message = request.refusal
            return error_reply(status, message, request_id or self._new_id())
        model, pinned = request.route
        limits = self._shared.limits
        try:
            limits.enter(model)
        except Exception as exc:  # TooBusy
            return reply_for(exc, request_id or self._new_id(), "admitting an infer request")
        try:
            gateway = self._shared.gateway
            return await infer_core(gateway, model, pinned, request.body, headers, request_id)
        finally:
            limits.leave()

    # --- connection state ----------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _hand_over(self) -> None:
        """Give the connection to aiohttp once every earlier answer is written."""
        transport = self._transport
        if transport is None:
            return
        if self._queue:
            self._pause_reading()  # the worker calls again when the queue is empty
            return
        data = self._reader.handover_bytes()
        handler = self._shared.aiohttp()
        self._transport = None
        self._shared.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        handler.data_received(data)
        if self._peer_eof:
            handler.eof_received()  # as aiohttp would have seen it (it then closes)
            transport.close()

    def _close(self, transport: asyncio.Transport) -> None:
        """Close after the answer is sent: FIN, then drain the client until its EOF or
        LINGER_S, so that unread bytes do not turn into a reset that loses the answer."""
        self._reader.stop()
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(LINGER_S, transport.abort)

    def _idle(self) -> None:
        """Start (or move) the keep-alive clock; an idle connection closes when it runs out."""
        self._idle_since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._idle_since + self._shared.keepalive_s, self._check_idle
            )

    def _check_idle(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._queue or not self._reader.parsing:
            return  # busy, closing or handing over: whoever finishes restarts the clock
        deadline = self._idle_since + self._shared.keepalive_s
        if self._loop.time() >= deadline:
            transport.close()
        else:
            self._timer = self._loop.call_at(deadline, self._check_idle)

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the one running."""
        self._reader.stop()
        self._closing = True
        while len(self._queue) > 1:
            self._queue.pop()
        if not self._queue and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
