"""What every front end shares: body and in-flight limits, replies, and errors as replies.

Both the aiohttp application (proxy/app.py) and the fast infer path (proxy/fastpath.py)
answer through these, so limits, the in-flight count and error bodies cannot diverge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from aiohttp import web

from rollguard.proxy.calls import variant_of
from rollguard.proxy.errors import RETRY_AFTER_S, BodyTooLarge, TooBusy, status_for
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.settings import Settings
from rollguard.proxy.state import REQUEST_ID_HEADER, VARIANT_HEADER
from rollguard.serving.errors import ModelExecutionError

log = logging.getLogger("rollguard")

JSON = "application/json"


@dataclass(slots=True)
class Reply:
    """A response independent of the transport that writes it."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] | None = None  # beyond Content-Type and Content-Length

    def to_response(self) -> web.Response:
        response = web.Response(body=self.body, status=self.status, content_type=self.content_type)
        if self.headers:
            for name, value in self.headers:
                response.headers[name] = value
        return response


def error_reply(
    status: int, message: str, request_id: str | None, variant: str | None = None
) -> Reply:
    """The JSON error body `{"error": ...}`, the request id, the failing variant, Retry-After."""
    headers: list[tuple[str, str]] = []
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id))
    if variant:
        headers.append((VARIANT_HEADER, variant))
    if status == 503:
        headers.append(("Retry-After", RETRY_AFTER_S))
    return Reply(status, orjson.dumps({"error": message}), JSON, headers)


def reply_for(exc: Exception, request_id: str, what: str) -> Reply:
    """An exception as its reply; unexpected 500s are logged with `what` (method and path)."""
    status = status_for(exc)
    if status == 500 and not isinstance(exc, ModelExecutionError):
        log.exception("%s failed", what)
    return error_reply(status, str(exc), request_id, variant_of(exc))


class Limits:
    """The body size limit and the one in-flight count every front end admits through."""

    __slots__ = ("_rejected", "inflight", "max_body", "max_inflight")

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.inflight = 0
        self.max_inflight = settings.max_inflight
        self.max_body = settings.max_body_bytes
        self._rejected = metrics.rejected

    def check_length(self, length: int | None) -> None:
        """BodyTooLarge for a declared length over the limit."""
        if length is not None and length > self.max_body:
            raise BodyTooLarge(f"body of {length} bytes exceeds the limit of {self.max_body}")

    def too_large_message(self) -> str:
        """What a body found too large while reading (no length declared) answers."""
        return f"body exceeds the limit of {self.max_body} bytes"

    def enter(self, model: str, reject: bool = True) -> None:
        """Count one more request in flight; TooBusy (counted) when full and `reject`."""
        if reject and self.inflight >= self.max_inflight:
            self._rejected.labels(model, "overloaded").inc()
            raise TooBusy(f"{self.inflight} requests in flight, the limit is {self.max_inflight}")
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1


LIMITS = web.AppKey("limits", Limits)
