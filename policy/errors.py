"""The policy package's exception tree; no HTTP codes here (proxy/errors.py maps them).

PolicyError
├── PolicyInvalid        a Rollout file does not parse or validate (file, line, field)
├── RolloutNotFound      no rollout of that name
├── ActionRejected       an admin action does not fit the rollout's state
├── StateError           the state directory cannot be read or written
└── AuditError           the audit log cannot be written, or fails verification
"""

from __future__ import annotations


class PolicyError(Exception):
    """Root of every error the policy package raises."""


class PolicyInvalid(PolicyError):
    """A Rollout document is invalid; the message names file, line and field."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.line = line


class RolloutNotFound(PolicyError):
    """No rollout of that name is loaded."""


class ActionRejected(PolicyError):
    """An admin action (approve, promote, ...) does not fit the rollout's current state."""


class StateError(PolicyError):
    """Persisted rollout state cannot be read or written."""


class AuditError(PolicyError):
    """The audit log cannot be appended to, or verification found tampering."""
