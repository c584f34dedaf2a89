"""The effects a rollout transition asks its shell to run: save, audit, route, reset, threshold.

Plain frozen values. policy/lifecycle.py returns them in the order they must run;
the gateway's shell (proxy/rollouts.py) runs each exactly once, in that order, and
stops at the first that raises. The order is the write-ahead rule: a state is saved,
then audited, and only then routed or announced, so a crash in between leaves a saved
decision that the next start applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rollguard.policy.state import Phase, RolloutState


@dataclass(frozen=True, slots=True)
class Save:
    """Persist `state` (RolloutState.to_json) in the state store; the shell holds it
    in memory once this and the Audit right after it, if any, have succeeded."""

    state: RolloutState


@dataclass(frozen=True, slots=True)
class Audit:
    """Append one audit entry; with `announce`, also send the appended record to the
    rollout's webhooks (fire-and-forget)."""

    kind: str  # start, restore, decision, admin, policy, threshold, policy_*
    actor: str
    data: Mapping[str, Any]
    announce: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """Publish the routing that `state` calls for: its weight, mirrored or not.

    Emitted on every committed change; the shell swaps the router's table only when
    the table it builds differs from the one being served.
    """

    state: RolloutState
    mirroring: bool  # mirror requests to the candidate instead of routing to it

    @property
    def weight(self) -> float:
        return self.state.weight

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def failover(self) -> str | None:
        """Why the candidate cannot take traffic (its share goes to stable), or None."""
        return self.state.unavailable


@dataclass(frozen=True, slots=True)
class ResetWindows:
    """Zero both variants' counters: counts are "since the rollout began"."""


@dataclass(frozen=True, slots=True)
class SetLatencyThreshold:
    """Count requests slower than `seconds` in both windows from now on (None: stop),
    among requests of at most `rows` rows (None: any size), and of those the ones
    slower than `tolerance` (ratio × seconds, for a latency check's PASS; None: not)."""

    seconds: float | None
    rows: int | None = None
    tolerance: float | None = None


Effect = Save | Audit | Route | ResetWindows | SetLatencyThreshold
