"""policy.lifecycle: a candidate that cannot take traffic (waiting, failover) and deadlines."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from rollguard.policy import lifecycle
from rollguard.policy.decide import Action, Counts, decide
from rollguard.policy.effects import Audit, ResetWindows, Route, Save, SetLatencyThreshold
from rollguard.policy.errors import ActionRejected
from rollguard.policy.schema import DEFAULT_DEADLINE_SLACK, Rollout
from rollguard.policy.state import Phase
from rollguard.policy.verdict import CheckResult, Verdict
from tests.policy.lifecycle_support import T0, TICK, Env, Traffic, make_rollout


def observe(env: Env, candidate: str | None) -> lifecycle.Decided:
    transition = lifecycle.observe(env.rollout, env.state, candidate, env.now)
    env.run(transition)
    return transition


def routes(env: Env) -> list[Route]:
    return [e for e in env.effects if isinstance(e, Route)]


# -- waiting for a candidate that is not in the registry --


def test_a_missing_candidate_waits_at_weight_zero_then_begins_when_it_appears() -> None:
    rollout = make_rollout()
    transition = lifecycle.begin(rollout, T0, candidate="missing")
    state = transition.state
    assert (state.phase, state.weight, state.unavailable) == (Phase.WAITING, 0, "missing")
    assert "waiting for candidate 1.1.0: missing" in state.reason
    assert [type(e) for e in transition.effects] == [
        Save,
        Audit,
        ResetWindows,
        SetLatencyThreshold,
        Route,
    ]
    route = transition.effects[-1]
    assert isinstance(route, Route) and route.weight == 0 and route.failover == "missing"

    env = Env(rollout)
    env.run(transition)
    for _ in range(3):  # traffic and time pass: nothing moves, nothing is recorded
        env.traffic.serve()
        env.now += TICK
        decision = env.tick()
        assert decision.action is Action.NONE and not decision.changed
        assert env.state.phase is Phase.WAITING and "waiting" in decision.reason
    assert env.traffic.thresholds == [None, None]  # no latency threshold frozen while waiting
    loading = observe(env, "loading")  # appeared, still loading: waits on, saved
    assert [type(e) for e in loading.effects] == [Save, Route]
    assert env.state.phase is Phase.WAITING and env.state.unavailable == "loading"
    began = observe(env, None)
    assert began.decision.action is Action.BEGIN
    assert [type(e) for e in began.effects] == [
        Save, Audit, ResetWindows, SetLatencyThreshold, Route,
    ]  # fmt: skip
    audit = began.effects[1]
    assert isinstance(audit, Audit) and audit.kind == "decision" and audit.announce
    assert audit.data["action"] == "begin"
    state = env.state
    assert (state.phase, state.weight, state.unavailable, state.step) == (
        Phase.PROGRESSING, 10, None, 0,
    )  # fmt: skip
    assert state.step_started_at == env.now and state.started_at == T0
    assert env.traffic.weights[-2:] == [0, 10]  # the first step is routed once it begins
    # Counts are "since the rollout began": the stable's traffic while waiting is gone.
    assert env.traffic.counts["s"]["requests"] == 0
    env.run_until({Phase.PROMOTED})


@pytest.mark.parametrize("action", ["promote", "pause", "resume", "approve"])
def test_a_waiting_rollout_takes_only_a_rollback(action: str) -> None:
    env = Env(make_rollout())
    env.run(lifecycle.begin(env.rollout, T0, candidate="missing"))
    with pytest.raises(ActionRejected, match=r"waiting for candidate 1\.1\.0 \(missing\)"):
        env.act(action, "ops")
    assert env.act("rollback", "ops").action is Action.ROLLBACK
    assert env.state.phase is Phase.ROLLED_BACK


def test_a_waiting_rollout_restarts_waiting() -> None:
    env = Env(make_rollout())
    env.run(lifecycle.begin(env.rollout, T0, candidate="missing"))
    env.restart(env.rollout)
    assert env.state.phase is Phase.WAITING and env.traffic.weight == 0


def test_a_policy_edited_to_a_missing_candidate_waits() -> None:
    env = Env(make_rollout())
    env.run_to_step(1)
    env.edit(make_rollout(candidate="1.2.0"), candidate="missing")
    assert (env.state.phase, env.state.generation, env.traffic.weight) == (Phase.WAITING, 2, 0)


# -- a running candidate that stops being able to take traffic --


def test_an_unavailable_candidate_fails_over_holds_then_rolls_back_after_the_deadline() -> None:
    env = Env(make_rollout(unavailable_deadline="100s"))
    env.run_to_step(1)
    failed = observe(env, "refused")
    assert failed.decision.action is Action.FAILOVER
    assert [type(e) for e in failed.effects] == [Save, Audit, Route]
    route = failed.effects[-1]
    assert isinstance(route, Route) and route.failover == "refused" and route.weight == 50
    assert "fails over to stable" in env.state.reason
    assert "rollback in 100s" in env.state.reason
    assert observe(env, "refused").effects == ()  # the same answer again: nothing to do
    # Ticks hold while it lasts, whatever the evidence says.
    for _ in range(4):
        env.traffic.serve()
        env.now += TICK
        decision = env.tick()
        assert decision.action is Action.HOLD and not decision.changed
        assert env.state.step == 1
    env.now += TICK
    rolled = observe(env, "refused")
    assert rolled.decision.action is Action.ROLLBACK
    assert env.state.phase is Phase.ROLLED_BACK and env.traffic.weight == 0
    assert "unavailable_deadline 100s" in env.state.reason
    assert env.state.unavailable is None  # a terminal state fails nothing over
    assert [a.data["action"] for a in env.entries("decision")][-2:] == ["failover", "rollback"]


def test_the_tick_rolls_back_at_the_deadline_too() -> None:
    env = Env(make_rollout(unavailable_deadline="30s"))
    observe(env, "stale")
    env.now += 31
    assert env.tick().action is Action.ROLLBACK


def test_a_candidate_back_in_time_recovers_and_progresses() -> None:
    env = Env(make_rollout())
    observe(env, "unready")
    env.now += 40
    recovered = observe(env, None)
    assert recovered.decision.action is Action.RECOVER
    assert "after 40s unready" in env.state.reason
    route = recovered.effects[-1]
    assert isinstance(route, Route) and route.failover is None
    assert env.state.unavailable is None and env.state.unavailable_since is None
    env.run_until({Phase.PROMOTED})


def test_a_changing_reason_is_saved_but_keeps_its_start() -> None:
    env = Env(make_rollout())
    observe(env, "refused")
    since = env.state.unavailable_since
    env.now += 5
    changed = observe(env, "missing")
    assert [type(e) for e in changed.effects] == [Save, Route]  # bookkeeping: no audit
    assert (env.state.unavailable, env.state.unavailable_since) == ("missing", since)


def test_on_candidate_unavailable_rollback_rolls_back_at_once() -> None:
    env = Env(make_rollout(on_candidate_unavailable="rollback"))
    decided = observe(env, "refused")
    assert decided.decision.action is Action.ROLLBACK
    assert env.state.phase is Phase.ROLLED_BACK
    assert "on_candidate_unavailable: rollback" in env.state.reason


def test_a_failed_rollback_check_still_rolls_back_while_failing_over() -> None:
    env = Env(make_rollout(), Traffic(candidate_error_rate=0.5))
    env.traffic.serve()
    observe(env, "refused")
    env.traffic.serve()
    env.now += TICK
    assert env.tick().action is Action.ROLLBACK
    assert "error_rate" in env.state.reason


def test_a_paused_rollout_still_fails_over_and_rolls_back() -> None:
    env = Env(make_rollout(unavailable_deadline="10s"))
    env.act("pause", "ops")
    assert observe(env, "refused").decision.action is Action.FAILOVER
    env.now += 11
    assert env.tick().action is Action.ROLLBACK


def test_terminal_rollouts_ignore_the_registry() -> None:
    env = Env(make_rollout())
    env.act("promote", "ops")
    assert observe(env, "refused").effects == ()
    assert env.state.phase is Phase.PROMOTED and env.state.unavailable is None


def test_blue_green_flipped_candidate_unavailable_flips_back() -> None:
    rollout = make_rollout(
        strategy="blue_green",
        steps=[{"weight": 100, "hold": "10s"}],
        on_candidate_unavailable="rollback",
    )
    env = Env(rollout)
    env.state = replace(env.state, phase=Phase.FLIPPED, weight=100)
    assert observe(env, "refused").decision.action is Action.FLIP_BACK


def test_mirroring_stops_for_an_unavailable_shadow() -> None:
    env = Env(make_rollout(strategy="shadow", then_canary=True))
    route = observe(env, "refused").effects[-1]
    assert isinstance(route, Route) and route.mirroring and route.failover == "refused"


# -- deadlines: an explicit inconclusive outcome --


def stuck(**spec: object) -> Env:
    """A canary whose candidate gets no requests: step 1 can never be done."""
    steps = [{"weight": 10, "hold": "60s", "min_requests": 300, "deadline": "10m"}, {"weight": 100}]
    return Env(make_rollout(steps=steps, **spec))


def tick_for(env: Env, seconds: float) -> list[Action]:
    actions = []
    end = env.now + seconds
    while env.now < end:
        env.now += TICK
        actions.append(env.tick().action)
    return actions


@pytest.mark.parametrize(
    ("on_deadline", "phase", "weight"),
    [
        ("rollback", Phase.ROLLED_BACK, 0),
        ("hold", Phase.INCONCLUSIVE, 10),
        ("alert", Phase.PROGRESSING, 10),
    ],
)
def test_a_step_deadline_ends_it_inconclusive(
    on_deadline: str, phase: Phase, weight: float
) -> None:
    env = stuck(on_deadline=on_deadline)
    actions = tick_for(env, 600)
    assert actions.count(Action.INCONCLUSIVE) == 1 and actions[-1] is Action.INCONCLUSIVE
    state = env.state
    assert (state.phase, state.weight, state.inconclusive) == (
        phase, weight, "step 1 deadline 600s",
    )  # fmt: skip
    assert f"on_deadline: {on_deadline}" in state.reason
    assert "passed undecided (step 1/2 (weight 10): waiting for" in state.reason
    audit = env.entries("decision")[-1]
    assert audit.data["action"] == "inconclusive" and audit.announce
    # Once only: later ticks neither repeat it nor move on.
    assert Action.INCONCLUSIVE not in tick_for(env, 600)
    assert env.state.phase is phase


def test_an_inconclusive_hold_waits_for_an_operator_and_still_protects() -> None:
    env = stuck(on_deadline="hold")
    tick_for(env, 600)
    assert "promote or roll back" in env.tick().reason
    with pytest.raises(ActionRejected, match="inconclusive"):
        env.act("pause", "ops")
    env.traffic.candidate_error_rate = 0.5
    env.traffic.weights.append(10)
    for _ in range(5):
        env.traffic.serve()
    assert env.tick().action is Action.ROLLBACK  # a rollback check still protects


def test_an_inconclusive_hold_can_be_promoted() -> None:
    env = stuck(on_deadline="hold")
    tick_for(env, 600)
    assert env.act("promote", "ops").action is Action.PROMOTE
    assert env.state.phase is Phase.PROMOTED


def test_the_rollout_deadline_counts_the_wait() -> None:
    rollout = make_rollout(deadline="1h", on_deadline="rollback")
    env = Env(rollout)
    env.run(lifecycle.begin(rollout, T0, candidate="missing"))
    env.now = T0 + 3599
    assert env.tick().action is Action.NONE
    env.now = T0 + 3600
    decision = env.tick()
    assert decision.action is Action.INCONCLUSIVE and env.state.phase is Phase.ROLLED_BACK
    assert env.state.inconclusive == "rollout deadline 3600s"


def test_a_rollout_without_a_deadline_ends_inconclusive_an_hour_after_its_holds() -> None:
    """No `deadline` set: a canary stalled at its first step does not hold it forever.
    Its steps' holds plus an hour after it began it ends explicitly inconclusive, held
    at its weight for an operator (on_deadline hold, the default for the default)."""
    steps = [{"weight": 10, "hold": "60s", "min_requests": 300}, {"weight": 100}]
    env = Env(make_rollout(steps=steps))
    limit = 60 + DEFAULT_DEADLINE_SLACK
    assert env.rollout.spec.deadline_in_force == (limit, "hold")
    actions = tick_for(env, limit)
    assert actions.count(Action.INCONCLUSIVE) == 1 and actions[-1] is Action.INCONCLUSIVE
    assert (env.state.phase, env.state.weight) == (Phase.INCONCLUSIVE, 10)
    assert (
        env.state.inconclusive == f"rollout deadline {limit:g}s (none set: the steps' holds + 1h)"
    )
    assert lifecycle.status(env.rollout, env.state)["deadline"] == limit
    # an on_deadline the policy names applies to the default deadline too
    named = Env(make_rollout(steps=steps, on_deadline="rollback"))
    tick_for(named, limit)
    assert named.state.phase is Phase.ROLLED_BACK


def test_the_default_deadline_waits_for_an_approval_and_skips_shadows() -> None:
    steps = [{"weight": 10, "hold": "60s"}, {"weight": 100}]
    env = Env(make_rollout(steps=steps, checks=[], require_approval=True))
    for _ in range(3):
        env.traffic.serve()
        env.now += TICK
        env.tick()
    assert env.state.phase is Phase.AWAITING_APPROVAL
    assert Action.INCONCLUSIVE not in tick_for(env, 2 * DEFAULT_DEADLINE_SLACK)
    assert env.state.phase is Phase.AWAITING_APPROVAL
    shadow = make_rollout(strategy="shadow", steps=[], checks=[])
    assert shadow.spec.deadline_in_force is None
    explicit = make_rollout(deadline="2h")
    assert explicit.spec.deadline_in_force == (7200, "rollback")


def test_a_paused_rollout_has_no_deadline() -> None:
    env = stuck()
    env.act("pause", "ops")
    assert Action.INCONCLUSIVE not in tick_for(env, 1200)
    env.act("resume", "ops")  # the paused time does not count towards the step
    assert env.tick().action is Action.NONE


def test_progress_on_the_deadline_tick_wins() -> None:
    env = stuck(checks=[])
    for _ in range(30):  # 3000 requests, 300 of them to the candidate
        env.traffic.serve(100)
    env.now += 600
    assert env.tick().action is Action.ADVANCE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"steps": [{"weight": 10, "hold": "5m", "deadline": "5m"}]}, "longer than its hold"),
        ({"deadline": "2m"}, "cannot be met"),
        ({"on_deadline": "promote"}, "on_deadline"),
        ({"on_candidate_unavailable": "alert"}, "on_candidate_unavailable"),
        ({"unavailable_deadline": -1}, "not negative"),
    ],
)
def test_deadline_settings_that_can_never_work_are_refused(
    spec: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_rollout(**spec)


# -- a sample-ratio check at weight 0 or 100 --


def test_srm_inconclusive_at_weight_100_does_not_block_promotion() -> None:
    rollout = make_rollout(
        steps=[{"weight": 100}],
        checks=[{"metric": "error_rate", "max": 0.05}, {"metric": "srm", "on_fail": "rollback"}],
    )
    state = lifecycle.begin(rollout, T0).state
    assert state.weight == 100
    results = [
        CheckResult(rollout.spec.checks[0], Verdict.PASS, 0.0, 0.05),
        CheckResult(rollout.spec.checks[1], Verdict.INCONCLUSIVE),
    ]
    assert decide(rollout, state, results, Counts(0, 1000), T0 + 1).action is Action.PROMOTE
    # At a weight in between it still gates.
    split = _two_steps(rollout)
    mid = lifecycle.begin(split, T0).state
    assert decide(split, mid, results, Counts(900, 100), T0 + 1).action is Action.NONE
    failed = [results[0], replace(results[1], verdict=Verdict.FAIL)]
    assert decide(rollout, state, failed, Counts(0, 1000), T0 + 1).action is Action.PROMOTE


def _two_steps(rollout: Rollout) -> Rollout:
    spec = rollout.spec.model_dump() | {"steps": [{"weight": 10}, {"weight": 100}]}
    return Rollout.model_validate(rollout.model_dump() | {"spec": spec})
