"""The proxy's own errors, and the one table that maps every product error to an HTTP status.

ProxyError
├── MalformedRequest       the bytes are not an HTTP/1.1 request we can read
│   └── UnsupportedEncoding    a Content-Encoding or Expect we do not take
├── BodyTooLarge           the body is over `max_body_bytes`
├── TooBusy                `max_inflight` requests are in flight
├── RouteNotFound          no route for the path
├── MethodNotAllowed       the path exists, not for that method (`allowed` names those)
├── Unauthorized           admin: no or wrong bearer token
├── Forbidden              admin: no token set and the client is not on loopback
├── FeedbackUnknown        a label for a request id that is not (or no longer) known
└── InvalidResponse        a handler's answer cannot be written as HTTP (a bug of ours)

The serving and policy packages have their own roots (serving/errors.py,
policy/errors.py); none of the three knows HTTP. `status_for` is the only place where
an error becomes a status, for the data port and the admin port alike.
"""

from __future__ import annotations

from rollguard.policy.errors import ActionRejected, PolicyError, PolicyInvalid, RolloutNotFound
from rollguard.serving.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
)


class ProxyError(Exception):
    """Root of the errors the gateway's HTTP layers raise."""


class MalformedRequest(ProxyError):
    """The request could not be read as HTTP/1.1 (or its body not decoded)."""


class UnsupportedEncoding(MalformedRequest):
    """A Content-Encoding other than gzip/deflate/identity, or an unknown Expect."""


class BodyTooLarge(ProxyError):
    """The request body exceeds the configured limit."""


class TooBusy(ProxyError):
    """The gateway has as many requests in flight as it admits."""


class RouteNotFound(ProxyError):
    """No route matches the request's path."""


class MethodNotAllowed(ProxyError):
    """A route matches the path, but not the method."""

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class Unauthorized(ProxyError):
    """Admin needs a bearer token that this request did not give."""


class Forbidden(ProxyError):
    """Admin without a token answers loopback clients only."""


class FeedbackUnknown(ProxyError):
    """A feedback label names a request id the gateway no longer (or never) knew."""


class InvalidResponse(ProxyError):
    """An answer with a header HTTP cannot carry; answered 500 instead."""


# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (UnsupportedEncoding, 415),
    (MalformedRequest, 400),
    (BodyTooLarge, 413),
    (TooBusy, 503),
    (RouteNotFound, 404),
    (MethodNotAllowed, 405),
    (Unauthorized, 401),
    (Forbidden, 403),
    (FeedbackUnknown, 404),
    (InvalidResponse, 500),
    (InvalidInput, 400),
    (ModelNotFound, 404),  # VersionNotFound included
    (NotReady, 503),
    (Overloaded, 503),
    (DeadlineExceeded, 504),
    (UpstreamTimeout, 504),
    (UpstreamError, 502),
    (ModelExecutionError, 500),
    (ServingError, 500),
    (PolicyInvalid, 400),
    (RolloutNotFound, 404),
    (ActionRejected, 409),
    (PolicyError, 500),
)

RETRY_AFTER_S = "1"  # said with every 503


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception answers with; 500 for anything unforeseen."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def unforeseen(exc: BaseException) -> bool:
    """True for a 500 that is a bug of ours rather than a model's failure (logged)."""
    return status_for(exc) == 500 and not isinstance(exc, ServingError | PolicyError)
