"""Checks against evidence: the three-way verdicts, their gates, alpha and detail."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.policy.checks import (
    MIN_CONDITIONAL_EVENTS,
    MIN_EVENTS,
    check_alpha,
    evaluate,
    evaluate_checks,
    latency_rows,
    latency_threshold,
)
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Check, Spec
from rollguard.policy.verdict import Verdict

PASS, FAIL, INCONCLUSIVE = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE
ALPHA = 0.05


def _ev(
    stable: dict[str, Any], candidate: dict[str, Any], weight: float = 10.0, **kw: Any
) -> Evidence:
    return Evidence(VariantEvidence("1", **stable), VariantEvidence("2", **candidate), weight, **kw)


def _spec(*checks: Check, **kw: Any) -> Spec:
    base: dict[str, Any] = {"model": "m", "stable": "1", "candidate": "2", "key": "header:x-user"}
    return Spec.model_validate(base | {"steps": [{"weight": 10}]} | kw | {"checks": list(checks)})


def _verdict(check: Check, ev: Evidence) -> Verdict:
    return evaluate(check, ev, alpha=ALPHA).verdict


# --- error rate ---------------------------------------------------------------------------

INCREASE = Check(metric="error_rate", max_increase_vs_stable=0.005)
# The two-sample mixture SPRT on cumulative counts (the conditional test, the default, is
# tested in tests/policy/test_conditional.py).
INCREASE_MSPRT = Check(metric="error_rate", max_increase_vs_stable=0.005, test="msprt")


def test_error_rate_increase_fails_on_a_clear_regression() -> None:
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 2000, "errors": 100})
    result = evaluate(INCREASE, ev, alpha=ALPHA)
    assert result.verdict is FAIL
    assert result.value == pytest.approx(0.04) and result.bound == 0.005
    d = result.detail
    assert d["ci_lower"] is not None and float(d["ci_lower"]) > 0.005
    assert d["n_stable"] == 20_000 and d["n_candidate"] == 2000
    assert d["rate_candidate"] == pytest.approx(0.05) and float(d["pvalue"] or 1) < ALPHA


def test_error_rate_increase_passes_a_healthy_candidate() -> None:
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 20_000, "errors": 180})
    assert _verdict(INCREASE, ev) is PASS


def test_a_point_estimate_within_the_margin_is_not_a_pass() -> None:
    # The estimate (+0.05 points) is within the 0.5-point margin, the bound (+0.73) is not.
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 2000, "errors": 21})
    result = evaluate(INCREASE, ev, alpha=ALPHA)
    assert result.verdict is INCONCLUSIVE and float(result.detail["ci_upper"] or 0) > 0.005


def test_too_few_samples_is_inconclusive_however_bad() -> None:
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 199, "errors": 199})
    result = evaluate(INCREASE_MSPRT, ev, alpha=ALPHA)
    assert result.verdict is INCONCLUSIVE
    assert "199" in str(result.detail["reason"])
    assert _verdict(INCREASE, _ev({"requests": 150}, {"requests": 5000})) is INCONCLUSIVE
    # The conditional test is exact at any sample size: a clear harm FAILs before it.
    assert _verdict(INCREASE, ev) is FAIL


def test_beyond_the_margin_but_undecided_is_inconclusive() -> None:
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 300, "errors": 6})
    result = evaluate(INCREASE, ev, alpha=ALPHA)
    assert result.value is not None and result.value > 0.005
    assert result.verdict is INCONCLUSIVE


def test_fewer_than_five_harmful_events_never_fail() -> None:
    """Five for the mixture SPRT (its normal approximation); three for the conditional
    test, the default, which is exact at any count (MIN_CONDITIONAL_EVENTS)."""
    no_margin = Check(metric="error_rate", max_increase_vs_stable=0.0, min_samples=5)
    msprt = Check(metric="error_rate", max_increase_vs_stable=0.0, min_samples=5, test="msprt")
    for check, floor in ((no_margin, MIN_CONDITIONAL_EVENTS), (msprt, MIN_EVENTS)):
        for alpha in (0.05, 0.2, 0.45):
            for n in (5, 20, 200):
                ev = _ev({"requests": 1_000_000}, {"requests": n, "errors": floor - 1})
                assert evaluate(check, ev, alpha=alpha).verdict is not FAIL
    ev = _ev({"requests": 1_000_000}, {"requests": 300, "errors": 20})
    assert _verdict(no_margin, ev) is FAIL


def test_error_rate_max_is_one_sample() -> None:
    cap = Check(metric="error_rate", max=0.01)
    assert _verdict(cap, _ev({}, {"requests": 5000, "errors": 150})) is FAIL
    assert _verdict(cap, _ev({}, {"requests": 5000, "errors": 20})) is PASS
    assert _verdict(cap, _ev({}, {"requests": 5000, "errors": 40})) is INCONCLUSIVE  # 0.8 %
    assert _verdict(cap, _ev({}, {"requests": 5000, "errors": 60})) is INCONCLUSIVE
    assert _verdict(cap, _ev({}, {"requests": 100, "errors": 100})) is INCONCLUSIVE


# --- latency ------------------------------------------------------------------------------

# The one-sample exceedance test at T = ratio × stable's pNN (test msprt); the two-sample
# conditional test, the default, is tested in tests/policy/test_conditional.py.
P99 = Check(metric="latency_p99", max_ratio_to_stable=1.5, test="msprt")


def _lat(n: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return scale * np.random.default_rng(seed).lognormal(np.log(0.05), 0.5, n)


def test_latency_threshold_waits_for_a_trustworthy_stable_pnn() -> None:
    assert latency_threshold(P99, VariantEvidence("1", requests=5000, latencies=_lat(999))) is None
    assert latency_threshold(P99, VariantEvidence("1", requests=150, latencies=_lat(2000))) is None
    stable = VariantEvidence("1", requests=5000, latencies=_lat(2000))
    assert latency_threshold(P99, stable) == pytest.approx(
        1.5 * np.percentile(stable.latencies, 99)
    )
    p90 = Check(metric="latency_p90", max_ratio_to_stable=1.2)
    assert (
        latency_threshold(p90, VariantEvidence("1", requests=200, latencies=_lat(200))) is not None
    )
    absolute = Check(metric="latency_p95", max=0.25)
    assert latency_threshold(absolute, VariantEvidence("1")) == 0.25
    with pytest.raises(ValueError):
        latency_threshold(INCREASE, stable)


def test_latency_rows_is_the_stables_median_request_size() -> None:
    assert latency_rows(VariantEvidence("1")) == 1  # no traffic yet: single rows
    rows = np.array([1, 1, 2, 8, 2000], dtype=np.uint32)
    assert latency_rows(VariantEvidence("1", latencies=np.ones(5), rows=rows)) == 2


@given(
    big=st.integers(0, 900),
    size=st.integers(2, 100_000),
    slow=st.floats(1.0, 1000.0),
)
def test_requests_above_the_median_size_never_move_the_threshold(
    big: int, size: int, slow: float
) -> None:
    """A client sending up to 900 huge, slow batches into the stable's window of 2000 (a
    minority: the median stays 1 row) leaves T where the single-row requests put it."""
    small = _lat(2000 - big)
    latencies = np.concatenate((small, np.full(big, slow)))
    rows = np.concatenate((np.ones(2000 - big), np.full(big, size))).astype(np.uint32)
    stable = VariantEvidence("1", requests=5000, latencies=latencies, rows=rows)
    assert latency_rows(stable) == 1
    assert latency_threshold(P99, stable) == pytest.approx(1.5 * np.percentile(small, 99))


def _lat_ev(over: int, since: int = 3000, threshold: float | None = 0.2) -> Evidence:
    stable = {
        "requests": 30_000,
        "latencies": _lat(2000),
        "latency_threshold": threshold,
        "since_threshold": 27_000,
        "over_threshold": 40,
    }
    candidate = {
        "requests": since,
        "latencies": _lat(2000, 1.3, 1),
        "latency_threshold": threshold,
        "since_threshold": since,
        "over_threshold": over,
    }
    return _ev(stable, candidate)


def test_latency_fails_when_the_candidate_pnn_is_above_t_with_confidence() -> None:
    result = evaluate(P99, _lat_ev(over=120), alpha=ALPHA)
    assert result.verdict is FAIL
    assert result.value == pytest.approx(0.04) and result.bound == pytest.approx(0.01)
    d = result.detail
    assert d["threshold_s"] == 0.2 and float(d["ci_lower"] or 0) > 0.01
    s, c = float(d["stable_window_pnn"] or 0), float(d["candidate_window_pnn"] or 0)
    assert d["window_ratio"] == pytest.approx(c / s) and s > 0
    assert d["stable_exceedance"] == pytest.approx(40 / 27_000)


def test_latency_pass_inconclusive_and_unfrozen() -> None:
    assert _verdict(P99, _lat_ev(over=10)) is PASS
    assert _verdict(P99, _lat_ev(over=20)) is INCONCLUSIVE  # 0.67 %, its upper bound 1.09 %
    assert _verdict(P99, _lat_ev(over=40)) is INCONCLUSIVE
    assert _verdict(P99, _lat_ev(over=100, since=150)) is INCONCLUSIVE
    unfrozen = evaluate(P99, _lat_ev(over=0, threshold=None), alpha=ALPHA)
    assert unfrozen.verdict is INCONCLUSIVE and "threshold" in str(unfrozen.detail["reason"])


# --- accuracy and agreement ---------------------------------------------------------------

DROP = Check(metric="accuracy", max_drop_vs_stable=0.02)


def _labels(requests: int, labelled: int, correct: int) -> dict[str, int]:
    return {
        "requests": requests,
        "labelled": labelled,
        "labelled_requests": labelled,
        "correct": correct,
    }


def test_accuracy_drop_two_sample_and_label_rates() -> None:
    stable = _labels(20_000, 10_000, 9000)
    bad = evaluate(DROP, _ev(stable, _labels(4000, 2000, 1600)), alpha=ALPHA)
    assert bad.verdict is FAIL and bad.value == pytest.approx(0.1)
    assert bad.detail["label_rates_differ"] == "no"
    assert bad.detail["label_rate_stable"] == pytest.approx(0.5)
    more = _labels(4000, 2000, 1830)
    assert evaluate(DROP, _ev(stable, more), alpha=ALPHA).verdict is PASS


def _labelled(*rows: tuple[float, int, int]) -> dict[str, Any]:
    """An arm's label counts per weight (weight, labelled, correct), half its requests
    labelled."""
    n, ok = sum(r[1] for r in rows), sum(r[2] for r in rows)
    return _labels(2 * n, n, ok) | {"label_strata": rows}


def test_accuracy_is_compared_within_weights_not_pooled_across_them() -> None:
    """Accuracy falls from 95 % to 80 % in both arms while the weight steps from 5 % to
    50 % (Simpson): pooled, the candidate's labels come mostly from the worse late hours
    and it looks 8 points worse (FAIL); within each weight it is not worse at all. A
    candidate worse within the weights still FAILs."""
    stable = _labelled((5.0, 9_500, 9_025), (50.0, 5_000, 4_000))
    alike = _labelled((5.0, 500, 475), (50.0, 5_000, 4_000))
    result = evaluate(DROP, _ev(stable, alike), alpha=ALPHA)
    assert result.verdict is not FAIL and result.detail["strata"] == 2
    assert result.value == pytest.approx(0.0, abs=1e-9)
    pooled_ev = _ev(_labels(29_000, 14_500, 13_025), _labels(11_000, 5_500, 4_475))
    pooled = evaluate(DROP, pooled_ev, alpha=ALPHA)
    assert pooled.verdict is FAIL and pooled.detail["strata"] == 1
    worse = _labelled((5.0, 500, 440), (50.0, 5_000, 3_800))
    assert evaluate(DROP, _ev(stable, worse), alpha=ALPHA).verdict is FAIL
    # per-weight counts that do not account for every label (an earlier process's,
    # carried as totals only): the totals are compared
    partial = _labelled((5.0, 500, 475), (50.0, 5_000, 4_000)) | {"labelled": 5_600}
    assert evaluate(DROP, _ev(stable, partial), alpha=ALPHA).detail["strata"] == 1


@pytest.mark.parametrize(("correct", "would"), [(780, "pass"), (560, "fail")])
def test_accuracy_holds_while_label_rates_differ(correct: int, would: str) -> None:
    """50 % of the stable's requests labelled, 20 % of the candidate's: whatever the
    labels say, the comparison holds, saying why (and what it would have said)."""
    stable = _labels(20_000, 10_000, 9000)
    held = evaluate(DROP, _ev(stable, _labels(4000, 800, correct)), alpha=ALPHA)
    assert held.verdict is INCONCLUSIVE and held.detail["label_rates_differ"] == "yes"
    reason = str(held.detail["reason"])
    assert reason.startswith("held: labels reach 50.0% of the stable's") and would in reason
    # Errors are not answers: the rate is of answered requests.
    errors = _labels(5000, 1000, 900) | {"errors": 3000}
    assert evaluate(DROP, _ev(stable, errors), alpha=ALPHA).detail["label_rates_differ"] == "no"
    # A floor on the candidate's own accuracy does not compare arms: not held.
    floor = Check(metric="accuracy", min=0.9, min_samples=100)
    assert evaluate(floor, _ev(stable, _labels(4000, 800, 780)), alpha=ALPHA).verdict is PASS


@given(
    n_s=st.integers(100, 200_000),
    n_c=st.integers(100, 200_000),
    rate=st.floats(0.01, 1.0),
    ratio=st.floats(0.85, 1.0),
)
def test_label_rates_within_a_fifth_of_each_other_never_differ(
    n_s: int, n_c: int, rate: float, ratio: float
) -> None:
    """A difference within ±20 % of the larger rate is never called a mismatch, however
    many requests show it (a sequential test of "equal" would hold forever on trifles)."""
    stable = _labels(n_s, round(n_s * rate), 0)
    candidate = _labels(n_c, round(n_c * rate * ratio), 0)
    result = evaluate(DROP, _ev(stable, candidate), alpha=ALPHA)
    assert result.detail["label_rates_differ"] == "no"


def test_accuracy_min_and_agreement_min_are_one_sample_from_below() -> None:
    floor = Check(metric="accuracy", min=0.9)
    assert _verdict(floor, _ev({}, {"labelled": 2000, "correct": 1700})) is FAIL
    assert _verdict(floor, _ev({}, {"labelled": 2000, "correct": 1850})) is PASS
    assert _verdict(floor, _ev({}, {"labelled": 100, "correct": 10})) is INCONCLUSIVE
    agree = Check(metric="agreement", min=0.95)
    result = evaluate(agree, _ev({}, {"compared": 3000, "agreed": 2700}), alpha=ALPHA)
    assert result.verdict is FAIL and result.value == pytest.approx(0.9)
    assert float(result.detail["ci_upper"] or 1) < 0.95
    assert _verdict(agree, _ev({}, {"compared": 3000, "agreed": 2900})) is PASS


# --- drift and srm ------------------------------------------------------------------------


def test_drift_psi_and_ks() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(3000, 3))
    calm, moved = rng.normal(size=(800, 3)), rng.normal(size=(800, 3))
    moved[:, 1] += 1.0
    psi_check = Check(metric="drift", on_fail="hold")
    assert _verdict(psi_check, _ev({}, {}, reference=reference)) is INCONCLUSIVE
    assert _verdict(psi_check, _ev({}, {"inputs": calm[:499]}, reference=reference)) is INCONCLUSIVE
    assert _verdict(psi_check, _ev({}, {"inputs": calm}, reference=reference)) is PASS
    failed = evaluate(psi_check, _ev({}, {"inputs": moved}, reference=reference), alpha=ALPHA)
    assert failed.verdict is FAIL and failed.detail["worst_feature"] == 1
    assert failed.bound == 0.25 and failed.detail["psi_level"] == "alert"
    ks = Check(metric="drift", method="ks")
    assert _verdict(ks, _ev({}, {"inputs": calm}, reference=reference)) is PASS
    ks_failed = evaluate(ks, _ev({}, {"inputs": moved}, reference=reference), alpha=ALPHA)
    assert ks_failed.verdict is FAIL and ks_failed.detail["ks_feature"] == 1
    wrong = _ev({}, {"inputs": calm[:, :2]}, reference=reference)
    assert _verdict(psi_check, wrong) is INCONCLUSIVE


SRM = Check(metric="srm", on_fail="hold")


def test_srm_on_routed_counts() -> None:
    assert _verdict(SRM, _ev({"routed": 9000}, {"routed": 1000}, weight=10)) is PASS
    mismatch = evaluate(SRM, _ev({"routed": 9000}, {"routed": 800}, weight=10), alpha=ALPHA)
    assert mismatch.verdict is FAIL and float(mismatch.value or 1) < 0.001
    assert _verdict(SRM, _ev({"routed": 100}, {"routed": 0}, weight=5)) is INCONCLUSIVE
    assert _verdict(SRM, _ev({"routed": 500}, {"routed": 0}, weight=0)) is INCONCLUSIVE
    assert _verdict(SRM, _ev({"routed": 0}, {"routed": 500}, weight=100)) is INCONCLUSIVE
    strict = Check(metric="srm", min_samples=1000)
    assert _verdict(strict, _ev({"routed": 9000}, {"routed": 800}, weight=10)) is INCONCLUSIVE


def test_srm_does_not_apply_to_a_shadow() -> None:
    spec = _spec(SRM, strategy="shadow", split="random", key=None)
    (result,) = evaluate_checks(spec, _ev({"routed": 9000}, {"routed": 0}, weight=0))
    assert result.verdict is INCONCLUSIVE


# --- alpha, ordering, audit detail -------------------------------------------------------


def test_alpha_is_split_over_the_sequential_checks() -> None:
    checks = (INCREASE, P99, DROP, SRM, Check(metric="drift"))
    spec = _spec(*checks)
    assert check_alpha(spec, INCREASE) == pytest.approx(0.05 / 3)
    strict = Check(metric="accuracy", min=0.9, confidence=0.999)
    assert check_alpha(_spec(INCREASE, strict), strict) == pytest.approx(0.001)
    ev = _ev({"requests": 20_000, "errors": 200}, {"requests": 2000, "errors": 21})
    results = evaluate_checks(spec, ev)
    assert [r.check for r in results] == list(checks)
    assert results[0].detail["alpha"] == pytest.approx(0.05 / 3)
    for r in results:
        json.dumps(r.to_json())  # the audit log must be able to carry it


@given(
    st.integers(0, 400),
    st.integers(0, 3000),
    st.integers(0, 400),
    st.integers(0, 3000),
    st.sampled_from([0.0, 0.005, 0.02]),
)
def test_verdicts_follow_the_documented_rule(
    xs: int, extra_s: int, xc: int, extra_c: int, margin: float
) -> None:
    check = Check(metric="error_rate", max_increase_vs_stable=margin, test="msprt")
    ns, nc = xs + extra_s, xc + extra_c
    result = evaluate(
        check, _ev({"requests": ns, "errors": xs}, {"requests": nc, "errors": xc}), alpha=ALPHA
    )
    enough = min(ns, nc) >= check.min_samples
    lower, upper = float(result.detail["ci_lower"] or 0), float(result.detail["ci_upper"] or 0)
    if result.verdict is FAIL:  # harm shown above fail_margin (0 by default)
        assert enough and xc >= MIN_EVENTS and lower > 0.0
    elif result.verdict is PASS:  # harm beyond the practical margin ruled out
        assert enough and upper <= margin
    else:
        assert not enough or (upper > margin and not (lower > 0.0 and xc >= MIN_EVENTS))
