"""HTTP/1.1 wire details of the fast path: which targets are infer routes, response bytes."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from yarl import URL

from rollguard.proxy.guard import Reply

SERVER = "rollguard"
_LINES = {
    (version, s.value): f"HTTP/{version} {s.value} {s.phrase}\r\nServer: {SERVER}\r\n"
    for s in HTTPStatus
    for version in ("1.0", "1.1")
}
_PREFIX = "/v2/models/"


def _segment(value: str) -> str | None:
    """A path segment as aiohttp's router gives it ({name} matches `[^{}/]+`), or None."""
    if not value or "{" in value or "}" in value:
        return None
    if "%" in value:  # aiohttp's _unquote_path_safe: path_safe keeps %2F and %25 quoted
        value = value.replace("%2F", "/").replace("%25", "%")
    return value


def infer_route(target: bytes) -> tuple[str, str | None] | None:
    """(model, pinned version) when `target` is a V2 infer path, else None.

    Decodes as aiohttp does: the target as UTF-8 (surrogateescape), the query and
    fragment dropped, percent-escapes decoded by yarl's `path_safe`, segments unquoted.
    """
    raw = target.decode("utf-8", "surrogateescape")
    if not raw.startswith(_PREFIX):
        return None  # absolute-form, other paths
    end = len(raw)
    for mark in ("?", "#"):
        at = raw.find(mark, 0, end)
        if at != -1:
            end = at
    path = raw[:end]
    if "%" in path or not path.isascii():
        try:
            path = URL.build(path=path, encoded=True).path_safe
        except ValueError:
            return None
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer":
        model = _segment(parts[3])
        return None if model is None else (model, None)
    if len(parts) == 7 and parts[4] == "versions" and parts[6] == "infer":
        model, version = _segment(parts[3]), _segment(parts[5])
        return None if model is None or version is None else (model, version)
    return None


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


def encode_reply(reply: Reply, date: str, version: str, keep_alive: bool) -> bytes:
    """Status line, headers and body as one buffer; ValueError for CR/LF in a header value.

    Connection headers follow aiohttp: `keep-alive` said to HTTP/1.0, `close` to 1.1.
    """
    status = reply.status
    line = _LINES.get((version, status)) or f"HTTP/{version} {status}\r\nServer: {SERVER}\r\n"
    head = (
        f"{line}Date: {date}\r\nContent-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\n"
    )
    lines = 6  # status, Server, Date, Content-Type, Content-Length, the blank line
    if reply.headers:
        for name, value in reply.headers:
            head += f"{name}: {value}\r\n"
        lines += len(reply.headers)
    if keep_alive:
        if version == "1.0":
            head += "Connection: keep-alive\r\n"
            lines += 1
    elif version != "1.0":
        head += "Connection: close\r\n"
        lines += 1
    head += "\r\n"
    # A CR or LF inside a header value would split the response.
    if head.count("\n") != lines or head.count("\r") != lines:
        raise ValueError(f"a CR or LF in a response header: {reply.headers!r}")
    return head.encode("utf-8", "surrogateescape") + reply.body
