"""What a decision is made of: the Action vocabulary, the Counts it reads, the Decision it returns.

Value types only, shared by the rules (policy/decide.py) and the strategies' state
machines (policy/strategies.py), so that neither has to import the other's internals.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.state import RolloutState
from rollguard.policy.verdict import CheckResult


class Action(enum.Enum):
    NONE = "none"
    HOLD = "hold"
    ADVANCE = "advance"  # next canary step, or a shadow handing over to its canary
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    AWAIT_APPROVAL = "await_approval"
    FLIP = "flip"
    FLIP_BACK = "flip_back"
    CONCLUDE = "conclude"
    ALERT = "alert"
    BEGIN = "begin"  # a waiting rollout's candidate can take traffic: the rollout starts
    FAILOVER = "failover"  # the candidate cannot take traffic: its share goes to stable, hold
    RECOVER = "recover"  # the candidate can take traffic again: the failover ends
    INCONCLUSIVE = "inconclusive"  # a deadline passed undecided: on_deadline applies
    PAUSE = "pause"  # the last three come from operators only
    RESUME = "resume"
    APPROVE = "approve"


@dataclass(frozen=True, slots=True)
class Counts:
    """The counters decide() reads: requests per variant since the rollout began, and for
    an A/B verdict (events, n) per variant on the primary metric: errors per request,
    correct per labelled request, or slow per request since the latency threshold."""

    stable: int
    candidate: int
    stable_primary: tuple[int, int] = (0, 0)
    candidate_primary: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, evidence: Evidence, primary_metric: str = "error_rate") -> Counts:
        def pair(v: VariantEvidence) -> tuple[int, int]:
            if primary_metric == "accuracy":
                return v.correct, v.labelled
            if primary_metric == "latency":
                return v.over_threshold, v.since_threshold
            return v.errors, v.requests

        s, c = evidence.stable, evidence.candidate
        return cls(s.requests, c.requests, pair(s), pair(c))


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do, the state to persist before doing it, and why."""

    action: Action
    state: RolloutState
    weight: float  # candidate percent the router applies from now on
    reason: str  # one line: which check, its value and bound, or what is awaited
    evidence: tuple[dict[str, object], ...] = ()  # the check results, as JSON
    changed: bool = False  # the state changed beyond its reason: persist, audit, apply

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action.value,
            "reason": self.reason,
            "weight": self.weight,
            "checks": list(self.evidence),
            "state": self.state.to_json(),
        }


def describe(result: CheckResult) -> str:
    """One check result in a few words: 'error_rate 0.034 vs 0.01 fail'."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    return (
        f"{result.check.metric} {num(result.value)} vs {num(result.bound)} {result.verdict.value}"
    )


def describe_all(results: Sequence[CheckResult]) -> str:
    """Several check results on one line, for a decision's reason."""
    return "; ".join(describe(r) for r in results)
