"""The decision core: given a rollout, its state and the check results, what happens next.

Pure functions, no I/O and no clock: `decide` for the periodic loop, `apply_action` for
an operator's command. The controller (policy/controller.py) persists and applies what
they return. The rules, one state machine per strategy:

- Any check that FAILs with on_fail=rollback rolls back in every non-terminal phase,
  paused included: like Argo Rollouts, whose background analysis aborts a paused
  rollout, a pause stops progress, never protection.
- A FAIL with on_fail=hold holds (no progress) until it passes; one with on_fail=alert
  is reported and never gates anything.
- Progress (advance, promote, flip, shadow hand-over) needs every rollback/hold check to
  PASS: INCONCLUSIVE blocks it, since "not enough evidence yet" is no licence to move
  more traffic. After a blue-green flip the old side gets no traffic, so there only the
  absence of a FAIL through warm_hold is required.
- canary: walk spec.steps, each until its hold elapsed and its min_requests reached; with
  require_approval wait for an approve before the last step (or, with a single step,
  before promoting); after the last step promote.
- ab: hold spec.ab_weight until sample_size requests in all or duration, then conclude
  on spec.primary_metric: the candidate (weight 100) or stable (weight 0) wins when a
  two-sided always-valid interval of their difference excludes zero, else inconclusive
  (weight 0). A concluded test is terminal; an operator may still promote it.
- blue_green: warm the candidate on mirrored traffic (weight 0) for steps[0]'s hold and
  min_requests, flip to 100 (after an approve if required), promote after warm_hold.
- shadow: weight 0; with then_canary, hand over to a canary at steps[0] once checks pass.
- Terminal phases (promoted, rolled_back, concluded) never change on their own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rollguard.policy.errors import ActionRejected
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Rollout, Spec
from rollguard.policy.sequential import difference_sequence
from rollguard.policy.state import Phase, RolloutState, routing_weight
from rollguard.policy.verdict import CheckResult, Verdict

__all__ = ["ACTIONS", "Action", "Counts", "Decision", "apply_action", "decide", "routing_weight"]

ACTIONS = ("rollback", "promote", "pause", "resume", "approve")
_AB_MIN_SAMPLES = 200  # per arm, before an A/B verdict names a winner (plug-in variances)


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


def decide(
    rollout: Rollout,
    state: RolloutState,
    results: Sequence[CheckResult],
    counts: Counts,
    now: float,
) -> Decision:
    """The periodic decision for one rollout (see the module docstring for the rules)."""
    evidence = tuple(_json_safe(r.to_json()) for r in results)
    if state.phase.terminal:
        return _decision(rollout, state, state, Action.NONE, evidence)
    base = _rebase(state, counts)
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    rollback = [r for r in failed if r.check.on_fail == "rollback"]
    if rollback:
        action = Action.FLIP_BACK if _effective(state) is Phase.FLIPPED else Action.ROLLBACK
        new = _rolled_back(base, "rollback: " + _describe(rollback))
        return _decision(rollout, state, new, action, evidence)
    if state.phase is Phase.PAUSED:
        new = replace(base, reason=f"paused (from {_effective(state).value}): no progress")
        return _decision(rollout, state, new, Action.NONE, evidence)
    hold = [r for r in failed if r.check.on_fail == "hold"]
    alert = [r for r in failed if r.check.on_fail == "alert"]
    base = replace(base, holding=_metrics(hold), alerting=_metrics(alert))
    if hold:
        action, new = Action.HOLD, replace(base, reason="hold: " + _describe(hold))
    else:
        # Gating checks are all but the alert-only ones; one not yet PASS means wait.
        waiting = [
            r for r in results if r.check.on_fail != "alert" and r.verdict is not Verdict.PASS
        ]
        tick = _Tick(rollout, results, waiting, counts, now)
        action, new = _MACHINES[_machine(rollout, state)](tick, base)
    if alert:
        note = "alert: " + _describe(alert)
        if action is Action.NONE:
            action, new = Action.ALERT, replace(new, reason=note)
        else:
            new = replace(new, reason=f"{new.reason}; {note}")
    return _decision(rollout, state, new, action, evidence)


def apply_action(
    rollout: Rollout, state: RolloutState, action: str, actor: str, now: float
) -> Decision:
    """An operator's command as a decision; ActionRejected when it does not fit the state."""
    phase = state.phase
    if action not in ACTIONS:
        raise ActionRejected(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if action == "rollback":
        if phase is Phase.ROLLED_BACK:
            raise ActionRejected(f"rollout {state.name!r} is already rolled back")
        kind = Action.FLIP_BACK if _effective(state) is Phase.FLIPPED else Action.ROLLBACK
        return _decision(rollout, state, _rolled_back(state, f"rollback by {actor}"), kind)
    # A concluded A/B test is advice: an operator may still promote its candidate.
    if phase.terminal and not (action == "promote" and phase is Phase.CONCLUDED):
        raise ActionRejected(
            f"rollout {state.name!r} is {phase.value}: only rollback applies, not {action}"
        )
    if action == "promote":
        new = _ended(state, Phase.PROMOTED, f"promoted by {actor}")
        return _decision(rollout, state, new, Action.PROMOTE)
    if action == "pause":
        if phase is Phase.PAUSED:
            raise ActionRejected(f"rollout {state.name!r} is already paused")
        new = replace(
            state, phase=Phase.PAUSED, paused_from=phase, paused_at=now, reason=f"paused by {actor}"
        )
        return _decision(rollout, state, new, Action.PAUSE)
    if action == "resume":
        if phase is not Phase.PAUSED or state.paused_from is None:
            raise ActionRejected(f"rollout {state.name!r} is {phase.value}, not paused")
        # Paused time does not count towards a step's hold (nor ab duration, warm_hold).
        paused_for = now - (state.paused_at if state.paused_at is not None else now)
        new = replace(
            state,
            phase=state.paused_from,
            paused_from=None,
            paused_at=None,
            step_started_at=state.step_started_at + paused_for,
            reason=f"resumed by {actor}",
        )
        return _decision(rollout, state, new, Action.RESUME)
    if phase is not Phase.AWAITING_APPROVAL:  # approve
        hint = " (resume it first)" if state.paused_from is Phase.AWAITING_APPROVAL else ""
        raise ActionRejected(
            f"rollout {state.name!r} is {phase.value}, not awaiting approval{hint}"
        )
    approved = replace(state, approved_by=actor, approved_at=now)
    _, new = _progress(rollout, approved, now, None, f"approved by {actor}")
    return _decision(rollout, state, new, Action.APPROVE)


# -- the strategies' state machines; each returns (action, new state with its reason) --

_Machine = tuple[Action, RolloutState]


@dataclass(frozen=True, slots=True)
class _Tick:
    """One decide() call's inputs; `waiting`: gating checks that did not PASS yet."""

    rollout: Rollout
    results: Sequence[CheckResult]
    waiting: list[CheckResult]
    counts: Counts
    now: float


def _canary(t: _Tick, state: RolloutState) -> _Machine:
    steps = t.rollout.spec.steps
    i = min(state.step, len(steps) - 1)
    where = f"step {i + 1}/{len(steps)} (weight {steps[i].weight:g})"
    if state.phase is Phase.AWAITING_APPROVAL:
        return Action.NONE, replace(state, reason=f"{where}: awaiting approval")
    if blocked := _blocked(t, state, i):
        return Action.NONE, replace(state, reason=f"{where}: {blocked}")
    last = i == len(steps) - 1
    if t.rollout.spec.require_approval and state.approved_by is None and i >= len(steps) - 2:
        target = "promote" if last else f"enter step {i + 2} (weight {steps[i + 1].weight:g})"
        new = replace(
            state, phase=Phase.AWAITING_APPROVAL, reason=f"{where} done: approve to {target}"
        )
        return Action.AWAIT_APPROVAL, new
    return _progress(t.rollout, state, t.now, t.counts.candidate, f"{where} done, checks pass")


def _blue_green(t: _Tick, state: RolloutState) -> _Machine:
    spec = t.rollout.spec
    if state.phase is Phase.AWAITING_APPROVAL:
        return Action.NONE, replace(state, reason="warmed: awaiting approval to flip")
    if state.phase is Phase.FLIPPED:
        left = spec.warm_hold - (t.now - state.step_started_at)
        if left > 0:
            return Action.NONE, replace(state, reason=f"flipped: old side warm {left:.0f}s more")
        new = _ended(state, Phase.PROMOTED, f"promote: no failed check in {spec.warm_hold:g}s")
        return Action.PROMOTE, new
    if blocked := _blocked(t, state, 0):
        return Action.NONE, replace(state, reason=f"warming: {blocked}")
    if spec.require_approval and state.approved_by is None:
        new = replace(state, phase=Phase.AWAITING_APPROVAL, reason="warmed: approve to flip")
        return Action.AWAIT_APPROVAL, new
    return _progress(t.rollout, state, t.now, t.counts.candidate, "warmed, checks pass")


def _ab(t: _Tick, state: RolloutState) -> _Machine:
    spec = t.rollout.spec
    total, elapsed = t.counts.stable + t.counts.candidate, t.now - state.step_started_at
    if not (
        (spec.sample_size is not None and total >= spec.sample_size)
        or (spec.duration is not None and elapsed >= spec.duration)
    ):
        goal = [f"{total}/{spec.sample_size} requests"] if spec.sample_size else []
        goal += [f"{elapsed:.0f}/{spec.duration:g}s"] if spec.duration else []
        return Action.NONE, replace(state, reason=f"ab at {spec.ab_weight:g}%: {', '.join(goal)}")
    winner, ci, basis = _ab_winner(spec, state, t.counts)
    reason = f"conclude on {spec.primary_metric}: {winner} ({basis})"
    new = replace(state, phase=Phase.CONCLUDED, winner=winner, ci=ci, reason=reason)
    return Action.CONCLUDE, new


def _shadow(t: _Tick, state: RolloutState) -> _Machine:
    spec = t.rollout.spec
    report = _describe(t.results) or "no checks"
    if not spec.then_canary or not spec.steps:
        return Action.NONE, replace(state, reason=f"shadowing: {report}")
    if t.waiting:
        return Action.NONE, replace(state, reason="shadowing: waiting for " + _describe(t.waiting))
    new = replace(
        state,
        phase=Phase.PROGRESSING,
        step=0,
        step_started_at=t.now,
        step_start_requests=t.counts.candidate,
        reason=f"shadow checks pass ({report}): canary step 1 (weight {spec.steps[0].weight:g})",
    )
    return Action.ADVANCE, new


_MACHINES = {"canary": _canary, "blue_green": _blue_green, "ab": _ab, "shadow": _shadow}


def _machine(rollout: Rollout, state: RolloutState) -> str:
    # A shadow that handed over runs the canary machine from then on.
    if rollout.spec.strategy == "shadow" and state.phase is not Phase.SHADOWING:
        return "canary"
    return rollout.spec.strategy


def _blocked(t: _Tick, state: RolloutState, i: int) -> str:
    """Why step i is not done yet ('' when it is): checks, hold time, request count."""
    if t.waiting:
        return "waiting for " + _describe(t.waiting)
    step = t.rollout.spec.steps[i]
    if (elapsed := t.now - state.step_started_at) < step.hold:
        return f"held {elapsed:.0f}s of {step.hold:g}s"
    done = t.counts.candidate - (state.step_start_requests or 0)
    if done < step.min_requests:
        return f"{done} of {step.min_requests} candidate requests"
    return ""


def _progress(
    rollout: Rollout, state: RolloutState, now: float, requests: int | None, why: str
) -> _Machine:
    """Move past the current step: next canary step, the blue-green flip, or promote.

    `requests`: the candidate's count now, the new step's baseline (None from an admin
    action, which has no counts: the next tick's count is taken instead)."""
    steps = rollout.spec.steps
    if rollout.spec.strategy == "blue_green":
        new = replace(
            state,
            phase=Phase.FLIPPED,
            step_started_at=now,
            step_start_requests=requests,
            reason=f"{why}: flip to the candidate, old side warm {rollout.spec.warm_hold:g}s",
        )
        return Action.FLIP, new
    i = min(state.step, len(steps) - 1)
    if i == len(steps) - 1:
        return Action.PROMOTE, _ended(state, Phase.PROMOTED, f"{why}: promote")
    new = replace(
        state,
        phase=Phase.PROGRESSING,
        step=i + 1,
        step_started_at=now,
        step_start_requests=requests,
        reason=f"{why}: advance to step {i + 2}/{len(steps)} (weight {steps[i + 1].weight:g})",
    )
    return Action.ADVANCE, new


def _ab_winner(
    spec: Spec, state: RolloutState, counts: Counts
) -> tuple[str, tuple[float, float] | None, str]:
    """The version that won on the primary metric: a two-sided always-valid interval of
    candidate minus stable that excludes zero. The checks' own intervals are one-sided
    (evidence of harm only), so they cannot name the candidate a winner."""
    (xs, ns), (xc, nc) = counts.stable_primary, counts.candidate_primary
    if min(ns, nc) < _AB_MIN_SAMPLES:
        return "inconclusive", None, f"n = {ns} stable, {nc} candidate: too few to compare"
    b = difference_sequence(xs, ns, xc, nc, spec.alpha, side="two-sided")
    low, high = b.lower, b.upper
    # Accuracy is better higher; error rate and slow-request rate lower.
    better, worse = (
        (low > 0, high < 0) if spec.primary_metric == "accuracy" else (high < 0, low > 0)
    )
    winner = state.candidate if better else state.stable if worse else "inconclusive"
    basis = f"candidate - stable {b.estimate:.4g} in [{low:.4g}, {high:.4g}], alpha {spec.alpha:g}"
    return winner, (low, high), basis


# -- small helpers --


def _decision(
    rollout: Rollout,
    old: RolloutState,
    new: RolloutState,
    action: Action,
    evidence: tuple[dict[str, object], ...] = (),
) -> Decision:
    weight = routing_weight(rollout, new)
    new = replace(new, weight=weight)
    changed = replace(old, reason="") != replace(new, reason="")
    return Decision(action, new, weight, new.reason, evidence, changed)


def _rebase(state: RolloutState, counts: Counts) -> RolloutState:
    """Fix the step's request baseline: unknown after an action, or counters restarted."""
    if state.step_start_requests is None:
        return replace(state, step_start_requests=counts.candidate)
    if counts.candidate < state.step_start_requests:
        return replace(state, step_start_requests=0)
    return state


def _rolled_back(state: RolloutState, reason: str) -> RolloutState:
    return _ended(state, Phase.ROLLED_BACK, reason)


def _ended(state: RolloutState, phase: Phase, reason: str) -> RolloutState:
    return replace(state, phase=phase, paused_from=None, paused_at=None, holding=(), reason=reason)


def _effective(state: RolloutState) -> Phase:
    return state.paused_from if state.phase is Phase.PAUSED and state.paused_from else state.phase


def _metrics(results: Sequence[CheckResult]) -> tuple[str, ...]:
    return tuple(sorted({r.check.metric for r in results}))


def describe(result: CheckResult) -> str:
    """One check result in a few words: 'error_rate 0.034 vs 0.01 fail'."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    return (
        f"{result.check.metric} {num(result.value)} vs {num(result.bound)} {result.verdict.value}"
    )


def _json_safe(data: dict[str, object]) -> dict[str, object]:
    """Non-finite numbers as strings: the store and the audit log refuse NaN and infinity."""

    def fix(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return {k: fix(v) for k, v in value.items()} if isinstance(value, dict) else value

    return {k: fix(v) for k, v in data.items()}


def _describe(results: Sequence[CheckResult]) -> str:
    return "; ".join(describe(r) for r in results)
