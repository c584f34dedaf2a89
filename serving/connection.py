"""One keep-alive HTTP/1.1 connection to an upstream: asyncio.Protocol + httptools.

The pool (serving/upstream.py) sends one request at a time on it with `exchange`: one
pre-built bytes buffer written with one `transport.write`, one Future and one timer
handle. The parser (llhttp in C) calls back into Python only for the handful of
headers, the body and the end of the message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple, cast

import httptools


class Reply(NamedTuple):
    """An upstream's answer: status, body, and the two headers a V2 answer's reader needs."""

    status: int
    body: bytes
    binary_header: str | None  # Inference-Header-Content-Length: binary tensors follow
    content_type: str


class Failed(Exception):
    """The exchange failed; the text is the reason, the caller adds the URL."""


class Stale(Failed):
    """A reused keep-alive connection closed before any byte of the response."""


class Expired(Exception):
    """The request's deadline passed."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it.

    `on_idle_lost` is called when the server closes it while it sits idle in a pool.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_response_bytes: int,
        on_idle_lost: Callable[[Connection], None],
    ) -> None:
        self._max_response_bytes = max_response_bytes
        self._on_idle_lost = on_idle_lost
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        # The time limit of the request in flight (None: none is). The timer is kept from
        # one request to the next and moved only when a deadline comes earlier than the
        # one it is set for (at its time it re-arms for a later deadline, or finds none):
        # one timer per `timeout_s` instead of one per request (~3 µs each).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._chunks: list[bytes] = []
        self._size = 0
        self._got_bytes = False
        self._headers_done = False
        self._delimited = False  # Content-Length or chunked: the body does not end at EOF
        self._failure = ""
        self._binary_header: str | None = None
        self._content_type = ""
        self.reused = False
        self.reusable = False
        self.idle = False
        self.lost: asyncio.Future[None] = loop.create_future()

    def exchange(self, payload: bytes, deadline: float) -> asyncio.Future[Reply]:
        """Send one request; the Future gives its Reply or fails with Failed/Expired."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._chunks = []
        self._size = 0
        self._binary_header = None
        self._content_type = ""
        self._got_bytes = self._headers_done = self._delimited = self.reusable = False
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expire)
        assert self._transport is not None
        if self._transport.is_closing():  # the server's FIN is in, connection_lost is not yet
            self._fail(Stale("kept-alive connection closed before the request"))
        else:
            self._transport.write(payload)
        return waiter

    def abort(self) -> None:
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.abort()

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._waiter is None:
            return  # no request in flight
        if self._loop.time() < deadline:  # a later request's: wait for its time
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._fail(Expired())

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
            self._fail(Failed("malformed response: unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(Failed(self._failure or f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if not self.lost.done():
            self.lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is None:
            if self.idle:
                self._on_idle_lost(self)
            return
        if self._headers_done and not self._delimited:
            self._finish()  # an HTTP/1.0-style body that ends where the connection does
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if self._got_bytes:
            self._fail(Failed(f"connection lost mid-response{reason}"))
        elif self.reused:
            self._fail(Stale(f"kept-alive connection closed before a response{reason}"))
        else:
            self._fail(Failed(f"connection closed before a response{reason}"))

    # --- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self._delimited = True
            if int(value) > self._max_response_bytes:
                self._too_large()
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._delimited = value.rstrip().lower().endswith(b"chunked")
        elif size == 12 and name.lower() == b"content-type":
            self._content_type = value.decode("latin-1").strip()
        elif size == 31 and name.lower() == b"inference-header-content-length":
            self._binary_header = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_response_bytes:
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
            self._binary_header = None
            self._content_type = ""
            return
        self._finish()

    def _too_large(self) -> None:
        self._failure = f"response body larger than {self._max_response_bytes} bytes"
        raise Failed(self._failure)  # httptools re-raises it as HttpParserCallbackError

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        assert self._transport is not None
        self._deadline = None  # the timer, if still set, finds nothing to do
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.reused = True
        self.reusable = self._parser.should_keep_alive() and not self._transport.is_closing()
        if waiter is not None and not waiter.done():
            status = self._parser.get_status_code()
            waiter.set_result(Reply(status, body, self._binary_header, self._content_type))
        if not self.reusable:
            self._transport.close()
