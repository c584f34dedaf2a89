"""One rollout's life as pure transitions: begin, restore, tick, edit, act -> new state + effects.

No I/O, no clock, no callbacks: the caller hands in the rollout, the state it holds,
the evidence and the time, and gets back a Transition: the state to hold from now on
and the effects (policy/effects.py) to run, in order. Every committed change is
written ahead: Save, then Audit, then routing and the rest.

Audit kinds and payloads are the log's format (`rollguard audit verify` and existing
logs rely on them): `start` and `policy` carry {reason, state}, `restore` {reason,
state as it was saved}, `decision` and `admin` a Decision's JSON, `threshold`
{metric, threshold, stable}. `start` picks begin or restore; `status` is the
state as status pages show it.

`candidate` arguments are the registry's word on the candidate: None when it can take
traffic, else why not (an Availability value: missing, loading, refused, stale,
unready). A rollout whose candidate cannot take traffic yet begins in phase waiting;
`observe` begins it once it can, and fails a running rollout over while it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rollguard.policy.carry import Tally, carry_forward, merged
from rollguard.policy.checks import evaluate_checks, latency_rows, latency_threshold
from rollguard.policy.decide import Action, Counts, Decision, apply_action, decide
from rollguard.policy.decide import observe as candidate_decision
from rollguard.policy.effects import Audit, Effect, ResetWindows, Route, Save, SetLatencyThreshold
from rollguard.policy.evidence import Evidence
from rollguard.policy.schema import Check, Rollout
from rollguard.policy.state import Phase, RolloutState, mirroring, routing_weight
from rollguard.policy.verdict import CheckResult

ENGINE = "engine"  # the audit actor for automatic decisions


@dataclass(frozen=True, slots=True)
class Transition:
    """The state to hold once the effects have run, and the effects, in order."""

    state: RolloutState
    effects: tuple[Effect, ...]

    def local(self) -> Transition:
        """The same state with only the effects on this process (routing, windows,
        threshold): what a fleet follower runs; its Save and Audit are Redis's."""
        return Transition(
            self.state, tuple(e for e in self.effects if not isinstance(e, Save | Audit))
        )


@dataclass(frozen=True, slots=True)
class Decided(Transition):
    """A transition that a decision made (a tick, an operator's action), with that decision."""

    decision: Decision


def start(
    rollout: Rollout,
    saved: RolloutState | None,
    now: float,
    candidate: str | None = None,
    *,
    carry: bool = True,
) -> Transition:
    """A rollout found at start-up or in a new policy file: restore its saved state, or begin."""
    if saved is None:
        return begin(rollout, now, candidate=candidate)
    return restore(rollout, saved, now, candidate=candidate, carry=carry)


def begin(
    rollout: Rollout, now: float, *, generation: int = 1, candidate: str | None = None
) -> Transition:
    """A rollout with no saved state (or a saved one for another candidate) starts, or
    waits (phase waiting, weight 0) while its candidate cannot take traffic yet."""
    state = _initial(rollout, now, generation, candidate)
    # Counts are "since the rollout began": a policy added to a running gateway must not
    # count the stable's earlier traffic (nor a previous candidate's).
    effects = (*_started(state), ResetWindows(), SetLatencyThreshold(None), _route(rollout, state))
    return Transition(state, effects)


def restore(
    rollout: Rollout,
    saved: RolloutState,
    now: float,
    *,
    candidate: str | None = None,
    carry: bool = True,
) -> Transition:
    """Start-up with a saved state: resume it, or begin anew if the policy changed meanwhile.

    `candidate` matters only for a new rollout; a resumed one learns it from `observe`.
    `carry` false (fleet mode): the counts are not carried forward, because the live
    processes' merged summaries already hold them (carrying would count them twice)."""
    if not saved.same_rollout(rollout):
        # The policy changed while we were down: a new candidate is a new rollout.
        return begin(rollout, now, generation=saved.generation + 1, candidate=candidate)
    reason = f"restored {saved.phase.value} at step {saved.step + 1}, weight {saved.weight:g}"
    # The policy may have been edited while we were down (thresholds, step weights).
    state = _unfreeze_if_stale(saved, rollout)
    if state.latency_threshold != saved.latency_threshold:
        reason += "; latency check changed, threshold to be frozen again"
    state = replace(state, weight=routing_weight(rollout, state))
    # The tests continue: what the last process had counted is carried, and this
    # process's windows count from zero.
    if saved.seen is not None and carry:
        carried = (saved.carried or Tally()).plus(saved.seen)
        state = replace(state, carried=carried, seen=None)
    effects: list[Effect] = [Save(state)] if state != saved else []
    tolerance = _tolerance(rollout, state.latency_threshold)
    effects += [
        Audit("restore", ENGINE, {"reason": reason, "state": saved.to_json()}),
        ResetWindows(),
        SetLatencyThreshold(state.latency_threshold, state.latency_rows, tolerance),
        _route(rollout, state),
    ]
    return Transition(state, tuple(effects))


def tick(
    rollout: Rollout, state: RolloutState, evidence: Evidence, now: float, *, carry: bool = True
) -> Decided:
    """Freeze the latency threshold if due, run the checks, decide; commit what changed.

    A tick that changes nothing beyond the reason saves nothing, yet its state (with
    the fresher reason, for status pages) is the one to hold. `carry` false (fleet
    mode): `evidence` is already the fleet's whole sample, so no counts are carried.
    """
    ticking = begin_tick(rollout, state, evidence, carry=carry)
    return ticking.decide(evaluate_checks(rollout.spec, ticking.evidence), now)


@dataclass(frozen=True, slots=True)
class Ticking:
    """A tick up to its checks: `tick` is `begin_tick`, the checks on `evidence`
    (checks.evaluate_checks, or checks.evaluate_check one at a time, in the policy's
    order), then `decide`. Split so that a shell can let other work run between the
    checks; the decision stays a function of the evidence handed to `begin_tick`."""

    rollout: Rollout
    before: RolloutState  # the state the tick began from
    state: RolloutState  # with the counts carried and the threshold frozen, if due
    evidence: Evidence  # what the checks are to see
    effects: tuple[Effect, ...]  # the threshold's, when it was frozen now

    def decide(self, results: list[CheckResult], now: float) -> Decided:
        """The decision on the checks' `results`, and what to commit (see `tick`)."""
        rollout, state, before = self.rollout, self.state, self.before
        effects = list(self.effects)
        decision = decide(rollout, state, results, Counts.of(self.evidence), now)
        if decision.changed:
            effects += _commit(rollout, decision, "decision", ENGINE)
        elif (state.carried, state.seen) != (before.carried, before.seen) and not any(
            isinstance(e, Save) for e in effects
        ):
            effects.append(Save(decision.state))  # the tests' counts, for a restart to continue
        return Decided(decision.state, tuple(effects), decision)


def begin_tick(
    rollout: Rollout, state: RolloutState, evidence: Evidence, *, carry: bool = True
) -> Ticking:
    """A tick's first part: carry the counts, freeze the latency threshold if due, and
    the evidence its checks are to see (see `tick` and `Ticking`)."""
    effects: list[Effect] = []
    before = state
    if not state.phase.terminal and carry:
        carried, seen = carry_forward(state.carried, state.seen, Tally.of(evidence))
        state = replace(state, carried=carried, seen=seen)
    check = latency_check(rollout)
    frozen = state.phase.terminal or state.phase is Phase.WAITING
    if state.latency_threshold is None and not frozen and check is not None:
        threshold = latency_threshold(check, evidence.stable)
        if threshold is not None:  # None: stable has too few samples yet
            rows = latency_rows(evidence.stable)
            state = _without_latency_counts(state)
            state = replace(
                state, latency_threshold=threshold, threshold_check=_key(check), latency_rows=rows
            )
            data = {
                "metric": check.metric,
                "threshold": threshold,
                "rows": rows,
                "stable": evidence.stable.version,
            }
            effects += [
                Save(state),
                Audit("threshold", ENGINE, data),
                SetLatencyThreshold(threshold, rows, _tolerance(rollout, threshold)),
            ]
    if state.srm_pvalue is not None and state.srm_weight == evidence.candidate_weight:
        evidence = replace(evidence, srm_pvalue_before=state.srm_pvalue)
    evidence = merged(evidence, state.carried)
    return Ticking(rollout, before, state, evidence, tuple(effects))


def observe(rollout: Rollout, state: RolloutState, candidate: str | None, now: float) -> Decided:
    """The registry's word on the candidate (see the module docstring): begin a waiting
    rollout, fail over, recover or roll back; no effects when nothing changes."""
    decision = candidate_decision(rollout, state, candidate, now)
    if not decision.changed:
        return Decided(decision.state, (), decision)
    effects = _commit(rollout, decision, "decision", ENGINE)
    if decision.action is Action.BEGIN:
        # Counts are "since the rollout began": the stable's traffic while waiting is not.
        save_audit, route = effects[:-1], effects[-1]
        effects = (*save_audit, ResetWindows(), SetLatencyThreshold(None), route)
    return Decided(decision.state, effects, decision)


def act(
    rollout: Rollout,
    state: RolloutState,
    action: str,
    actor: str,
    now: float,
    note: str = "",
) -> Decided:
    """An operator's rollback / promote / pause / resume / approve; ActionRejected if unfit.

    `note` is the operator's own reason: it goes into the audit record beside the
    decision (`"note"`), so the log says why a person acted, not only that they did."""
    decision = apply_action(rollout, state, action, actor, now)
    effects = _commit(rollout, decision, "admin", actor)
    if note:
        effects = tuple(
            replace(e, data={**e.data, "note": note}) if isinstance(e, Audit) else e
            for e in effects
        )
    return Decided(decision.state, effects, decision)


def edit(
    current: Rollout,
    state: RolloutState,
    rollout: Rollout,
    now: float,
    candidate: str | None = None,
) -> Transition:
    """Hot reload: keep the progress for an edit of the same rollout, start anew for a new one.

    The same rollout (model, stable, candidate, strategy) keeps its step; a threshold
    frozen for a latency check that changed is dropped, to be frozen again. Anything
    else is a new generation, whose counts must not include the old candidate's.
    """
    if rollout.name != current.name:
        raise ValueError(f"rollout {current.name!r} cannot become rollout {rollout.name!r}")
    if rollout == current:
        return Transition(state, ())
    if not state.same_rollout(rollout):
        new = _initial(rollout, now, state.generation + 1, candidate)
        effects = (*_started(new), ResetWindows(), SetLatencyThreshold(None), _route(rollout, new))
        return Transition(new, effects)
    new = _unfreeze_if_stale(state, rollout)
    new = replace(new, weight=routing_weight(rollout, new), reason="policy updated")
    unfrozen = new.latency_threshold != state.latency_threshold
    return Transition(
        new,
        (
            Save(new),
            Audit("policy", ENGINE, {"reason": new.reason, "state": new.to_json()}),
            *((SetLatencyThreshold(None),) if unfrozen else ()),
            _route(rollout, new),
        ),
    )


def follow(rollout: Rollout, before: RolloutState | None, after: RolloutState) -> Transition:
    """A state another process (the fleet's decider) wrote: only the effects that make
    this process route and count as it says, nothing to save or audit.

    Windows count from zero when the generation changes or a waiting rollout begins
    (as `begin` and `observe` reset them), and when this process had no state before.
    """
    effects: list[Effect] = []
    began = (
        before is not None and before.phase is Phase.WAITING and after.phase is not Phase.WAITING
    )
    if before is None or before.generation != after.generation or began:
        effects.append(ResetWindows())
    threshold = (after.latency_threshold, after.latency_rows)
    if before is None or (before.latency_threshold, before.latency_rows) != threshold:
        tolerance = _tolerance(rollout, after.latency_threshold)
        effects.append(SetLatencyThreshold(after.latency_threshold, after.latency_rows, tolerance))
    effects.append(_route(rollout, after))
    return Transition(after, tuple(effects))


def status(rollout: Rollout, state: RolloutState) -> dict[str, Any]:
    """Where a rollout stands, in a few fields, for status pages and the admin API."""
    spec = rollout.spec
    return {
        "name": rollout.name,
        "model": spec.model,
        "strategy": spec.strategy,
        "stable": spec.stable,
        "candidate": spec.candidate,
        "phase": state.phase.value,
        "step": state.step,
        "steps": len(spec.steps),
        "weight": state.weight,
        "generation": state.generation,
        "reason": state.reason,
        "approved_by": state.approved_by,
        "unavailable": state.unavailable,  # why the candidate's share fails over to stable
        "unavailable_since": state.unavailable_since,
        "inconclusive": state.inconclusive,  # the deadline that passed undecided
        # the deadline in force: the policy's, or the default one (Spec.deadline_in_force)
        "deadline": None if spec.deadline_in_force is None else spec.deadline_in_force[0],
        "on_deadline": spec.on_deadline
        if spec.deadline_in_force is None
        else spec.deadline_in_force[1],
    }


def latency_check(rollout: Rollout) -> Check | None:
    """The check whose percentile sets the one frozen latency threshold (the first one)."""
    return next((c for c in rollout.spec.checks if c.percentile is not None), None)


# -- helpers --


def _initial(rollout: Rollout, now: float, generation: int, candidate: str | None) -> RolloutState:
    state = RolloutState.initial(rollout, now, generation=generation)
    if candidate is None:
        return state
    return replace(
        state,
        phase=Phase.WAITING,
        weight=0.0,
        unavailable=candidate,
        reason=f"{state.reason}; waiting for candidate {state.candidate}: {candidate}",
    )


def _started(state: RolloutState) -> tuple[Effect, ...]:
    data = {"reason": state.reason, "state": state.to_json()}
    return Save(state), Audit("start", ENGINE, data, announce=True)


def _commit(rollout: Rollout, decision: Decision, kind: str, actor: str) -> tuple[Effect, ...]:
    # A changed state with no action is bookkeeping (a request baseline, a hold or
    # alert that cleared): persisted, but neither audited nor announced.
    audit: tuple[Effect, ...] = ()
    if decision.action is not Action.NONE:
        audit = (Audit(kind, actor, decision.to_json(), announce=True),)
    return Save(decision.state), *audit, _route(rollout, decision.state)


def _route(rollout: Rollout, state: RolloutState) -> Route:
    return Route(state, mirroring(rollout, state))


def _tolerance(rollout: Rollout, threshold: float | None) -> float | None:
    """The latency PASS tests against: ratio × T, for a conditional ratio check."""
    check = latency_check(rollout)
    if threshold is None or check is None or check.comparison_test != "conditional":
        return None
    ratio = check.max_ratio_to_stable
    return None if ratio is None else ratio * threshold


def _key(check: Check | None) -> str | None:
    return None if check is None else check.model_dump_json()


def _unfreeze_if_stale(state: RolloutState, rollout: Rollout) -> RolloutState:
    """Drop a threshold frozen for a latency check the policy no longer has as it was, or
    without the request size it counts up to (saved before sizes were frozen with it),
    with the counts made against it."""
    if state.latency_threshold is None:
        return state
    if state.threshold_check == _key(latency_check(rollout)) and state.latency_rows is not None:
        return state
    state = _without_latency_counts(state)
    return replace(state, latency_threshold=None, threshold_check=None, latency_rows=None)


def _without_latency_counts(state: RolloutState) -> RolloutState:
    """The tests' counts less those against a latency threshold (a new one is due)."""
    return replace(
        state,
        carried=state.carried.without_latency() if state.carried is not None else None,
        seen=state.seen.without_latency() if state.seen is not None else None,
    )
