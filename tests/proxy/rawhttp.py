"""Raw HTTP/1.x over loopback sockets: for what an HTTP client library would hide
(pipelining, malformed bytes, half-sent requests, interim answers, timeouts)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Answer:
    """One response as read off the socket."""

    version: str  # "1.1" or "1.0", from the status line
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated headers
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    method: str, path: str, body: bytes | None = None, *extra: str, version: str = "1.1"
) -> bytes:
    """A request's bytes; `extra` header lines ("Name: value"); Content-Length for a body."""
    head = f"{method} {path} HTTP/{version}\r\nHost: t\r\n"
    head += "".join(f"{line}\r\n" for line in extra)
    if body is None:
        return f"{head}\r\n".encode()
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    return request("POST", path, body, "Content-Type: application/json", *extra, version=version)


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    return request("GET", path, None, *extra, version=version)


def chunked(body: bytes, size: int = 50) -> bytes:
    """`body` in chunked transfer coding, `size` bytes a chunk, with the last chunk."""
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def read_head(reader: asyncio.StreamReader) -> tuple[str, int, dict[str, str]]:
    """A status line and its headers (interim answers included)."""
    line = await reader.readline()
    assert line, "the connection closed before a response"
    version, status = line.split()[:2]
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("utf-8").partition(":")
        headers[name.strip().lower()] = value.strip()
    return version.decode().removeprefix("HTTP/"), int(status), headers


async def read(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> Answer:
    """One final response with a Content-Length body, after any interim (1xx) answers."""

    async def one() -> Answer:
        status = 100
        version, headers = "", dict[str, str]()
        while status < 200:
            version, status, headers = await read_head(reader)
        body = await reader.readexactly(int(headers["content-length"]))
        return Answer(version, status, headers, body)

    return await asyncio.wait_for(one(), timeout_s)


async def closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bool:
    """True once the server closed the connection (EOF or reset) within `timeout_s`, with
    nothing more sent; False if it is still open then."""
    try:
        rest = await asyncio.wait_for(reader.read(), timeout_s)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert rest == b"", f"unexpected bytes before the close: {rest[:200]!r}"
    return True


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Stream]:
    """A connection to `url`'s host and port, closed afterwards."""
    reader, writer = await asyncio.open_connection(*address(url))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(url: str, data: bytes) -> Answer:
    """`data` on a fresh connection, and the first answer."""
    async with connect(url) as (reader, writer):
        writer.write(data)
        return await read(reader)


async def until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Wait for `condition` to hold, polling, failing after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
