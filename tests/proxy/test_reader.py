"""The fast path's request reader: what it serves, and the exact bytes it hands over."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.guard import Limits
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.reader import Incoming, RequestReader, message_end
from rollguard.proxy.settings import Settings


def _infer(body: bytes, chunked: bool, model: str = "m") -> bytes:
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: t\r\n"
    if not chunked:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
                      for i in range(0, len(body), 7))  # fmt: skip
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"


_OTHERS = [
    b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /predict/m HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v2/models/m/infer HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 1\r\n\r\nx",
]

_bodies = st.binary(min_size=0, max_size=40)


def _reader(max_body: int = 1 << 20) -> tuple[RequestReader, list[Incoming]]:
    got: list[Incoming] = []
    limits = Limits(Settings(max_body_bytes=max(max_body, 1024)), Metrics())
    return RequestReader(limits, got.append), got


def _feed(reader: RequestReader, stream: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            reader.feed(stream[a:b])


@given(
    st.lists(st.tuples(_bodies, st.booleans()), min_size=0, max_size=3),
    st.sampled_from(_OTHERS),
    st.binary(max_size=30),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_serves_infer_requests_and_hands_over_from_the_first_other(
    infers: list[tuple[bytes, bool]], other: bytes, tail: bytes, cuts: list[int]
) -> None:
    reader, got = _reader()
    stream = b"".join(_infer(body, chunked) for body, chunked in infers) + other + tail
    _feed(reader, stream, cuts)
    assert [(r.route, r.body, r.keep_alive) for r in got] == [
        (("m", None), body, True) for body, _ in infers
    ]
    assert reader.handover and not reader.parsing
    assert reader.handover_bytes() == other + tail  # exactly: nothing lost, nothing extra


@given(st.lists(st.tuples(_bodies, st.booleans()), min_size=1, max_size=4))
def test_message_end_finds_each_boundary(infers: list[tuple[bytes, bool]]) -> None:
    messages = [_infer(body, chunked) for body, chunked in infers]
    data = memoryview(b"".join(messages))
    start = 0
    for message in messages:
        end = message_end(data[start:])
        assert end == len(message)
        start += end


def test_refusals_close_the_connection() -> None:
    reader, got = _reader(max_body=1024)
    reader.feed(_infer(b"x" * 2000, chunked=False))
    assert got[0].refusal == (413, "body of 2000 bytes exceeds the limit of 1024")
    assert not got[0].keep_alive and not reader.parsing and not reader.handover
    reader, got = _reader(max_body=1024)
    reader.feed(_infer(b"x" * 2000, chunked=True))
    assert got[0].refusal == (413, "body exceeds the limit of 1024 bytes")
    reader, got = _reader()
    reader.feed(_infer(b"{}", chunked=False) + b"\x00garbage\r\n\r\n")
    assert got[0].refusal is None and got[1].refusal is not None
    assert got[1].refusal[0] == 400 and not reader.parsing


def test_connection_close_and_http10_stop_reading() -> None:
    reader, got = _reader()
    close = b"POST /v2/models/m/infer HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    reader.feed(close + _infer(b"", chunked=False))
    assert [r.keep_alive for r in got] == [False] and not reader.parsing
    reader, got = _reader()
    reader.feed(b"POST /v2/models/m/versions/2/infer HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert [(r.route, r.version, r.keep_alive) for r in got] == [(("m", "2"), "1.0", False)]


def test_headers_are_lower_case_and_first_wins() -> None:
    reader, got = _reader()
    reader.feed(
        b"POST /v2/models/m/infer HTTP/1.1\r\nX-Request-ID: one\r\nx-request-id: two\r\n"
        b"X-User: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    assert got[0].headers["x-request-id"] == "one"
    assert got[0].headers["x-user"] == "café"


def test_what_aiohttps_limits_would_refuse_is_handed_over() -> None:
    long_url = b"POST /v2/models/" + b"m" * 9000 + b"/infer HTTP/1.1\r\n\r\n"
    endless_header = b"POST /v2/models/m/infer HTTP/1.1\r\nX-Big: " + b"x" * (3 << 20)
    many = b"POST /v2/models/m/infer HTTP/1.1\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n"
    for stream in (long_url, endless_header, many):
        reader, got = _reader()
        for i in range(0, len(stream), 65536):  # as reads would bring it
            reader.feed(stream[i : i + 65536])
        assert reader.handover and not got
        assert reader.handover_bytes() == stream
