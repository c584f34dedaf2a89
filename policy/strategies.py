"""The four strategies' state machines (canary, ab, blue_green, shadow): one tick's move each.

Pure functions. decide() (policy/decide.py) applies the rules every strategy shares
(rollback, pause, hold, alert) and calls `advance` only when none of them settled the
tick; the machine then returns the action and the new state with its reason. The rules
each machine follows are in decide.py's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from rollguard.policy.decision import Action, Counts, describe_all
from rollguard.policy.schema import Rollout, Spec
from rollguard.policy.sequential import difference_sequence
from rollguard.policy.state import Phase, RolloutState
from rollguard.policy.verdict import CheckResult

AB_MIN_SAMPLES = 200  # per arm, before an A/B verdict names a winner (plug-in variances)

Move = tuple[Action, RolloutState]


@dataclass(frozen=True, slots=True)
class Tick:
    """One decide() call's inputs; `waiting`: gating checks that did not PASS yet."""

    rollout: Rollout
    results: Sequence[CheckResult]
    waiting: list[CheckResult]
    counts: Counts
    now: float


def advance(t: Tick, state: RolloutState) -> Move:
    """The move of the rollout's strategy from `state` (no check failed that stops it)."""
    return _MACHINES[_machine(t.rollout, state)](t, state)


def progress(
    rollout: Rollout, state: RolloutState, now: float, requests: int | None, why: str
) -> Move:
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
        return Action.PROMOTE, ended(state, Phase.PROMOTED, f"{why}: promote")
    new = replace(
        state,
        phase=Phase.PROGRESSING,
        step=i + 1,
        step_started_at=now,
        step_start_requests=requests,
        reason=f"{why}: advance to step {i + 2}/{len(steps)} (weight {steps[i + 1].weight:g})",
    )
    return Action.ADVANCE, new


def ended(state: RolloutState, phase: Phase, reason: str) -> RolloutState:
    """`state` in a terminal phase: nothing paused, held or failed over any more."""
    return replace(
        state,
        phase=phase,
        paused_from=None,
        paused_at=None,
        holding=(),
        unavailable=None,
        unavailable_since=None,
        reason=reason,
    )


def _canary(t: Tick, state: RolloutState) -> Move:
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
    return progress(t.rollout, state, t.now, t.counts.candidate, f"{where} done, checks pass")


def _blue_green(t: Tick, state: RolloutState) -> Move:
    spec = t.rollout.spec
    if state.phase is Phase.AWAITING_APPROVAL:
        return Action.NONE, replace(state, reason="warmed: awaiting approval to flip")
    if state.phase is Phase.FLIPPED:
        left = spec.warm_hold - (t.now - state.step_started_at)
        if left > 0:
            return Action.NONE, replace(state, reason=f"flipped: old side warm {left:.0f}s more")
        new = ended(state, Phase.PROMOTED, f"promote: no failed check in {spec.warm_hold:g}s")
        return Action.PROMOTE, new
    if blocked := _blocked(t, state, 0):
        return Action.NONE, replace(state, reason=f"warming: {blocked}")
    if spec.require_approval and state.approved_by is None:
        new = replace(state, phase=Phase.AWAITING_APPROVAL, reason="warmed: approve to flip")
        return Action.AWAIT_APPROVAL, new
    return progress(t.rollout, state, t.now, t.counts.candidate, "warmed, checks pass")


def _ab(t: Tick, state: RolloutState) -> Move:
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


def _shadow(t: Tick, state: RolloutState) -> Move:
    spec = t.rollout.spec
    report = describe_all(t.results) or "no checks"
    if not spec.then_canary or not spec.steps:
        return Action.NONE, replace(state, reason=f"shadowing: {report}")
    if t.waiting:
        return Action.NONE, replace(
            state, reason="shadowing: waiting for " + describe_all(t.waiting)
        )
    new = replace(
        state,
        phase=Phase.PROGRESSING,
        step=0,
        step_started_at=t.now,
        step_start_requests=t.counts.candidate,
        reason=f"shadow checks pass ({report}): canary step 1 (weight {spec.steps[0].weight:g})",
    )
    return Action.ADVANCE, new


_MACHINES: dict[str, Callable[[Tick, RolloutState], Move]] = {
    "canary": _canary,
    "blue_green": _blue_green,
    "ab": _ab,
    "shadow": _shadow,
}


def _machine(rollout: Rollout, state: RolloutState) -> str:
    # A shadow that handed over runs the canary machine from then on.
    if rollout.spec.strategy == "shadow" and state.phase is not Phase.SHADOWING:
        return "canary"
    return rollout.spec.strategy


def _blocked(t: Tick, state: RolloutState, i: int) -> str:
    """Why step i is not done yet ('' when it is): checks, hold time, request count."""
    if t.waiting:
        return "waiting for " + describe_all(t.waiting)
    step = t.rollout.spec.steps[i]
    if (elapsed := t.now - state.step_started_at) < step.hold:
        return f"held {elapsed:.0f}s of {step.hold:g}s"
    done = t.counts.candidate - (state.step_start_requests or 0)
    if done < step.min_requests:
        return f"{done} of {step.min_requests} candidate requests"
    return ""


def _ab_winner(
    spec: Spec, state: RolloutState, counts: Counts
) -> tuple[str, tuple[float, float] | None, str]:
    """The version that won on the primary metric: a two-sided always-valid interval of
    candidate minus stable that excludes zero. The checks' own intervals are one-sided
    (evidence of harm only), so they cannot name the candidate a winner."""
    (xs, ns), (xc, nc) = counts.stable_primary, counts.candidate_primary
    if min(ns, nc) < AB_MIN_SAMPLES:
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
