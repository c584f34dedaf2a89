"""The proxy's own errors, and the one table that maps every product error to an HTTP status.

ProxyError
├── MalformedRequest       the bytes are not an HTTP/1.1 request we can read
│   └── UnsupportedEncoding    a Content-Encoding or Expect we do not take
├── BodyTooLarge           the body is over `max_body_bytes`
├── TooBusy                `max_inflight` requests are in flight, or a connection/body cap is full
├── RequestTimeout         a request's head or body did not arrive in time
├── RouteNotFound          no route for the path
├── MethodNotAllowed       the path exists, not for that method (`allowed` names those)
├── Unauthorized           no credential, or one that does not verify (401, challenge)
├── Forbidden              a credential (or a client) that may not do this (403)
├── RateLimited            the client's token bucket is empty (`retry_after` seconds)
├── FeedbackUnknown        a label for a request id that is not (or no longer) known
└── InvalidResponse        a handler's answer cannot be written as HTTP (a bug of ours)

The serving and policy packages have their own roots (serving/errors.py,
policy/errors.py); none of the three knows HTTP. `status_for` is the only place where
an error becomes a status, for the data port and the admin port alike, and
`public_message` the only place where it becomes the text a client reads: absolute paths
are cut to their file name, URLs to "the upstream", sha256 digests hidden (the full text
goes to the log).
"""

from __future__ import annotations

import re

from rollguard.policy.errors import ActionRejected, PolicyError, PolicyInvalid, RolloutNotFound
from rollguard.proxy.fleet.errors import Fenced, FleetUnavailable
from rollguard.serving.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServingError,
    UpstreamError,
    UpstreamRejected,
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
    """The gateway has as many requests in flight (or connections, or buffered bodies) as
    it admits."""


class RequestTimeout(ProxyError):
    """A request's head or body stopped arriving: `header_timeout_s` / `body_timeout_s`."""


class RouteNotFound(ProxyError):
    """No route matches the request's path."""


class MethodNotAllowed(ProxyError):
    """A route matches the path, but not the method."""

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class Unauthorized(ProxyError):
    """No credential where one is needed, or one that does not verify. `challenge` is the
    WWW-Authenticate value (RFC 6750)."""

    def __init__(self, message: str, challenge: str = 'Bearer realm="rollguard"') -> None:
        super().__init__(message)
        self.challenge = challenge


class Forbidden(ProxyError):
    """A verified caller that may not do this (scope, model), or a client admin refuses.
    `challenge`, when set, is sent as WWW-Authenticate (insufficient_scope)."""

    def __init__(self, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        self.challenge = challenge


class RateLimited(ProxyError):
    """The client has used up its rate limit; `retry_after` whole seconds until a token."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FeedbackUnknown(ProxyError):
    """A feedback label names a request id the gateway no longer (or never) knew."""


class FeedbackExpired(ProxyError):
    """A feedback label names a request the gateway knew but has forgotten (its bounds)."""


class InvalidResponse(ProxyError):
    """An answer with a header HTTP cannot carry; answered 500 instead."""


# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (UnsupportedEncoding, 415),
    (MalformedRequest, 400),
    (BodyTooLarge, 413),
    (TooBusy, 503),
    (RequestTimeout, 408),
    (RouteNotFound, 404),
    (MethodNotAllowed, 405),
    (Unauthorized, 401),
    (Forbidden, 403),
    (RateLimited, 429),
    (FeedbackUnknown, 404),
    (FeedbackExpired, 410),
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
    (FleetUnavailable, 503),  # fleet mode: Redis did not answer; nothing was changed
    (Fenced, 409),  # fleet mode: another write came first; read the state and retry
)

RETRY_AFTER_S = "1"  # said with every 503


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception answers with; 500 for anything unforeseen."""
    if isinstance(exc, UpstreamRejected):
        return exc.status  # the upstream's own 4xx, passed through
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def unforeseen(exc: BaseException) -> bool:
    """True for a 500 that is a bug of ours rather than a model's failure (logged)."""
    return status_for(exc) == 500 and not isinstance(exc, ServingError | PolicyError)


# What a client must not read in an error: where files live, where upstreams are, digests.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>:,.;)]")
_DIGEST = re.compile(r"\b[0-9a-fA-F]{64}\b")
_ABSOLUTE = re.compile(r"(?<![\w.:/-])(?:/[^\s/'\":,()\[\]]+)+/?")
_RELATIVE = re.compile(r"\b(?:[\w.-]+/){2,}[\w.-]+")  # registry/fraud/1.0.0/model.onnx
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F:]*:[0-9a-fA-F:]*\]")


def public_message(exc: BaseException) -> str:
    """What a client is told about `exc`. A bug of ours says nothing more. The proxy's own
    errors only echo the client's request and stay as they are; the others keep their
    words with URLs said as "the upstream", paths cut to the file name, IP addresses and
    sha256 digests hidden."""
    if unforeseen(exc):
        return "internal error; the gateway log has the details"
    text = str(exc)
    if isinstance(exc, ProxyError):
        return text
    text = _URL.sub("the upstream", text)
    text = _ABSOLUTE.sub(_file_name, text)
    text = _RELATIVE.sub(_file_name, text)
    text = _ADDRESS.sub("[address]", text)
    return _DIGEST.sub("[sha256]", text)


def _file_name(match: re.Match[str]) -> str:
    return match.group(0).rstrip("/").rsplit("/", 1)[-1] or "[path]"
