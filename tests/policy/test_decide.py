"""decide() and apply_action(): every strategy's transitions, table-driven, plus state JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy.decide import Action, Counts, Decision, apply_action, decide, routing_weight
from rollguard.policy.errors import ActionRejected, StateError
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Check, Rollout
from rollguard.policy.sequential import difference_sequence
from rollguard.policy.state import Phase, RolloutState, mirroring
from rollguard.policy.verdict import CheckResult, Verdict

P, F, I = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE  # noqa: E741 - table shorthand
T0 = 1_700_000_000.0  # a wall-clock start time


def make_rollout(**spec: Any) -> Rollout:
    base: dict[str, Any] = {
        "model": "fraud",
        "stable": "1.0.0",
        "candidate": "1.1.0",
        "strategy": "canary",
        "key": "header:x-user-id",
        "steps": [
            {"weight": 5, "hold": "60s", "min_requests": 500},
            {"weight": 25, "hold": "120s"},
            {"weight": 100},
        ],
        "checks": [
            {"metric": "error_rate", "max": 0.01, "on_fail": "rollback"},
            {"metric": "agreement", "min": 0.95, "on_fail": "hold"},
            {"metric": "drift", "on_fail": "alert"},
        ],
    }
    document = {"apiVersion": "rollguard/v1", "kind": "Rollout", "metadata": {"name": "fraud"}}
    return Rollout.model_validate({**document, "spec": base | spec})


CANARY = make_rollout()
CANARY_APPROVAL = make_rollout(require_approval=True)
CANARY_ONE_STEP = make_rollout(require_approval=True, steps=[{"weight": 100, "hold": "10s"}])
AB = make_rollout(
    strategy="ab",
    steps=[],
    ab_weight=50,
    sample_size=1000,
    duration="1h",
    checks=[
        {"metric": "error_rate", "max_increase_vs_stable": 0.01, "on_fail": "rollback"},
        {"metric": "accuracy", "max_drop_vs_stable": 0.02, "on_fail": "alert"},
        {"metric": "srm", "on_fail": "hold"},
    ],
)
AB_ACCURACY = make_rollout(**{**AB.spec.model_dump(), "primary_metric": "accuracy"})
BLUE_GREEN = make_rollout(
    strategy="blue_green", steps=[{"weight": 100, "hold": "30s", "min_requests": 100}]
)
BLUE_GREEN_APPROVAL = make_rollout(**{**BLUE_GREEN.spec.model_dump(), "require_approval": True})
SHADOW = make_rollout(strategy="shadow", split="random", key=None)
SHADOW_CANARY = make_rollout(strategy="shadow", then_canary=True)


def check(rollout: Rollout, metric: str) -> Check:
    return next(c for c in rollout.spec.checks if c.metric == metric)


def result(
    rollout: Rollout,
    metric: str,
    verdict: Verdict,
    value: float = 0.0,
    bound: float = 0.0,
    **detail: float,
) -> CheckResult:
    return CheckResult(check(rollout, metric), verdict, value, bound, dict(detail))


def verdicts(rollout: Rollout, **given: Verdict) -> list[CheckResult]:
    """One result per check of the rollout: PASS unless named otherwise."""
    return [result(rollout, c.metric, given.get(c.metric, P)) for c in rollout.spec.checks]


def state(rollout: Rollout, **changes: Any) -> RolloutState:
    """The initial state with `changes`, its weight kept consistent as decide() keeps it."""
    changed = replace(RolloutState.initial(rollout, T0), **changes)
    return replace(changed, weight=routing_weight(rollout, changed))


@dataclass
class Case:
    rollout: Rollout
    state: RolloutState
    results: list[CheckResult]
    counts: Counts
    now: float
    action: Action
    phase: Phase
    weight: float
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # further state fields to compare


ALL_PASS = verdicts(CANARY)
DONE = Counts(stable=10_000, candidate=600)  # past step 1's min_requests
PAUSED_CANARY = state(CANARY, phase=Phase.PAUSED, paused_from=Phase.PROGRESSING, paused_at=T0)


# One row per transition: the inputs to decide(), then the expected action, phase,
# weight, step and any further state fields. Kept one row to a line, unformatted.
# fmt: off
# Shorthand for the table below.
NONE, HOLD, ADVANCE, PROMOTE, ROLLBACK, ALERT = (
    Action.NONE, Action.HOLD, Action.ADVANCE, Action.PROMOTE, Action.ROLLBACK, Action.ALERT)
AWAIT_APPROVAL, FLIP, FLIP_BACK, CONCLUDE = (
    Action.AWAIT_APPROVAL, Action.FLIP, Action.FLIP_BACK, Action.CONCLUDE)
PROGRESSING, PAUSED, AWAITING_APPROVAL, PROMOTED = (
    Phase.PROGRESSING, Phase.PAUSED, Phase.AWAITING_APPROVAL, Phase.PROMOTED)
ROLLED_BACK, CONCLUDED, SHADOWING, FLIPPED = (
    Phase.ROLLED_BACK, Phase.CONCLUDED, Phase.SHADOWING, Phase.FLIPPED)

CASES: dict[str, Case] = {
    # -- canary: steps 5 % (60 s, 500 requests), 25 % (120 s), 100 % --
    "canary holds for the step's hold time":
        Case(CANARY, state(CANARY), ALL_PASS, DONE, T0 + 30, NONE, PROGRESSING, 5),
    "canary waits for min_requests":
        Case(CANARY, state(CANARY), ALL_PASS, Counts(9000, 499), T0 + 61, NONE, PROGRESSING, 5),
    "canary advances when hold, requests and checks are met":
        Case(CANARY, state(CANARY), ALL_PASS, DONE, T0 + 61, ADVANCE, PROGRESSING, 25, 1,
             {"step_started_at": T0 + 61, "step_start_requests": 600}),
    "an inconclusive gating check blocks advance":
        Case(CANARY, state(CANARY), verdicts(CANARY, error_rate=I), DONE, T0 + 61,
             NONE, PROGRESSING, 5),
    "a failed rollback check rolls back":
        Case(CANARY, state(CANARY), verdicts(CANARY, error_rate=F), DONE, T0 + 1,
             ROLLBACK, ROLLED_BACK, 0),
    "a failed hold check holds":
        Case(CANARY, state(CANARY), verdicts(CANARY, agreement=F), DONE, T0 + 61,
             HOLD, PROGRESSING, 5, 0, {"holding": ("agreement",)}),
    "a failed alert check alerts but does not gate":
        Case(CANARY, state(CANARY), verdicts(CANARY, drift=F), DONE, T0 + 61,
             ADVANCE, PROGRESSING, 25, 1, {"alerting": ("drift",)}),
    "a failed alert check alone is an alert":
        Case(CANARY, state(CANARY), verdicts(CANARY, drift=F), DONE, T0 + 1,
             ALERT, PROGRESSING, 5, 0, {"alerting": ("drift",)}),
    "an inconclusive alert check does not gate":
        Case(CANARY, state(CANARY), verdicts(CANARY, drift=I), DONE, T0 + 61,
             ADVANCE, PROGRESSING, 25, 1),
    "the last step done promotes":
        Case(CANARY, state(CANARY, step=2, step_start_requests=600), ALL_PASS, DONE, T0,
             PROMOTE, PROMOTED, 100, 2),
    "approval is awaited before the last step":
        Case(CANARY_APPROVAL, state(CANARY_APPROVAL, step=1), ALL_PASS, DONE, T0 + 121,
             AWAIT_APPROVAL, AWAITING_APPROVAL, 25, 1),
    "no approval is needed before the second-to-last step":
        Case(CANARY_APPROVAL, state(CANARY_APPROVAL), ALL_PASS, DONE, T0 + 61,
             ADVANCE, PROGRESSING, 25, 1),
    "awaiting approval stays put on passing checks":
        Case(CANARY_APPROVAL, state(CANARY_APPROVAL, step=1, phase=AWAITING_APPROVAL), ALL_PASS,
             DONE, T0 + 9999, NONE, AWAITING_APPROVAL, 25, 1),
    "awaiting approval still rolls back":
        Case(CANARY_APPROVAL, state(CANARY_APPROVAL, step=1, phase=AWAITING_APPROVAL),
             verdicts(CANARY, error_rate=F), DONE, T0, ROLLBACK, ROLLED_BACK, 0, 1),
    "a single step with approval waits before promoting":
        Case(CANARY_ONE_STEP, state(CANARY_ONE_STEP), ALL_PASS, DONE, T0 + 11,
             AWAIT_APPROVAL, AWAITING_APPROVAL, 100),
    "paused makes no progress":
        Case(CANARY, PAUSED_CANARY, ALL_PASS, DONE, T0 + 9999, NONE, PAUSED, 5),
    "paused still rolls back on a failed rollback check (as Argo aborts)":
        Case(CANARY, PAUSED_CANARY, verdicts(CANARY, error_rate=F), DONE, T0 + 1,
             ROLLBACK, ROLLED_BACK, 0, 0, {"paused_from": None}),
    "paused ignores a failed hold check":
        Case(CANARY, PAUSED_CANARY, verdicts(CANARY, agreement=F), DONE, T0 + 1,
             NONE, PAUSED, 5),
    "rolled back stays rolled back":
        Case(CANARY, state(CANARY, phase=ROLLED_BACK), ALL_PASS, DONE, T0 + 9999,
             NONE, ROLLED_BACK, 0),
    "promoted ignores a failed check":
        Case(CANARY, state(CANARY, phase=PROMOTED, step=2), verdicts(CANARY, error_rate=F),
             DONE, T0, NONE, PROMOTED, 100, 2),
    # -- ab: 50 %, until 1000 requests or 1 h, on error_rate --
    "ab splits until the sample size":
        Case(AB, state(AB), verdicts(AB), Counts(400, 399), T0 + 10, NONE, PROGRESSING, 50),
    "ab concludes for the candidate when its error rate is lower":
        Case(AB, state(AB), verdicts(AB), Counts(1000, 1000, (50, 1000), (10, 1000)), T0 + 10,
             CONCLUDE, CONCLUDED, 100, 0, {"winner": "1.1.0"}),
    "ab concludes for stable when the candidate's error rate is higher":
        Case(AB, state(AB), verdicts(AB), Counts(1000, 1000, (10, 1000), (50, 1000)), T0 + 10,
             CONCLUDE, CONCLUDED, 0, 0, {"winner": "1.0.0"}),
    "ab with an interval spanning zero is inconclusive":
        Case(AB, state(AB), verdicts(AB), Counts(500, 500, (50, 500), (40, 500)), T0 + 10,
             CONCLUDE, CONCLUDED, 0, 0, {"winner": "inconclusive"}),
    "ab with too few samples per arm is inconclusive":
        Case(AB, state(AB), verdicts(AB), Counts(900, 100, (90, 900), (0, 100)), T0 + 10,
             CONCLUDE, CONCLUDED, 0, 0, {"winner": "inconclusive", "ci": None}),
    "ab on accuracy: higher is better":
        Case(AB_ACCURACY, state(AB_ACCURACY), verdicts(AB),
             Counts(500, 500, (400, 500), (450, 500)), T0 + 10,
             CONCLUDE, CONCLUDED, 100, 0, {"winner": "1.1.0"}),
    "ab concludes when the duration is up":
        Case(AB, state(AB), verdicts(AB), Counts(10, 10), T0 + 3600, CONCLUDE, CONCLUDED, 0),
    "ab rolls back early on harm":
        Case(AB, state(AB), verdicts(AB, error_rate=F), Counts(50, 50), T0 + 10,
             ROLLBACK, ROLLED_BACK, 0),
    "ab holds instead of concluding on sample-ratio mismatch":
        Case(AB, state(AB), verdicts(AB, srm=F), Counts(700, 300), T0 + 10,
             HOLD, PROGRESSING, 50, 0, {"holding": ("srm",)}),
    # -- blue-green: warm 30 s and 100 mirrored requests, then flip, warm_hold 300 s --
    "blue-green warms at weight 0 for the hold":
        Case(BLUE_GREEN, state(BLUE_GREEN), verdicts(BLUE_GREEN), Counts(0, 150), T0 + 10,
             NONE, PROGRESSING, 0),
    "blue-green waits for inconclusive checks":
        Case(BLUE_GREEN, state(BLUE_GREEN), verdicts(BLUE_GREEN, error_rate=I), Counts(0, 150),
             T0 + 31, NONE, PROGRESSING, 0),
    "blue-green flips once warmed":
        Case(BLUE_GREEN, state(BLUE_GREEN), verdicts(BLUE_GREEN), Counts(0, 150), T0 + 31,
             FLIP, FLIPPED, 100, 0, {"step_started_at": T0 + 31}),
    "blue-green awaits approval to flip":
        Case(BLUE_GREEN_APPROVAL, state(BLUE_GREEN_APPROVAL), verdicts(BLUE_GREEN),
             Counts(0, 150), T0 + 31, AWAIT_APPROVAL, AWAITING_APPROVAL, 0),
    "blue-green rolls back while warming":
        Case(BLUE_GREEN, state(BLUE_GREEN), verdicts(BLUE_GREEN, error_rate=F), Counts(0, 150),
             T0 + 31, ROLLBACK, ROLLED_BACK, 0),
    "blue-green flips back on a failure in the warm hold":
        Case(BLUE_GREEN, state(BLUE_GREEN, phase=FLIPPED), verdicts(BLUE_GREEN, error_rate=F),
             Counts(0, 150), T0 + 100, FLIP_BACK, ROLLED_BACK, 0),
    "blue-green keeps the old side warm for warm_hold":
        Case(BLUE_GREEN, state(BLUE_GREEN, phase=FLIPPED), verdicts(BLUE_GREEN),
             Counts(0, 150), T0 + 299, NONE, FLIPPED, 100),
    "blue-green promotes after warm_hold with nothing failed":
        Case(BLUE_GREEN, state(BLUE_GREEN, phase=FLIPPED), verdicts(BLUE_GREEN, error_rate=I),
             Counts(0, 150), T0 + 300, PROMOTE, PROMOTED, 100),
    "blue-green holds the promotion on a failed hold check":
        Case(BLUE_GREEN, state(BLUE_GREEN, phase=FLIPPED), verdicts(BLUE_GREEN, agreement=F),
             Counts(0, 150), T0 + 300, HOLD, FLIPPED, 100),
    # -- shadow --
    "shadow reports and stays at weight 0":
        Case(SHADOW, state(SHADOW), verdicts(SHADOW), Counts(5000, 5000), T0 + 9999,
             NONE, SHADOWING, 0),
    "shadow hands over to its canary once checks pass":
        Case(SHADOW_CANARY, state(SHADOW_CANARY), verdicts(SHADOW_CANARY), Counts(5000, 4000),
             T0 + 5, ADVANCE, PROGRESSING, 5, 0,
             {"step_started_at": T0 + 5, "step_start_requests": 4000}),
    "shadow waits for inconclusive checks":
        Case(SHADOW_CANARY, state(SHADOW_CANARY), verdicts(SHADOW_CANARY, agreement=I),
             Counts(50, 50), T0 + 5, NONE, SHADOWING, 0),
    "shadow holds on a failed hold check":
        Case(SHADOW_CANARY, state(SHADOW_CANARY), verdicts(SHADOW_CANARY, agreement=F),
             Counts(50, 50), T0 + 5, HOLD, SHADOWING, 0),
    "shadow stops on a failed rollback check":
        Case(SHADOW, state(SHADOW), verdicts(SHADOW, error_rate=F), Counts(50, 50), T0 + 5,
             ROLLBACK, ROLLED_BACK, 0),
    "a shadow that handed over runs the canary":
        Case(SHADOW_CANARY, state(SHADOW_CANARY, phase=PROGRESSING, step_start_requests=4000),
             verdicts(SHADOW_CANARY), Counts(9000, 4600), T0 + 61, ADVANCE, PROGRESSING, 25, 1),
}
# fmt: on


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide_transitions(case: Case) -> None:
    decision = decide(case.rollout, case.state, case.results, case.counts, case.now)
    assert (decision.action, decision.state.phase) == (case.action, case.phase)
    assert decision.weight == decision.state.weight == case.weight
    assert decision.weight == routing_weight(case.rollout, decision.state)
    assert decision.state.step == case.step
    for name, value in case.extra.items():
        assert getattr(decision.state, name) == value, name
    assert decision.reason == decision.state.reason and decision.reason
    assert decision.evidence == tuple(r.to_json() for r in case.results)
    assert decision.changed == (decision.action not in (Action.NONE,))


def test_reason_names_the_check_its_value_and_bound() -> None:
    failed = result(CANARY, "error_rate", F, value=0.034, bound=0.01)
    decision = decide(CANARY, state(CANARY), [failed], DONE, T0)
    assert decision.reason == "rollback: error_rate 0.034 vs 0.01 fail"
    assert decision.to_json()["checks"] == [failed.to_json()]


def test_a_continuing_hold_or_alert_changes_nothing() -> None:
    held = decide(CANARY, state(CANARY), verdicts(CANARY, agreement=F), DONE, T0 + 5)
    again = decide(CANARY, held.state, verdicts(CANARY, agreement=F), DONE, T0 + 10)
    assert again.action is Action.HOLD and not again.changed
    released = decide(CANARY, again.state, ALL_PASS, DONE, T0 + 15)
    assert released.changed and released.state.holding == ()


def test_ab_interval_is_the_always_valid_two_sided_sequence() -> None:
    counts = Counts(1000, 1000, (50, 1000), (10, 1000))
    decision = decide(AB, state(AB), verdicts(AB), counts, T0 + 10)
    expected = difference_sequence(50, 1000, 10, 1000, AB.spec.alpha, side="two-sided")
    assert decision.state.ci == (expected.lower, expected.upper)
    assert expected.upper < 0  # the candidate's error rate is lower with confidence
    assert "error_rate: 1.1.0" in decision.reason


def test_counts_of_evidence_pick_the_primary_metric() -> None:
    stable = VariantEvidence(
        "1.0.0",
        requests=100,
        errors=3,
        labelled=40,
        correct=30,
        since_threshold=90,
        over_threshold=2,
    )
    candidate = VariantEvidence("1.1.0", requests=50, errors=1, labelled=20, correct=19)
    evidence = Evidence(stable, candidate, candidate_weight=50)
    assert Counts.of(evidence) == Counts(100, 50, (3, 100), (1, 50))
    assert Counts.of(evidence, "accuracy").stable_primary == (30, 40)
    assert Counts.of(evidence, "latency").stable_primary == (2, 90)


def test_non_finite_values_are_written_as_strings() -> None:
    ratio = result(CANARY, "error_rate", P, value=math.inf, bound=0.01, p=math.nan)
    decision = decide(CANARY, state(CANARY), [ratio], DONE, T0)
    assert decision.evidence[0]["value"] == "inf"
    assert decision.evidence[0]["detail"] == {"p": "nan"}


def test_step_requests_are_rebased_when_unknown_or_the_counters_restart() -> None:
    unknown = state(CANARY, step=1, step_start_requests=None)
    first = decide(CANARY, unknown, ALL_PASS, Counts(100, 700), T0 + 1)
    assert first.state.step_start_requests == 700 and first.changed
    restarted = decide(
        CANARY, state(CANARY, step_start_requests=800), ALL_PASS, Counts(0, 600), T0 + 61
    )
    # 600 requests counted since the restart all belong to this step: enough to advance.
    assert restarted.action is Action.ADVANCE


# -- admin actions --

REJECTED = [
    ("approve", state(CANARY), "not awaiting approval"),
    ("resume", state(CANARY), "not paused"),
    ("pause", state(CANARY, phase=Phase.PAUSED, paused_from=Phase.PROGRESSING), "already paused"),
    ("pause", state(CANARY, phase=Phase.ROLLED_BACK), "only rollback applies"),
    ("promote", state(CANARY, phase=Phase.ROLLED_BACK), "only rollback applies"),
    ("approve", state(CANARY, phase=Phase.PROMOTED), "only rollback applies"),
    ("rollback", state(CANARY, phase=Phase.ROLLED_BACK), "already rolled back"),
    ("resume", state(AB, phase=Phase.CONCLUDED), "only rollback applies"),
    ("explode", state(CANARY), "unknown action"),
    (
        "approve",
        state(CANARY, phase=Phase.PAUSED, paused_from=Phase.AWAITING_APPROVAL),
        "resume it first",
    ),
]


@pytest.mark.parametrize(("action", "before", "message"), REJECTED)
def test_apply_action_rejects_what_does_not_fit(
    action: str, before: RolloutState, message: str
) -> None:
    with pytest.raises(ActionRejected, match=message):
        apply_action(CANARY, before, action, "alice", T0)


def test_approve_records_who_and_enters_the_last_step() -> None:
    waiting = state(CANARY_APPROVAL, step=1, phase=Phase.AWAITING_APPROVAL)
    decision = apply_action(CANARY_APPROVAL, waiting, "approve", "alice", T0 + 500)
    assert decision.action is Action.APPROVE and decision.changed
    assert (decision.state.approved_by, decision.state.approved_at) == ("alice", T0 + 500)
    assert (decision.state.phase, decision.state.step, decision.weight) == (
        Phase.PROGRESSING,
        2,
        100,
    )
    assert "alice" in decision.reason
    # Approved once: the last step promotes without asking again.
    later = decide(CANARY_APPROVAL, decision.state, ALL_PASS, DONE, T0 + 501)
    assert later.action is Action.PROMOTE


def test_approve_promotes_a_single_step_and_flips_a_blue_green() -> None:
    one = state(CANARY_ONE_STEP, phase=Phase.AWAITING_APPROVAL)
    assert apply_action(CANARY_ONE_STEP, one, "approve", "bob", T0).state.phase is Phase.PROMOTED
    bg = state(BLUE_GREEN_APPROVAL, phase=Phase.AWAITING_APPROVAL)
    flipped = apply_action(BLUE_GREEN_APPROVAL, bg, "approve", "bob", T0 + 7)
    assert (flipped.state.phase, flipped.weight, flipped.state.step_started_at) == (
        Phase.FLIPPED,
        100,
        T0 + 7,
    )


def test_pause_keeps_the_weight_and_resume_does_not_count_paused_time() -> None:
    running = state(CANARY, step=1, step_started_at=T0)
    paused = apply_action(CANARY, running, "pause", "ops", T0 + 50)
    assert (paused.action, paused.state.phase, paused.weight) == (Action.PAUSE, Phase.PAUSED, 25)
    resumed = apply_action(CANARY, paused.state, "resume", "ops", T0 + 1050)
    assert resumed.state.phase is Phase.PROGRESSING and resumed.state.paused_from is None
    assert resumed.state.step_started_at == T0 + 1000  # 50 s held before the pause still count
    assert decide(CANARY, resumed.state, ALL_PASS, DONE, T0 + 1100).action is Action.NONE
    assert decide(CANARY, resumed.state, ALL_PASS, DONE, T0 + 1120).action is Action.ADVANCE


def test_operator_rollback_and_promote() -> None:
    flipped = state(BLUE_GREEN, phase=Phase.FLIPPED)
    back = apply_action(BLUE_GREEN, flipped, "rollback", "ops", T0)
    assert (back.action, back.state.phase, back.weight) == (Action.FLIP_BACK, Phase.ROLLED_BACK, 0)
    promoted = apply_action(CANARY, state(CANARY), "promote", "ops", T0)
    assert (promoted.state.phase, promoted.weight) == (Phase.PROMOTED, 100)
    undone = apply_action(CANARY, promoted.state, "rollback", "ops", T0 + 1)
    assert (undone.state.phase, undone.weight) == (Phase.ROLLED_BACK, 0)
    # A concluded A/B test is advice: its candidate may still be promoted by hand.
    concluded = state(AB, phase=Phase.CONCLUDED, winner="inconclusive")
    assert apply_action(AB, concluded, "promote", "ops", T0).weight == 100


# -- state and routing --


@pytest.mark.parametrize(
    ("rollout", "phase", "weight", "mirrors"),
    [
        (CANARY, Phase.PROGRESSING, 5, False),
        (AB, Phase.PROGRESSING, 50, False),
        (BLUE_GREEN, Phase.PROGRESSING, 0, True),
        (SHADOW, Phase.SHADOWING, 0, True),
    ],
)
def test_initial_state_per_strategy(
    rollout: Rollout, phase: Phase, weight: float, mirrors: bool
) -> None:
    initial = RolloutState.initial(rollout, T0, generation=3)
    assert (initial.phase, initial.weight, initial.generation) == (phase, weight, 3)
    assert (initial.started_at, initial.step_started_at, initial.step_start_requests) == (
        T0,
        T0,
        0,
    )
    assert mirroring(rollout, initial) is mirrors
    assert initial.same_rollout(rollout)
    assert not initial.same_rollout(make_rollout(candidate="1.2.0"))


def test_routing_weight_follows_a_hot_edit_of_the_step_weight() -> None:
    edited = make_rollout(steps=[{"weight": 10}, {"weight": 30}, {"weight": 100}])
    assert routing_weight(edited, state(CANARY, step=1)) == 30
    assert routing_weight(make_rollout(steps=[{"weight": 50}]), state(CANARY, step=2)) == 50


def test_state_json_round_trip() -> None:
    full = state(
        AB,
        phase=Phase.PAUSED,
        paused_from=Phase.PROGRESSING,
        paused_at=T0 + 1,
        holding=("srm",),
        alerting=("accuracy", "drift"),
        ci=(-0.5, 0.25),
        winner="x",
        approved_by="alice",
        approved_at=T0 + 2,
        latency_threshold=0.125,
        step_start_requests=None,
    )
    assert RolloutState.from_json(full.to_json()) == full
    assert full.to_json()["phase"] == "paused"


@pytest.mark.parametrize(
    "damage",
    [
        {"format": 99},
        {"phase": "sideways"},
        {"step": 1, "surprise": True},
    ],
)
def test_state_from_bad_json_is_a_state_error(damage: dict[str, object]) -> None:
    with pytest.raises(StateError):
        RolloutState.from_json(state(CANARY).to_json() | damage)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([P, F, I]),
            st.sampled_from([P, F, I]),
            st.integers(0, 400),
            st.floats(0, 200),
        ),
        max_size=25,
    ),
    st.sampled_from([CANARY, CANARY_APPROVAL, AB, BLUE_GREEN, SHADOW_CANARY]),
)
def test_any_run_is_consistent_and_terminal_phases_stick(
    ticks: list[tuple[Verdict, Verdict, int, float]], rollout: Rollout
) -> None:
    current, requests, now = RolloutState.initial(rollout, T0), 0, T0
    for error, agreement, more, later in ticks:
        requests, now = requests + more, now + later
        results = [result(rollout, "error_rate", error)]
        if any(c.metric == "agreement" for c in rollout.spec.checks):
            results.append(result(rollout, "agreement", agreement))
        decision: Decision = decide(rollout, current, results, Counts(requests, requests), now)
        assert decision.weight == routing_weight(rollout, decision.state)
        if current.phase.terminal:
            assert decision.state == current and not decision.changed
        if error is F and not current.phase.terminal:
            assert decision.state.phase is Phase.ROLLED_BACK and decision.weight == 0
        assert decision.state.step >= current.step or decision.state.phase.terminal
        current = decision.state
