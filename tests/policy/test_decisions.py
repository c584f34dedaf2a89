"""How checks decide, through the real decision code (issue 16): the running-minimum SRM
p-value kept across restarts, alpha not capped by an unset confidence, PASS only on an
always-valid bound, and settings that can never decide refused."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy import lifecycle
from rollguard.policy.checks import check_alpha, evaluate_checks
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Check, Rollout, Spec
from rollguard.policy.srm import SRM_PVALUE, sequential_srm_pvalue
from rollguard.policy.state import RolloutState
from rollguard.policy.verdict import Verdict

T0 = 1_700_000_000.0


def _rollout(checks: list[dict[str, Any]], **spec: Any) -> Rollout:
    base: dict[str, Any] = {
        "model": "m",
        "stable": "1",
        "candidate": "2",
        "key": "header:x-user",
        "steps": [{"weight": 20, "hold": "1h"}, {"weight": 100}],
        "checks": checks,
    }
    document = {"apiVersion": "rollguard/v1", "kind": "Rollout", "metadata": {"name": "r"}}
    return Rollout.model_validate({**document, "spec": base | spec})


def _routed(stable: int, candidate: int, weight: float = 20.0) -> Evidence:
    return Evidence(
        VariantEvidence("1", routed=stable, requests=stable),
        VariantEvidence("2", routed=candidate, requests=candidate),
        weight,
    )


def _srm_result(state: RolloutState, rollout: Rollout, ev: Evidence) -> tuple[Any, RolloutState]:
    decided = lifecycle.tick(rollout, state, ev, T0 + 1)
    srm = next(c for c in decided.decision.evidence if c["metric"] == "srm")
    return srm, decided.state


# --- 1. the sequential SRM p-value is its running minimum, kept across restarts ----------


def test_a_split_mismatch_once_shown_stays_shown_when_counts_even_out() -> None:
    rollout = _rollout([{"metric": "srm", "on_fail": "hold"}])
    state = lifecycle.begin(rollout, T0).state
    # A router bug: the candidate gets 40 % instead of 20 % for a while.
    srm, state = _srm_result(state, rollout, _routed(600, 400))
    assert srm["verdict"] == "fail" and state.srm_pvalue is not None
    assert state.srm_pvalue < SRM_PVALUE and state.srm_weight == 20
    # The bug is fixed and the counts even out: the latest look alone would say "as configured".
    assert sequential_srm_pvalue([31800, 8200], [80, 20]) > SRM_PVALUE
    srm, state = _srm_result(state, rollout, _routed(31800, 8200))
    assert srm["verdict"] == "fail" and srm["detail"]["pvalue"] < SRM_PVALUE
    assert srm["detail"]["pvalue_now"] > SRM_PVALUE
    # A restart: the state comes back from its JSON, the new process's counters are zero.
    restored = RolloutState.from_json(state.to_json())
    srm, _ = _srm_result(restored, rollout, _routed(0, 0))
    assert srm["verdict"] == "fail", "a restart must not forget a mismatch already shown"


def test_a_new_weight_is_a_new_split_tested_afresh() -> None:
    rollout = _rollout([{"metric": "srm", "on_fail": "hold"}])
    state = lifecycle.begin(rollout, T0).state
    _, state = _srm_result(state, rollout, _routed(600, 400))
    assert state.srm_pvalue is not None and state.srm_pvalue < SRM_PVALUE
    moved = lifecycle.act(rollout, state, "promote", "ops", T0 + 2).state  # weight 100
    # Weight 100 has no split; an operator moving weights starts a new sequence.
    srm, _ = _srm_result(moved, rollout, _routed(0, 500, weight=100))
    assert srm["verdict"] != "fail"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 120)), min_size=1, max_size=12))
def test_the_srm_pvalue_reported_never_rises_while_the_weight_holds(
    increments: list[tuple[int, int]],
) -> None:
    """Property: whatever the counts do, each look's p-value ≤ the previous look's, and
    the state keeps the least p-value any look has shown."""
    rollout = _rollout([{"metric": "srm", "on_fail": "alert"}])
    state = lifecycle.begin(rollout, T0).state
    stable = candidate = 0
    last, least_now = 1.0, 1.0
    for ds, dc in increments:
        stable, candidate = stable + ds, candidate + dc
        srm, state = _srm_result(state, rollout, _routed(stable, candidate))
        p = srm["detail"].get("pvalue", 1.0)
        least_now = min(least_now, srm["detail"].get("pvalue_now", 1.0))
        assert p <= last + 1e-15
        assert p == least_now or (p == 1.0 and least_now == 1.0)
        last = p
    assert (state.srm_pvalue or 1.0) == last


# --- 1. check_alpha: an unset confidence caps nothing ------------------------------------


def _spec(*checks: Check, alpha: float) -> Spec:
    base: dict[str, Any] = {"model": "m", "stable": "1", "candidate": "2", "key": "header:x"}
    return Spec.model_validate(base | {"steps": [{"weight": 10}], "alpha": alpha, "checks": checks})


@given(
    alpha=st.floats(0.001, 0.49),
    k=st.integers(1, 4),
    confidence=st.none() | st.floats(0.51, 0.999),
)
def test_check_alpha_is_the_bonferroni_share_unless_a_confidence_asks_for_less(
    alpha: float, k: int, confidence: float | None
) -> None:
    fields: dict[str, Any] = {"metric": "error_rate", "max": 0.1}
    check = Check.model_validate(
        fields | ({} if confidence is None else {"confidence": confidence})
    )
    spec = _spec(*([check] * k), alpha=alpha)
    expected = alpha / k if confidence is None else min(alpha / k, 1 - confidence)
    assert abs(check_alpha(spec, check) - expected) < 1e-12


def test_a_spec_alpha_above_five_percent_is_not_capped() -> None:
    check = Check(metric="error_rate", max_increase_vs_stable=0.0)
    assert check_alpha(_spec(check, alpha=0.2), check) == 0.2
    stricter = Check(metric="error_rate", max_increase_vs_stable=0.0, confidence=0.99)
    assert abs(check_alpha(_spec(stricter, alpha=0.2), stricter) - 0.01) < 1e-12
    results = evaluate_checks(_spec(check, alpha=0.2), _routed(1000, 250))
    assert results[0].detail["alpha"] == 0.2 and results[0].verdict is not Verdict.FAIL


# --- 2. no promotion on a point estimate -------------------------------------------------

ERRORS = {"metric": "error_rate", "max_increase_vs_stable": 0.005}


def _errors(stable: tuple[int, int], candidate: tuple[int, int], weight: float = 20) -> Evidence:
    (xs, ns), (xc, nc) = stable, candidate
    return Evidence(
        VariantEvidence("1", requests=ns, errors=xs, routed=ns),
        VariantEvidence("2", requests=nc, errors=xc, routed=nc),
        weight,
    )


def test_the_issue_example_is_not_promoted_on_one_lucky_look() -> None:
    """Stable 10/1,000 vs candidate 3/250: the estimate (+0.2 points) is within the
    0.5-point margin, but the always-valid bound of the harm is not: no promotion."""
    rollout = _rollout([ERRORS], steps=[{"weight": 20}])
    state = lifecycle.begin(rollout, T0).state
    decided = lifecycle.tick(rollout, state, _errors((10, 1000), (3, 250)), T0 + 5)
    check: Any = decided.decision.evidence[0]
    assert check["verdict"] == "inconclusive"
    assert abs(float(check["detail"]["harm"]) - 0.002) < 1e-12
    assert float(check["detail"]["ci_upper"]) > 0.03  # the harm could be 3 points
    assert decided.decision.action.value == "none" and decided.state.phase.value == "progressing"
    # Enough healthy evidence rules out harm beyond the margin: then it promotes.
    decided = lifecycle.tick(rollout, state, _errors((400, 40_000), (95, 10_000)), T0 + 10)
    assert decided.decision.evidence[0]["verdict"] == "pass"
    assert decided.decision.action.value == "promote"


def test_no_fail_mode_passes_on_a_minimum_sample_without_a_fail() -> None:
    lenient = ERRORS | {"pass_when": "no_fail", "min_samples": 250}
    rollout = _rollout([lenient], steps=[{"weight": 20}])
    state = lifecycle.begin(rollout, T0).state
    early = lifecycle.tick(rollout, state, _errors((10, 1000), (2, 200)), T0 + 5)
    assert early.decision.evidence[0]["verdict"] == "inconclusive"  # 200 < min_samples
    decided = lifecycle.tick(rollout, state, _errors((10, 1000), (3, 250)), T0 + 10)
    assert decided.decision.evidence[0]["verdict"] == "pass"
    assert decided.decision.action.value == "promote"


def test_fail_is_tested_at_margin_zero_and_fail_margin_moves_it() -> None:
    # Candidate 1.5 % vs stable 1 %: worse, though within the 0.5-point practical margin
    # only at its edge; at margin 0 the harm is shown and the rollout rolls back.
    ev = _errors((400, 40_000), (300, 20_000))
    rollout = _rollout([ERRORS], steps=[{"weight": 20}])
    state = lifecycle.begin(rollout, T0).state
    assert lifecycle.tick(rollout, state, ev, T0 + 5).decision.action.value == "rollback"
    tolerant = _rollout([ERRORS | {"fail_margin": 0.005}], steps=[{"weight": 20}])
    decided = lifecycle.tick(tolerant, lifecycle.begin(tolerant, T0).state, ev, T0 + 5)
    assert decided.decision.evidence[0]["verdict"] == "inconclusive"
    assert decided.decision.action.value == "none"


def test_a_fail_margin_beyond_the_practical_margin_is_refused() -> None:
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match=r"fail_margin 0\.01 must not exceed"):
        Check(metric="error_rate", max_increase_vs_stable=0.005, fail_margin=0.01)
    with pytest.raises(pydantic.ValidationError, match="'fail_margin' applies to"):
        Check(metric="error_rate", max=0.01, fail_margin=0.0)


@settings(max_examples=300, deadline=None)
@given(
    xs=st.integers(0, 300),
    ns=st.integers(200, 30_000),
    xc=st.integers(0, 300),
    nc=st.integers(200, 30_000),
    margin=st.sampled_from([0.0, 0.005, 0.02]),
    good=st.booleans(),
)
def test_a_pass_always_rests_on_the_bound_of_the_harm(
    xs: int, ns: int, xc: int, nc: int, margin: float, good: bool
) -> None:
    """Property: whatever the counts, a PASS means the always-valid upper bound of the harm
    (candidate − stable for errors, stable − candidate for accuracy) is within the margin,
    recomputed here from policy.sequential; and FAIL means its lower bound is above 0."""
    from rollguard.policy.sequential import difference_sequence

    xs, xc = min(xs, ns), min(xc, nc)
    if good:
        check = Check(metric="accuracy", max_drop_vs_stable=margin)
        s = VariantEvidence("1", requests=ns, labelled=ns, correct=xs)
        c = VariantEvidence("2", requests=nc, labelled=nc, correct=xc)
        harm = difference_sequence(xc, nc, xs, ns, 0.05, side="upper", null=margin)
    else:
        # The mSPRT's bound (the conditional test's: tests/policy/test_conditional.py)
        check = Check(metric="error_rate", max_increase_vs_stable=margin, test="msprt")
        s = VariantEvidence("1", requests=ns, errors=xs)
        c = VariantEvidence("2", requests=nc, errors=xc)
        harm = difference_sequence(xs, ns, xc, nc, 0.05, side="upper", null=margin)
    spec = Spec.model_validate(
        {"model": "m", "stable": "1", "candidate": "2", "key": "header:x"}
        | {"steps": [{"weight": 10}], "checks": [check]}
    )
    result = evaluate_checks(spec, Evidence(s, c, 10))[0]
    if result.verdict is Verdict.PASS:
        assert harm.upper <= margin
    else:  # both arms have min_samples: only a FAIL may stop a bound within the margin
        assert harm.upper > margin or result.verdict is Verdict.FAIL
    if result.verdict is Verdict.FAIL:
        assert float(result.detail["ci_lower"] or 0) > 0.0


# --- 3. settings that can never decide are refused -------------------------------------


@given(q=st.sampled_from([50.0, 90.0, 95.0, 99.0, 99.5, 99.9]), window=st.integers(10, 20_000))
def test_a_latency_ratio_check_needs_a_window_that_can_freeze_its_threshold(
    q: float, window: int
) -> None:
    """A p99 check against the stable needs window ≥ 10 / (1 − q): below it the threshold
    is never frozen and the check never decides; the error names the field."""
    import math

    import pydantic
    import pytest

    checks = [{"metric": f"latency_p{q:g}", "max_ratio_to_stable": 1.2}]
    needed = math.ceil(10 / (1 - q / 100) - 1e-9)
    if window >= needed:
        _rollout(checks, window=window)
        return
    with pytest.raises(pydantic.ValidationError, match=rf"window {window} can never decide"):
        _rollout(checks, window=window)
    _rollout([{"metric": f"latency_p{q:g}", "max": 0.2}], window=window)  # absolute: fine


# --- 4. a check that has nothing to test does not stall a canary ---------------------------


def test_an_agreement_check_without_mirrored_traffic_does_not_hold_a_canary() -> None:
    """The README's example has an agreement check (for shadows) in a canary: nothing is
    mirrored there, so it stays inconclusive; it must not hold the rollout forever."""
    rollout = _rollout(
        [{"metric": "agreement", "min": 0.95, "on_fail": "hold"}],
        steps=[{"weight": 20, "hold": "1s"}, {"weight": 100}],
    )
    state = lifecycle.begin(rollout, T0).state
    ev = _routed(800, 200)
    decided = lifecycle.tick(rollout, state, ev, T0 + 2)
    (agreement,) = decided.decision.evidence
    assert agreement["verdict"] == "inconclusive"
    assert decided.state.weight == 100, decided.decision.reason  # advanced regardless
