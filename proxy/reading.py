"""Reading HTTP/1.1 requests off a connection's bytes: httptools (llhttp) in, Requests out.

`RequestReader.feed` parses what arrived and hands each finished request to `deliver`,
in order: a `Request`, a `Refused` one (malformed, too large, an encoding we do not
take: nothing after it is read), or `CONTINUE` when a client waits for a 100 before
sending its body. An Upgrade offer (h2c, websocket) is ignored, as a server may: the
connection stays HTTP/1.1 and the offer's body is read as any other.

With a `Capacity`, a body is admitted at the end of its head, before any of it is
buffered (503 when the data port is full); the bytes it reserves as they arrive (503 if
the budget runs out) travel with its `Request` (`reserved`) until it is answered.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, NoReturn

import httptools

from rollguard.proxy.capacity import Capacity, Refusal
from rollguard.proxy.errors import (
    BodyTooLarge,
    MalformedRequest,
    ProxyError,
    TooBusy,
    UnsupportedEncoding,
)
from rollguard.proxy.wire import Request

MAX_URL = 8190
MAX_HEADERS = 128
MAX_HEADER_BYTES = 64 * 1024
_FULL = {
    Refusal.OVERLOADED: "too many requests in flight or arriving (max_inflight); retry later",
    Refusal.BUFFER_FULL: "too many request bytes buffered (max_buffered_bytes); retry later",
}


@dataclass(slots=True)
class Refused:
    """A request we could not read, with the headers read before it went wrong."""

    error: ProxyError
    headers: Mapping[str, str]


class _Continue:
    """The client waits for `100 Continue` before it sends the body."""


CONTINUE: Final = _Continue()
Read = Request | Refused | _Continue


class _Stop(Exception):
    """Raised in a parser callback: read nothing more on this connection."""


class RequestReader:
    """Feeds a connection's bytes to httptools; `deliver` gets what they make, in order.

    `reading` turns False for good after a request that closes the connection or one
    that was refused. `in_message` / `in_body` say where the current message stands,
    and `begun` counts messages begun, for the connection's timers.
    """

    def __init__(
        self, max_body: int, deliver: Callable[[Read], None], capacity: Capacity | None = None
    ) -> None:
        self._max_body = max_body
        self._deliver = deliver
        self._capacity = capacity
        self._parser = httptools.HttpRequestParser(self)
        self.reading = True
        self.in_message = False
        self.in_body = False
        self.begun = 0
        # The message being read.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        # The body: its first piece as given, then all of it in one growing buffer (a
        # trickled body is not held as thousands of small objects).
        self._first = b""
        self._rest = bytearray()
        self._size = 0
        self._encoding = ""
        self._admitted = False  # the body holds a `Capacity` slot while it arrives
        self._reserved = 0  # bytes it holds in the `Capacity` budget
        # A request that offered an Upgrade, held until its body is read (see feed).
        self._held: Request | None = None
        self._held_length = 0
        self._held_body = bytearray()

    def feed(self, data: bytes) -> None:
        if not self.reading:
            return
        if self._held is not None:
            data = self._fill_held(data)
            if not data:
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops at the end of an Upgrade offer's head: its body (if any) and
            # what follows are read here, by a fresh parser.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        except httptools.HttpParserError as exc:
            if self.reading:  # not our own _Stop: the bytes are not HTTP
                self.reading = False
                if not isinstance(exc.__context__, _Stop | None):
                    raise  # a bug in a callback below
                self._deliver(Refused(MalformedRequest(f"malformed HTTP request: {exc}"), {}))
            return
        else:
            return
        self._parser = httptools.HttpRequestParser(self)
        self.feed(data[offset:])

    def stop(self) -> None:
        """Read nothing more; a message half read gives back what it held."""
        self.reading = False
        self._held, self._held_body = None, bytearray()
        self._give_back()

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.begun += 1
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._size = 0
        self._give_back()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._refuse(MalformedRequest(f"request target longer than {MAX_URL} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if len(self._headers) >= MAX_HEADERS or self._head_bytes > MAX_HEADER_BYTES:
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
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self._refuse(
                BodyTooLarge(f"body of {length} bytes exceeds the limit of {self._max_body}")
            )
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            self._refuse(UnsupportedEncoding(f"Expect {expect!r} is not supported"))
        capacity = self._capacity
        if capacity is not None and (length not in (None, "0") or "transfer-encoding" in headers):
            # A body: admitted first. Its bytes are reserved as they arrive, so that a
            # client must send what it holds (a declared length costs it nothing).
            refusal = capacity.admit_body(0)
            if refusal is not None:
                self._refuse(TooBusy(_FULL[refusal]))
            self._admitted = True
        if expect is not None:
            self._deliver(CONTINUE)
        self.in_body = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:  # chunked: no length said up front
            self._refuse(BodyTooLarge(f"body exceeds the limit of {self._max_body} bytes"))
        if self._size > self._reserved and self._admitted:
            self._reserve(self._size - self._reserved)
        if self._rest:
            self._rest += body
        elif not self._first:
            self._first = body
        else:
            self._rest += self._first
            self._rest += body
            self._first = b""

    def on_message_complete(self) -> None:
        self.in_message = self.in_body = False
        body = bytes(self._rest) if self._rest else self._first
        self._first, self._rest = b"", bytearray()
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if self._encoding != "identity":
            try:
                body = _inflate(body, self._encoding, self._max_body)
            except ProxyError as exc:
                self._refuse(exc)
            if len(body) > self._reserved and self._admitted:
                self._reserve(len(body) - self._reserved)
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
                self._held, self._held_length, self._held_body = request, int(length), bytearray()
                self.in_message = self.in_body = True
                return
        request.reserved = self._handed_over()
        self._deliver(request)
        if not keep_alive:
            self.reading = False
            raise _Stop  # nothing after this request is read

    # --- the rest ------------------------------------------------------------------------

    def _fill_held(self, data: bytes) -> bytes:
        """Add to the held request's body; once whole, deliver it. The bytes beyond it."""
        held = self._held
        assert held is not None
        need = self._held_length - len(self._held_body)
        piece = data[:need]
        capacity = self._capacity
        if capacity is not None and self._admitted:
            if capacity.grow(len(piece)) is not None:
                self._held = None
                self.reading = False
                self.in_message = self.in_body = False
                self._give_back()
                self._deliver(Refused(TooBusy(_FULL[Refusal.BUFFER_FULL]), held.headers))
                return b""
            self._reserved += len(piece)
        self._held_body += piece
        if len(self._held_body) < self._held_length:
            return b""
        held.body, self._held = bytes(self._held_body), None
        self.in_message = self.in_body = False
        held.reserved = self._handed_over()
        self._deliver(held)
        if not held.keep_alive:
            self.reading = False
            return b""
        return data[need:]

    def _refuse(self, error: ProxyError) -> NoReturn:
        """Deliver `error` for the message being read; read nothing after it."""
        self.reading = False
        self.in_message = self.in_body = False
        self._give_back()
        self._deliver(Refused(error, self._headers))
        raise _Stop

    def _reserve(self, extra: int) -> None:
        """`extra` more bytes for the admitted body; refused (503) when the budget is full."""
        assert self._capacity is not None
        if self._capacity.grow(extra) is not None:
            self._refuse(TooBusy(_FULL[Refusal.BUFFER_FULL]))
        self._reserved += extra

    def _handed_over(self) -> int:
        """The message is a Request now: its slot is free, its bytes go with it."""
        reserved = self._reserved
        if self._admitted:
            assert self._capacity is not None
            self._capacity.received()
        self._admitted, self._reserved = False, 0
        return reserved

    def _give_back(self) -> None:
        """Free what the message being read holds (refused, abandoned): its body so far,
        and its share of the `Capacity`."""
        self._first, self._rest = b"", bytearray()
        capacity = self._capacity
        if capacity is not None:
            if self._admitted:
                capacity.received()
            capacity.release(self._reserved)
        self._admitted, self._reserved = False, 0


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
