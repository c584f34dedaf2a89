"""Requests read off one fast-path connection, and the bytes a hand-over to aiohttp needs.

httptools (llhttp) parses; this decides per request whether the fast path serves it
(a V2 infer POST with nothing aiohttp would treat specially) or aiohttp must, in which
case parsing stops for good and every byte from that request's first on is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import httptools

from rollguard.proxy.errors import BodyTooLarge
from rollguard.proxy.guard import Limits
from rollguard.proxy.http1 import infer_route

_MAX_LINE = 8190  # aiohttp's limits; a request beyond them is aiohttp's to refuse
_MAX_HEADERS = 128
# Bytes read since a message began (counting all of the read it began in) with its head
# still unfinished, beyond which aiohttp takes over: above any head aiohttp's own limits
# accept (128 headers of 8190 bytes) plus one read, so aiohttp refuses it as it would.
_MAX_HEAD = 2 * 1024 * 1024


@dataclass(slots=True)
class Incoming:
    """One request to answer, in the order read."""

    route: tuple[str, str | None]  # (model, pinned version); ("", None) for a refusal
    headers: dict[str, str]  # lower-case names, the first of repeated headers
    body: bytes
    version: str  # "1.1", "1.0"
    keep_alive: bool
    refusal: tuple[int, str] | None = None  # (status, message): answer it, then close


class _Stop(Exception):
    """Raised in a parser callback: parse nothing more on this connection."""


class RequestReader:
    """Feeds a connection's bytes to httptools and hands each request to `deliver`.

    Parsing stops for good at the first request the fast path does not serve
    (`handover` is then set and `handover_bytes()` gives that request and all after it),
    after a request that closes the connection, after a body over the limit (a 413
    refusal) and at bytes that are not HTTP (a 400 refusal).
    """

    def __init__(self, limits: Limits, deliver: Callable[[Incoming], None]) -> None:
        self._limits = limits
        self._deliver = deliver
        self._parser = httptools.HttpRequestParser(self)
        self.parsing = True
        self.handover = False
        # The bytes read since the parser was last between messages, and how many
        # messages began in them: what a hand-over is cut from.
        self._raw: list[bytes] = []
        self._retained = 0
        self._begun = 0
        self._in_message = False
        self._read_from = 0  # where in them the read being parsed starts
        self._head_from = 0  # where the read the current message began in starts
        # The message being parsed.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._count = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._route: tuple[str, str | None] | None = None

    def feed(self, data: bytes) -> None:
        if not self.parsing:
            if self.handover:
                self._raw.append(data)
            return  # otherwise closing: read and dropped
        self._raw.append(data)
        self._read_from = self._retained
        self._retained += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.parsing:  # not our own _Stop: the bytes are not HTTP
                self.parsing = False
                if not isinstance(exc.__context__, _Stop | None):
                    raise  # a bug in a callback below
                refusal = (400, f"malformed HTTP request: {exc}")
                self._deliver(Incoming(("", None), {}, b"", "1.1", False, refusal))
            return
        if not self._in_message:
            self._raw.clear()
            self._retained = self._begun = 0
        elif self._route is None and self._retained - self._head_from > _MAX_HEAD:
            self.parsing = False  # a huge or endless head: aiohttp's limits apply
            self.handover = True

    def stop(self) -> None:
        """Read nothing more, and hand nothing over."""
        self.parsing = self.handover = False

    def handover_bytes(self) -> bytes:
        """The request to hand over and every byte read after it."""
        data = b"".join(self._raw)
        self._raw = []
        view = memoryview(data)
        start = 0
        for _ in range(self._begun - 1):  # the requests before it in the same reads
            start += message_end(view[start:])
        return data[start:]

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        self._in_message = True
        self._head_from = self._read_from
        self._url = b""
        self._headers = {}
        self._count = self._size = 0
        self._chunks = []
        self._route = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_LINE:
            self._hand_over()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        if self._count > _MAX_HEADERS or len(name) > _MAX_LINE or len(value) > _MAX_LINE:
            self._hand_over()
        key = name.decode("latin-1").lower()
        if key not in self._headers:  # the first of repeated headers, as aiohttp's get()
            self._headers[key] = value.decode("utf-8", "surrogateescape")

    def on_headers_complete(self) -> None:
        headers = self._headers
        route = infer_route(self._url) if self._parser.get_method() == b"POST" else None
        if (
            route is None
            or "expect" in headers  # 100-continue: aiohttp sends the interim answer
            or "upgrade" in headers
            or "content-encoding" in headers  # aiohttp decompresses request bodies
            or headers.get("transfer-encoding", "chunked").lower() != "chunked"
        ):
            self._hand_over()
        self._route = route
        length = headers.get("content-length")
        if length is not None:
            try:
                self._limits.check_length(int(length))
            except BodyTooLarge as exc:
                self._refuse(str(exc))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limits.max_body:  # chunked: no length said up front
            self._refuse(self._limits.too_large_message())
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        assert self._route is not None
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        version = parser.get_http_version()
        self._deliver(Incoming(self._route, self._headers, body, version, keep_alive))
        if not keep_alive:
            self.parsing = False
            raise _Stop  # nothing after this request is read

    def _hand_over(self) -> NoReturn:
        self.parsing = False
        self.handover = True
        raise _Stop

    def _refuse(self, message: str) -> NoReturn:
        """413 for the message being read; nothing after it is read."""
        self.parsing = False
        version = self._parser.get_http_version()
        self._deliver(Incoming(("", None), self._headers, b"", version, False, (413, message)))
        raise _Stop


class _Probe:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def _completes(data: memoryview) -> bool:
    probe = _Probe()
    # An error past the message we look for (a later one cut short) does not matter.
    with contextlib.suppress(httptools.HttpParserError):
        httptools.HttpRequestParser(probe).feed_data(data)
    return probe.done


def message_end(data: memoryview) -> int:
    """Where the first request in `data` ends; ValueError unless `data` holds it whole.

    httptools reports no offsets, so this finds the shortest prefix a fresh parser sees
    complete (completeness is monotone in the prefix length): a galloping then a binary
    search, O(length x log length) bytes parsed in C. Used only to cut a request that
    followed others in one read out for aiohttp.
    """
    size = len(data)
    high = min(512, size)
    while not _completes(data[:high]):
        if high == size:
            raise ValueError("no complete request in the data")
        high = min(2 * high, size)
    low = high // 2 + 1 if high > 512 else 1
    while low < high:
        mid = (low + high) // 2
        if _completes(data[:mid]):
            high = mid
        else:
            low = mid + 1
    return high
