"""HTTP/1.1 messages of the data port: a parsed request, a response, and its bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

SERVER = "rollguard"
JSON = "application/json"
# On every answer of the data port: a JSON API that no browser should sniff, render,
# frame or cache.
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
_FIXED = f"Server: {SERVER}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in SECURITY_HEADERS)
_LINES = {
    (version, s.value): f"HTTP/{version} {s.value} {s.phrase}\r\n{_FIXED}"
    for s in HTTPStatus
    for version in ("1.0", "1.1")
}


@dataclass(slots=True)
class Request:
    """One request as read off a connection."""

    method: str
    path: str  # the target up to '?' or '#', still percent-encoded
    query: str
    headers: dict[str, str]  # lower-case names; the first of repeated headers
    body: bytes
    version: str  # "1.1" or "1.0"
    keep_alive: bool
    peer: str = ""  # the client's IP address, set by the connection
    reserved: int = 0  # body bytes it holds of the data port's buffer budget (capacity.py)


@dataclass(slots=True)
class Response:
    """A response independent of the connection that writes it."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: list[tuple[str, str]] | None = None  # beyond Content-Type and Content-Length
    # The security headers among `headers` replace the default ones (the admin port's
    # dashboard page: its own Content-Security-Policy). Never set for a relayed answer:
    # an upstream's headers do not loosen the gateway's.
    own_security: bool = False


class HttpDate:
    """The Date header's value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


def encode_response(
    response: Response, date: str, version: str, keep_alive: bool, head_only: bool = False
) -> bytes:
    """Status line, headers and body as one buffer (no body for a HEAD request, its
    Content-Length kept); ValueError for a header that holds a control character (CR or
    LF would split the response; the others are not HTTP).

    Connection headers: `keep-alive` said to HTTP/1.0 clients, `close` to 1.1 ones. With
    `own_security`, a security header the response sets itself (the admin port's
    dashboard: its own Content-Security-Policy) replaces the one every answer has.
    """
    status = response.status
    line = _LINES.get((version, status)) or f"HTTP/{version} {status}\r\n{_FIXED}"
    own = response.headers
    if response.own_security and own:
        names = {name.lower() for name, _ in own}
        kept = "".join(f"{n}: {v}\r\n" for n, v in SECURITY_HEADERS if n.lower() not in names)
        line = line.replace(_FIXED, f"Server: {SERVER}\r\n{kept}")
    head = f"{line}Date: {date}\r\n"
    if response.content_type is not None:
        head += f"Content-Type: {response.content_type}\r\n"
    head += f"Content-Length: {len(response.body)}\r\n"
    if response.headers:
        for name, value in response.headers:
            if not value.isprintable() or not name.isprintable() or ":" in name:
                raise ValueError(f"response header {name!r}: {value!r} is not a valid field")
            head += f"{name}: {value}\r\n"
    if keep_alive:
        if version == "1.0":
            head += "Connection: keep-alive\r\n"
    elif version != "1.0":
        head += "Connection: close\r\n"
    head += "\r\n"
    if head_only:
        return head.encode("utf-8", "surrogateescape")
    return head.encode("utf-8", "surrogateescape") + response.body
