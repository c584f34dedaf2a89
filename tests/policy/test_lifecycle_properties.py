"""Properties of policy.lifecycle over random ticks and operator actions, every strategy."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy import lifecycle
from rollguard.policy.effects import Audit, Route, Save
from rollguard.policy.errors import ActionRejected
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase, RolloutState
from tests.policy.lifecycle_support import T0, make_rollout

ROLLOUTS = [
    make_rollout(),
    make_rollout(require_approval=True, checks=[{"metric": "error_rate", "max": 0.05}]),
    make_rollout(strategy="blue_green", steps=[{"weight": 100, "hold": "10s"}], warm_hold=30),
    make_rollout(strategy="ab", steps=[], ab_weight=50, sample_size=4000),
    make_rollout(strategy="shadow", then_canary=True),
    make_rollout(deadline="2h", on_deadline="hold", unavailable_deadline="90s"),
    make_rollout(
        steps=[{"weight": 10, "hold": "60s", "deadline": "5m"}, {"weight": 100}],
        on_deadline="alert",
        on_candidate_unavailable="rollback",
    ),
]
AVAILABILITY = [None, "missing", "loading", "refused", "stale", "unready"]
ACTIONS = ["rollback", "promote", "pause", "resume", "approve"]


@dataclass(frozen=True)
class Tick:
    seconds: float  # since the step before
    requests: int  # more of them, to each variant
    errors: int  # more candidate errors


@dataclass(frozen=True)
class Act:
    action: str


@dataclass(frozen=True)
class Look:
    candidate: str | None  # the registry's word on the candidate (None: can take traffic)


Step = Tick | Act | Look
steps = st.one_of(
    st.builds(Tick, st.floats(0, 120), st.integers(0, 2000), st.just(0) | st.integers(0, 200)),
    st.builds(Act, st.sampled_from(ACTIONS)),
    st.builds(Look, st.sampled_from(AVAILABILITY)),
)


def evidence(requests: int, errors: int) -> Evidence:
    latencies = np.full(1000, 0.05)
    stable = VariantEvidence("1.0.0", requests=requests, errors=0, latencies=latencies)
    candidate = VariantEvidence(
        "1.1.0", requests=requests, errors=min(errors, requests), latencies=latencies
    )
    return Evidence(stable, candidate, candidate_weight=0.0)


def run(rollout: Rollout, script: list[Step], first: str | None = None) -> list[lifecycle.Decided]:
    """The transitions a script produces, each from the state the one before left;
    `first`: the registry's word on the candidate when the rollout begins."""
    return [transition for _, transition in run_steps(rollout, script, first)]


def run_steps(
    rollout: Rollout, script: list[Step], first: str | None = None
) -> list[tuple[Step, lifecycle.Decided]]:
    """`run`, each transition beside its step (an action rejected has none)."""
    now, state = T0, lifecycle.begin(rollout, T0, candidate=first).state
    requests, errors = 0, 0
    out: list[tuple[Step, lifecycle.Decided]] = []
    for step in script:
        transition: lifecycle.Decided
        if isinstance(step, Look):
            transition = lifecycle.observe(rollout, state, step.candidate, now)
        elif isinstance(step, Tick):
            now, requests, errors = (
                now + step.seconds,
                requests + step.requests,
                errors + step.errors,
            )
            transition = lifecycle.tick(rollout, state, evidence(requests, errors), now)
        else:
            try:
                transition = lifecycle.act(rollout, state, step.action, "ops", now)
            except ActionRejected:
                continue
        out.append((step, transition))
        state = transition.state
    return out


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ROLLOUTS), st.lists(steps, max_size=25))
def test_nothing_is_routed_before_it_is_saved_and_audited(
    rollout: Rollout, script: list[Step]
) -> None:
    for transition in run(rollout, script):
        effects = transition.effects
        for i, effect in enumerate(effects):
            if isinstance(effect, Route):
                saves = [e for e in effects[:i] if isinstance(e, Save)]
                assert saves and saves[-1].state == effect.state
            if isinstance(effect, Audit):
                # Every audit record follows the save of the state it records.
                assert i > 0 and isinstance(effects[i - 1], Save)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ROLLOUTS), st.lists(steps, max_size=25))
def test_memory_never_differs_from_the_store_beyond_the_reason(
    rollout: Rollout, script: list[Step]
) -> None:
    saved = lifecycle.begin(rollout, T0).state
    for transition in run(rollout, script):
        saves = [e.state for e in transition.effects if isinstance(e, Save)]
        saved = saves[-1] if saves else saved
        assert replace(transition.state, reason="") == replace(saved, reason="")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ROLLOUTS), st.lists(steps, max_size=25), st.integers(0, 5000))
def test_terminal_states_never_change_on_tick(
    rollout: Rollout, script: list[Step], requests: int
) -> None:
    for transition in run(rollout, script):
        state: RolloutState = transition.state
        if not state.phase.terminal:
            continue
        after = lifecycle.tick(rollout, state, evidence(requests, requests // 2), T0 + 1e6)
        assert after.state == state and after.effects == () and not after.decision.changed


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ROLLOUTS), st.lists(steps, max_size=25), st.sampled_from(AVAILABILITY))
def test_a_candidate_that_cannot_take_traffic_gets_none(
    rollout: Rollout, script: list[Step], first: str | None
) -> None:
    """Once the registry says no, the candidate is failed over (or routed nothing) in
    every state until the registry says yes again or the rollout ends."""
    said = first
    for step, transition in run_steps(rollout, script, first):
        if isinstance(step, Look):
            said = step.candidate
        state = transition.state
        if said is not None and not state.phase.terminal:
            assert state.unavailable == said
        if state.phase is Phase.WAITING:
            assert state.weight == 0 and said is not None
        for effect in transition.effects:
            if isinstance(effect, Route):
                assert effect.failover == effect.state.unavailable


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ROLLOUTS), st.lists(steps, max_size=25), st.sampled_from(AVAILABILITY))
def test_a_rollout_with_a_deadline_always_ends(
    rollout: Rollout, script: list[Step], first: str | None
) -> None:
    """Past its deadline (and the failover deadline), a rollout that is not paused has
    ended: promoted, rolled back, concluded, or explicitly inconclusive."""
    spec = rollout.spec
    limits = [spec.deadline, *(s.deadline for s in spec.steps)]
    if all(limit is None for limit in limits):
        return
    transitions = run(rollout, script, first)
    state = (
        transitions[-1].state
        if transitions
        else lifecycle.begin(rollout, T0, candidate=first).state
    )
    later = T0 + 1e6
    for _ in range(3):  # the failover deadline first, then the rollout's
        state = lifecycle.tick(rollout, state, evidence(0, 0), later).state
        later += 1e6
    if state.phase is Phase.PAUSED:
        return
    ended = state.phase.terminal or state.phase is Phase.INCONCLUSIVE
    if spec.deadline is None and state.phase is not Phase.PROGRESSING:
        return  # only a step deadline, and no step running (awaiting approval, waiting)
    assert ended or state.inconclusive is not None, state
