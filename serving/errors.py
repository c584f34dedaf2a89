"""The serving package's exception tree; no HTTP codes here (proxy/errors.py maps them).

ServingError
├── ManifestError          model.yaml missing, unparsable or invalid
├── ArtifactError          artifact missing, sha256 mismatch, unloadable
│   └── FrameworkUnavailable   the framework's library is not installed
├── ModelNotFound          no such model in the registry
│   └── VersionNotFound    the model exists, the version does not
├── NotReady               the version exists but is not loaded / not ready
├── InvalidInput           tensors do not match the manifest (name, datatype, shape)
├── ModelExecutionError    the model raised while predicting
│   └── WorkerLost         its worker process died during the call
├── DeadlineExceeded       a local version did not answer within its time limit
├── UpstreamError          an HTTP upstream answered with an error or not at all
│   └── UpstreamTimeout    the upstream did not answer in time
├── UpstreamRejected       an HTTP upstream refused the client's request as the client's
│                          fault (a 4xx passed through as it came, counted against no one)
└── Overloaded             a bounded queue is full
"""

from __future__ import annotations


class ServingError(Exception):
    """Root of every error the serving core raises.

    `version` names the version whose call failed, when one did: the answer says which
    variant it came from and the windows count it against that one.
    """

    version: str | None = None


class ManifestError(ServingError):
    """A model.yaml is missing, does not parse, or does not validate."""


class ArtifactError(ServingError):
    """An artifact is missing, has the wrong sha256, or cannot be loaded."""


class FrameworkUnavailable(ArtifactError):
    """The artifact needs a library (e.g. torch) that is not installed."""


class ModelNotFound(ServingError):
    """No model of that name is known."""


class VersionNotFound(ModelNotFound):
    """The model is known but not that version."""


class NotReady(ServingError):
    """The version is known but not loaded, or the model has no servable version."""


class InvalidInput(ServingError):
    """The request's tensors do not match what the model declares."""


class ModelExecutionError(ServingError):
    """The model itself raised while predicting."""


class WorkerLost(ModelExecutionError):
    """A process-isolated version's worker process died during the call (a crash, the
    memory limit): the version's failure, and one no other version is asked to repeat."""


class DeadlineExceeded(ServingError):
    """A version's call did not finish within its time limit (it may still run on)."""


class UpstreamError(ServingError):
    """An HTTP upstream failed: connection refused, 5xx, or an unreadable answer.

    `health_serial`: where the failure stands in its upstream's health record
    (serving/health.py), so that it alone can be excused later."""

    health_serial: int | None = None


class UpstreamTimeout(UpstreamError):
    """An HTTP upstream did not answer within its timeout."""


class UpstreamRejected(ServingError):
    """An upstream refused the request as the client's fault (its 400, 422, ...): the
    answer goes back to the client as it came, and counts against no version."""

    def __init__(self, message: str, status: int, body: bytes, content_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.content_type = content_type


class Overloaded(ServingError):
    """A bounded queue or concurrency limit is full."""
