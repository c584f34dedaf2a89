"""The one table that maps product errors to HTTP statuses and V2 error bodies."""

from __future__ import annotations

from rollguard.policy.errors import ActionRejected, PolicyError, PolicyInvalid, RolloutNotFound
from rollguard.serving.errors import (
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
)


class GatewayError(Exception):
    """Errors the gateway itself raises (body too large, overloaded, unauthorised)."""

    status = 500


class BodyTooLarge(GatewayError):
    status = 413


class TooBusy(GatewayError):
    status = 503


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class FeedbackUnknown(GatewayError):
    """A feedback label names a request id the gateway no longer (or never) knew."""

    status = 404


# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (InvalidInput, 400),
    (ModelNotFound, 404),  # VersionNotFound included
    (NotReady, 503),
    (Overloaded, 503),
    (UpstreamTimeout, 504),
    (UpstreamError, 502),
    (ModelExecutionError, 500),
    (ServingError, 500),
    (PolicyInvalid, 400),
    (RolloutNotFound, 404),
    (ActionRejected, 409),
    (PolicyError, 500),
)

RETRY_AFTER_S = "1"


def status_for(exc: Exception) -> int:
    """The HTTP status an exception answers with."""
    if isinstance(exc, GatewayError):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500
