"""The fleet package's exception tree; no HTTP codes here (proxy/errors.py maps statuses).

FleetError
├── FleetUnavailable   Redis cannot be reached or did not answer in time: keep routing
│                      on the last known weights, stop deciding, retry later
├── InvalidTarget      a `state: redis://...` URL that cannot be used (names what is wrong)
└── Fenced             a write refused because the writer no longer holds the decider
                       lease or read an older state version (a stale decider)

A state or audit record that does not verify raises policy's StateError / AuditError,
exactly as the file store does: a forged record is not an outage.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error the fleet package raises."""


class FleetUnavailable(FleetError):
    """Redis did not answer: the operation did not happen (or its outcome is unknown)."""


class InvalidTarget(FleetError):
    """A Redis state URL that cannot be used; the message names the part that is wrong."""


class Fenced(FleetError):
    """A stale writer: the lease is held by another process, or the state moved on."""
