"""The decision core: given a rollout, its state and the check results, what happens next.

Pure functions, no I/O and no clock: `decide` for the periodic loop, `apply_action` for
an operator's command; policy/lifecycle.py turns what they return into effects. The
rules shared by every strategy live here, each strategy's state machine in
policy/strategies.py. The rules:

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
- A candidate that cannot take traffic (`observe`): a rollout waits for it to appear
  (phase waiting, weight 0) and begins once it can; a running one fails its share over to
  stable and holds, rolling back after spec.unavailable_deadline (at once with
  on_candidate_unavailable: rollback). Failed rollback checks still roll back meanwhile.
- Deadlines (a step's `deadline`, the rollout's `deadline` counted from when its policy was
  applied) end a rollout that has not decided in time as explicitly inconclusive, with
  on_deadline: rollback, hold (phase inconclusive: weight kept, no progress, rollback
  checks still protect; an operator promotes or rolls back) or alert (once, then on).
  Not while paused (pausing stops a step's clock) nor failing over (its own deadline).
  A canary or blue-green rollout with no `deadline` has a default one (its steps' holds
  plus an hour, on_deadline hold unless named; Spec.deadline_in_force) that ends it
  only while it is progressing: never awaiting an approval or waiting for its candidate.
- A sample-ratio check gates nothing at weight 0 or 100: one arm gets every request;
  an agreement check gates nothing in a canary or ab rollout: nothing is mirrored.
  Its p-value's running minimum at the current weight is kept in the state
  (srm_pvalue, srm_weight), so a restart does not forget a mismatch already shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from rollguard.policy.decision import Action, Counts, Decision, describe, describe_all
from rollguard.policy.errors import ActionRejected
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase, RolloutState, routing_weight
from rollguard.policy.strategies import Tick, advance, ended, progress
from rollguard.policy.verdict import CheckResult, Verdict

__all__ = [
    "ACTIONS",
    "Action",
    "Counts",
    "Decision",
    "apply_action",
    "decide",
    "describe",
    "observe",
    "routing_weight",
]

ACTIONS = ("rollback", "promote", "pause", "resume", "approve")


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
    if state.phase is Phase.WAITING:
        new = replace(base, reason=f"waiting for candidate {state.candidate}: {state.unavailable}")
        return _deadline_passed(rollout, state, new, now) or _decision(rollout, state, new)
    results = [r for r in results if not _moot(r, state, rollout)]
    base = _srm_seen(base, results)
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    rollback = [r for r in failed if r.check.on_fail == "rollback"]
    if rollback:
        new = _rolled_back(base, "rollback: " + describe_all(rollback))
        return _decision(rollout, state, new, _rollback_kind(state), evidence)
    if state.unavailable is not None:
        return _failing_over(rollout, state, base, Action.HOLD, now, evidence)
    if state.phase is Phase.PAUSED:
        new = replace(base, reason=f"paused (from {_effective(state).value}): no progress")
        return _decision(rollout, state, new, Action.NONE, evidence)
    if state.phase is Phase.INCONCLUSIVE:
        new = replace(
            base,
            reason=f"inconclusive ({state.inconclusive}), held at weight {state.weight:g}: "
            "promote or roll back",
        )
        return _decision(rollout, state, new, Action.NONE, evidence)
    hold = [r for r in failed if r.check.on_fail == "hold"]
    alert = [r for r in failed if r.check.on_fail == "alert"]
    base = replace(base, holding=_metrics(hold), alerting=_metrics(alert))
    if hold:
        action, new = Action.HOLD, replace(base, reason="hold: " + describe_all(hold))
    else:
        # Gating checks are all but the alert-only ones; one not yet PASS means wait.
        waiting = [
            r for r in results if r.check.on_fail != "alert" and r.verdict is not Verdict.PASS
        ]
        action, new = advance(Tick(rollout, results, waiting, counts, now), base)
    passed = _deadline_passed(rollout, state, new, now, evidence)
    if action in (Action.NONE, Action.HOLD) and passed is not None:
        action, new = passed.action, passed.state
    if alert:
        note = "alert: " + describe_all(alert)
        if action is Action.NONE:
            action, new = Action.ALERT, replace(new, reason=note)
        else:
            new = replace(new, reason=f"{new.reason}; {note}")
    return _decision(rollout, state, new, action, evidence)


def observe(rollout: Rollout, state: RolloutState, candidate: str | None, now: float) -> Decision:
    """The registry's word on the candidate: None when it can take traffic, else why not
    (an Availability value: missing, loading, refused, stale, unready).

    A waiting rollout begins once its candidate can take traffic; a running one fails
    over (holds) when it cannot, recovers when it can again, and rolls back as
    on_candidate_unavailable says. Terminal phases ignore it.
    """
    if state.phase.terminal:
        return _decision(rollout, state, state)
    if state.phase is Phase.WAITING:
        if candidate is None:
            fresh = RolloutState.initial(rollout, now, generation=state.generation)
            new = replace(
                fresh,
                started_at=state.started_at,  # a rollout deadline counts the wait too
                reason=f"candidate {state.candidate} can take traffic: the rollout begins",
            )
            return _decision(rollout, state, new, Action.BEGIN)
        waiting = f"waiting for candidate {state.candidate}: {candidate}"
        new = replace(state, unavailable=candidate, reason=waiting)
        return _decision(rollout, state, new)
    if candidate is None:
        if state.unavailable is None:
            return _decision(rollout, state, state)
        lasted = now - (state.unavailable_since if state.unavailable_since is not None else now)
        new = replace(
            state,
            unavailable=None,
            unavailable_since=None,
            reason=f"candidate {state.candidate} can take traffic again after {lasted:.0f}s "
            f"{state.unavailable}: failover ends",
        )
        return _decision(rollout, state, new, Action.RECOVER)
    if state.unavailable is None:
        new = replace(state, unavailable=candidate, unavailable_since=now)
        return _failing_over(rollout, state, new, Action.FAILOVER, now)
    # Still unavailable (maybe for another reason now): hold on, or roll back when due.
    return _failing_over(rollout, state, replace(state, unavailable=candidate), Action.NONE, now)


def apply_action(
    rollout: Rollout, state: RolloutState, action: str, actor: str, now: float
) -> Decision:
    """An operator's command as a decision; ActionRejected when it does not fit the state."""
    phase = state.phase
    if action not in ACTIONS:
        raise ActionRejected(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if action != "rollback" and _effective(state) is Phase.WAITING:
        raise ActionRejected(
            f"rollout {state.name!r} is waiting for candidate {state.candidate} "
            f"({state.unavailable or 'not ready'}): only rollback applies, not {action}"
        )
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
        new = ended(state, Phase.PROMOTED, f"promoted by {actor}")
        return _decision(rollout, state, new, Action.PROMOTE)
    if action == "pause":
        if phase in (Phase.PAUSED, Phase.INCONCLUSIVE):
            raise ActionRejected(f"rollout {state.name!r} is already {phase.value}")
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
    _, new = progress(rollout, approved, now, None, f"approved by {actor}")
    return _decision(rollout, state, new, Action.APPROVE)


# -- small helpers --


def _decision(
    rollout: Rollout,
    old: RolloutState,
    new: RolloutState,
    action: Action = Action.NONE,
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
    return ended(state, Phase.ROLLED_BACK, reason)


def _rollback_kind(state: RolloutState) -> Action:
    return Action.FLIP_BACK if _effective(state) is Phase.FLIPPED else Action.ROLLBACK


def _effective(state: RolloutState) -> Phase:
    """The phase a pause or an inconclusive hold stopped, else the phase itself."""
    held = state.phase in (Phase.PAUSED, Phase.INCONCLUSIVE)
    return state.paused_from if held and state.paused_from else state.phase


def _failing_over(
    rollout: Rollout,
    old: RolloutState,
    new: RolloutState,
    action: Action,
    now: float,
    evidence: tuple[dict[str, object], ...] = (),
) -> Decision:
    """`new` has an unavailable candidate: hold, or roll back once that is due."""
    spec, who = rollout.spec, f"candidate {new.candidate} {new.unavailable}"
    since = new.unavailable_since if new.unavailable_since is not None else now
    lasted, limit = now - since, spec.unavailable_deadline
    if spec.on_candidate_unavailable == "rollback":
        reason = f"rollback: {who} (on_candidate_unavailable: rollback)"
        return _decision(rollout, old, _rolled_back(new, reason), _rollback_kind(old), evidence)
    if lasted >= limit:
        reason = f"rollback: {who} for {lasted:.0f}s (unavailable_deadline {limit:g}s)"
        return _decision(rollout, old, _rolled_back(new, reason), _rollback_kind(old), evidence)
    reason = f"hold: {who}: its share fails over to stable; rollback in {limit - lasted:.0f}s"
    return _decision(rollout, old, replace(new, reason=reason), action, evidence)


def _deadline_passed(
    rollout: Rollout,
    old: RolloutState,
    new: RolloutState,
    now: float,
    evidence: tuple[dict[str, object], ...] = (),
) -> Decision | None:
    """The inconclusive outcome when a deadline passed undecided (alerted once), else None."""
    spec = rollout.spec
    passed = None
    in_force = spec.deadline_in_force
    # The default deadline (none set) ends a rollout stalled while progressing, never
    # one awaiting an approval or waiting for its candidate: those wait for a person.
    implicit = spec.deadline is None and old.phase is not Phase.PROGRESSING
    on_deadline = spec.on_deadline if in_force is None else in_force[1]
    if in_force is not None and not implicit and now - old.started_at >= in_force[0]:
        default = "" if spec.deadline is not None else " (none set: the steps' holds + 1h)"
        passed = f"rollout deadline {in_force[0]:g}s{default}"
    elif old.phase is Phase.PROGRESSING and spec.steps and spec.strategy != "ab":
        i = min(old.step, len(spec.steps) - 1)
        limit = spec.steps[i].deadline
        if limit is not None and now - old.step_started_at >= limit:
            passed = f"step {i + 1} deadline {limit:g}s"
    if passed is None or passed == old.inconclusive:
        return None
    why = f"inconclusive: {passed} passed undecided ({new.reason})"
    if on_deadline == "rollback":
        ended_ = _rolled_back(replace(new, inconclusive=passed), f"{why}; on_deadline: rollback")
        return _decision(rollout, old, ended_, Action.INCONCLUSIVE, evidence)
    if on_deadline == "hold":
        held = replace(
            new,
            phase=Phase.INCONCLUSIVE,
            paused_from=_effective(new),
            inconclusive=passed,
            reason=f"{why}; on_deadline: hold at weight {new.weight:g}: promote or roll back",
        )
        return _decision(rollout, old, held, Action.INCONCLUSIVE, evidence)
    alerted = replace(new, inconclusive=passed, reason=f"{why}; on_deadline: alert, going on")
    return _decision(rollout, old, alerted, Action.INCONCLUSIVE, evidence)


def _moot(result: CheckResult, state: RolloutState, rollout: Rollout) -> bool:
    """A check with nothing to test gates nothing: a sample-ratio check while one arm
    gets every routed request; an agreement check where nothing is mirrored (canary and
    ab compare no answers: it would hold the rollout until its deadline)."""
    if result.check.metric == "agreement" and result.verdict is Verdict.INCONCLUSIVE:
        return rollout.spec.strategy in ("canary", "ab")
    return result.check.metric == "srm" and state.weight in (0.0, 100.0)


def _srm_seen(state: RolloutState, results: Sequence[CheckResult]) -> RolloutState:
    """Keep the running minimum of the sequential SRM p-value at the current weight (a
    new weight is a new split, tested afresh: the router zeroes its routed counts)."""
    seen = [
        p
        for r in results
        if r.check.metric == "srm" and isinstance(p := r.detail.get("pvalue"), float)
    ]
    before = state.srm_pvalue if state.srm_weight == state.weight else None
    lowest = min([*seen, *([] if before is None else [before])], default=None)
    if lowest is None or lowest >= 1.0 or lowest == before:
        return state
    return replace(state, srm_pvalue=lowest, srm_weight=state.weight)


def _metrics(results: Sequence[CheckResult]) -> tuple[str, ...]:
    return tuple(sorted({r.check.metric for r in results}))


def _json_safe(data: dict[str, object]) -> dict[str, object]:
    """Non-finite numbers as strings: the store and the audit log refuse NaN and infinity."""

    def fix(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return {k: fix(v) for k, v in value.items()} if isinstance(value, dict) else value

    return {k: fix(v) for k, v in data.items()}
