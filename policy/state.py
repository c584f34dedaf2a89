"""One rollout's persisted state: phase, step, weight, approval, verdict; to and from JSON.

Times are wall-clock seconds since the epoch, handed in by the caller: state outlives
the process (a restart resumes a canary at its step, a rolled-back rollout stays rolled
back), and a monotonic clock means nothing across processes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from rollguard.policy.carry import Tally
from rollguard.policy.errors import StateError
from rollguard.policy.schema import Rollout

FORMAT = 1  # bump when the JSON layout changes incompatibly


class Phase(enum.Enum):
    PROGRESSING = "progressing"  # canary walking steps, ab splitting, blue-green warming
    PAUSED = "paused"  # an operator paused it; only a failed rollback check moves it
    AWAITING_APPROVAL = "awaiting_approval"  # the next move is the last step / the flip
    PROMOTED = "promoted"  # the candidate serves everything (terminal)
    ROLLED_BACK = "rolled_back"  # the stable serves everything (terminal)
    CONCLUDED = "concluded"  # ab verdict reached (terminal)
    SHADOWING = "shadowing"  # weight 0, the gateway mirrors requests to the candidate
    FLIPPED = "flipped"  # blue-green: candidate serves all, the old side kept warm
    WAITING = "waiting"  # the candidate cannot take traffic yet (not in the registry): weight 0
    INCONCLUSIVE = "inconclusive"  # a deadline passed (on_deadline: hold): weight held, no progress

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK, Phase.CONCLUDED})


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where one rollout stands. `generation` counts rollouts (new candidate) of this name."""

    name: str
    model: str
    stable: str
    candidate: str
    strategy: str
    phase: Phase
    generation: int = 1
    step: int = 0  # index into spec.steps (canary, and shadow after its hand-over)
    weight: float = 0.0  # candidate percent the router applies; see routing_weight
    started_at: float = 0.0  # when this generation began (ab duration)
    step_started_at: float = 0.0  # when the step began; blue-green: when it flipped
    # Candidate requests when the step began; None: take the next tick's count (an admin
    # action has no counts) or the counters restarted below it.
    step_start_requests: int | None = 0
    approved_by: str | None = None
    approved_at: float | None = None
    paused_from: Phase | None = None  # the phase a pause (or an inconclusive hold) stopped
    paused_at: float | None = None
    holding: tuple[str, ...] = ()  # metrics failing with on_fail=hold
    alerting: tuple[str, ...] = ()  # metrics failing with on_fail=alert
    latency_threshold: float | None = None  # seconds, frozen once per generation
    threshold_check: str | None = None  # the latency check (JSON) it was frozen for
    latency_rows: int | None = None  # larger requests are not counted (frozen with it)
    winner: str | None = None  # ab: a version, or "inconclusive"
    # Why the candidate cannot take traffic (an Availability value: missing, refused, stale,
    # loading, unready) and since when; its share fails over to the stable meanwhile.
    unavailable: str | None = None
    unavailable_since: float | None = None
    inconclusive: str | None = None  # the deadline that passed undecided, once it has
    ci: tuple[float, float] | None = None  # ab: candidate minus stable on the primary metric
    # The smallest sequential SRM p-value seen at candidate weight `srm_weight` (its running
    # minimum is the always-valid p-value): kept across restarts so that a router bug's
    # evidence does not vanish once the counts even out or the process restarts.
    srm_pvalue: float | None = None
    srm_weight: float | None = None
    # The sequential tests' counts (policy/carry.py): what earlier processes counted, and
    # what this one's windows had counted at the last tick; a restart continues the tests.
    carried: Tally | None = None
    seen: Tally | None = None
    reason: str = ""  # the last decision, one line

    @classmethod
    def initial(cls, rollout: Rollout, now: float, *, generation: int = 1) -> RolloutState:
        spec = rollout.spec
        state = cls(
            name=rollout.name,
            model=spec.model,
            stable=spec.stable,
            candidate=spec.candidate,
            strategy=spec.strategy,
            phase=Phase.SHADOWING if spec.strategy == "shadow" else Phase.PROGRESSING,
            generation=generation,
            started_at=now,
            step_started_at=now,
            reason=f"rollout {rollout.name} generation {generation} started: "
            f"{spec.strategy} {spec.stable} -> {spec.candidate}",
        )
        return replace(state, weight=routing_weight(rollout, state))

    def same_rollout(self, rollout: Rollout) -> bool:
        """True when `rollout` is this state's rollout (a thresholds-only edit at most)."""
        spec = rollout.spec
        return (self.model, self.stable, self.candidate, self.strategy) == (
            spec.model,
            spec.stable,
            spec.candidate,
            spec.strategy,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        data["paused_from"] = self.paused_from.value if self.paused_from else None
        data["holding"] = list(self.holding)
        data["alerting"] = list(self.alerting)
        data["ci"] = list(self.ci) if self.ci is not None else None
        data["carried"] = self.carried.to_json() if self.carried is not None else None
        data["seen"] = self.seen.to_json() if self.seen is not None else None
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        """The inverse of to_json; StateError names what is wrong with a bad document."""
        if data.get("format") != FORMAT:
            raise StateError(f"rollout state format {data.get('format')!r}: expected {FORMAT}")
        fields = dict(data)
        del fields["format"]
        try:
            fields["phase"] = Phase(fields["phase"])
            if fields.get("paused_from") is not None:
                fields["paused_from"] = Phase(fields["paused_from"])
            fields["holding"] = tuple(fields.get("holding", ()))
            fields["alerting"] = tuple(fields.get("alerting", ()))
            if fields.get("ci") is not None:
                low, high = fields["ci"]
                fields["ci"] = (float(low), float(high))
            for key in ("carried", "seen"):
                if fields.get(key) is not None:
                    fields[key] = Tally.from_json(fields[key])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"rollout state {data.get('name')!r} is malformed: {exc}") from exc


def routing_weight(rollout: Rollout, state: RolloutState) -> float:
    """The candidate percent the router should apply, from the policy and the state.

    Computed from the current policy rather than copied from the state so that a
    hot edit of a step's weight (or ab_weight) takes effect at once.
    """
    spec = rollout.spec
    phase = _effective(state)
    if phase in (Phase.ROLLED_BACK, Phase.SHADOWING, Phase.WAITING):
        return 0.0
    if phase in (Phase.PROMOTED, Phase.FLIPPED):
        return 100.0
    if phase is Phase.CONCLUDED:
        return 100.0 if state.winner == state.candidate else 0.0
    # PROGRESSING or AWAITING_APPROVAL
    if spec.strategy == "ab":
        return spec.ab_weight
    if spec.strategy == "blue_green" or not spec.steps:
        return 0.0  # blue-green warms the candidate on mirrored traffic only
    return spec.steps[min(state.step, len(spec.steps) - 1)].weight


def mirroring(rollout: Rollout, state: RolloutState) -> bool:
    """True when the gateway should mirror requests to the candidate (not routed)."""
    phase = _effective(state)
    if phase is Phase.SHADOWING:
        return True
    return rollout.spec.strategy == "blue_green" and phase in (
        Phase.PROGRESSING,
        Phase.AWAITING_APPROVAL,
    )


def _effective(state: RolloutState) -> Phase:
    """The phase that sets the routing: the one a pause or an inconclusive hold stopped."""
    if state.phase in (Phase.PAUSED, Phase.INCONCLUSIVE) and state.paused_from is not None:
        return state.paused_from
    return state.phase
