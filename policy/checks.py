"""A rollout's checks against its evidence: one pass / fail / inconclusive verdict each.

Pure functions of (check, evidence); the statistics live in policy/sequential.py,
policy/srm.py and policy/drift.py. Semantics, per metric:

- Alpha. evaluate_checks splits spec.alpha over the sequential checks (error_rate,
  latency_pNN, accuracy, agreement) by Bonferroni; a check that sets a `confidence`
  asking for more gets 1 − confidence instead (an unset one caps nothing). Each
  sequential check is an always-valid one-sided test in the direction of harm, so the
  chance that any of them ever FAILs a candidate that meets every bound stays ≤
  spec.alpha however often the checks run.
- INCONCLUSIVE while an arm has fewer than `min_samples` observations (requests, labelled
  rows, compared rows or requests since the latency threshold; both arms for
  comparisons), and whenever the evidence does not decide yet.
- FAIL only when the whole confidence sequence lies beyond the bound *and* the candidate
  shows at least 5 harmful events (errors, slow requests, wrong or disagreeing answers;
  3 for the conditional test, which is exact at any count: MIN_CONDITIONAL_EVENTS).
- PASS is never a point estimate. With pass_when bound (the default) the other one-sided
  sequence, at the same alpha, must lie within the bound: the candidate's upper bound
  ≤ max, lower bound ≥ min, the harm's upper bound ≤ the practical margin. With
  pass_when no_fail, PASS once min_samples are in and the check does not FAIL (size
  min_samples from the FAIL test's power). Comparisons with stable FAIL at fail_margin
  (default 0) and PASS at the practical margin: a candidate is rolled back on any harm
  shown and promoted only when harm beyond the margin is ruled out.
  error_rate  max: candidate's lower bound > max (one-sample). max_increase_vs_stable,
              test conditional (the default): FAIL when the conditional e-process
              (policy/conditional.py) shows the candidate's error rate above the stable's
              (rate ratio > 1), from which arm each key's first error landed on given
              the weight it was routed at (a request without a key is its own key):
              exact under weights that change, base rates that drift in both arms and
              users of any activity and error-proneness, and at any sample size
              (min_samples gates PASS only). PASS when, counted per request, at alpha/4
              each the stable's rate is below its upper bound u and the ratio below
              1 + margin / u, or at alpha/2 the candidate's own upper bound is within
              the margin. ci_lower / ci_upper bound the ratio FAIL rests on. test
              msprt: the two-sample mixture SPRT on cumulative counts, lower bound of
              candidate − stable > fail_margin (an absolute fail_margin above 0 picks
              it by default). 0.005 (half a point) is a usual practical margin: it
              ignores differences nobody would hold a rollout for.
  latency_pNN the engine freezes a threshold T (latency_threshold below) on both variants
              and counts requests slower than T since then. Latency is about answers:
              a request the model failed counts in error_rate only (how fast a version
              fails says nothing of how fast it answers), a timeout counts as slow
              (proxy/windows.py Outcome); T and the window's percentiles leave the
              failures out too. max_ratio_to_stable, test
              conditional (the default): T = stable's window pNN, and "slower than T" is
              a bad event tested like errors: FAIL when the candidate is shown slower
              than T more often than the stable (more than 1 + fail_margin times as
              often), PASS when it is shown less than max_ratio_to_stable times as often.
              Valid whatever T is. test msprt (and max): T = ratio × stable's pNN (or
              max), FAIL when the lower bound of the candidate's P(latency > T) exceeds
              1 − NN/100 (one-sample; valid only when T ≥ the true pNN). The windows'
              percentiles and their ratio are reported, not tested: a windowed percentile
              looked at repeatedly is not.
              Like for like: with T the engine freezes R, the stable's median request
              size in rows (latency_rows below); T comes from the stable's requests of
              at most R rows and only such requests are counted on either variant, so
              a client sending huge batches to one variant can neither make it look
              slow nor hide that it is.
  accuracy    max_drop_vs_stable: lower bound of stable − candidate (correct/labelled) >
              fail_margin; min: candidate's upper bound < min. Labels are counted per
              row. Label rates (labelled / answered requests) per variant are reported;
              when the always-valid two-sided interval of their difference lies beyond
              ±20 % of the larger rate, labels reach one arm more than the other and
              accuracy on them could be biased: the comparison with stable then holds
              (INCONCLUSIVE, label_rates_differ yes, with the reason) instead of passing
              or failing, until the rates even out (delayed labels catching up after a
              weight step). A `min` check, on the candidate's labels alone, is not held.
  agreement   (shadow) min: upper bound of agreed/compared < min, every row of a batch
              compared.
  drift       not sequential: PSI (default) of the worst feature > threshold (0.25), or
              with method ks a Bonferroni-adjusted KS p < alpha and statistic >
              threshold (default 0.1); needs ≥ 500 rows of reference and live inputs.
              Use on_fail hold or alert, not rollback: drift says the inputs moved, not
              that the candidate is worse.
  srm         anytime-valid Dirichlet-multinomial test (Lindon & Malek 2022) of routed
              units against candidate_weight (units: keys the first time each is routed
              since the split changed, and requests without a key, as the gateway's
              windows count them; requests when evidence has no units): FAIL at
              p < 0.001 with ≥ 8 expected per
              arm (or min_samples, when set); Pearson's p is reported beside it. Not
              applicable at weight 0 or 100 or to shadows. The p-value is the
              running minimum over the looks at this split (Evidence.srm_pvalue_before,
              persisted in the rollout's state), so a mismatch once shown stays shown.
              On SRM hold: every comparison between the variants is suspect.

Every result carries `detail`, the numbers that decided it, for the audit log: n per
arm, rates, ci_lower / ci_upper (the sequence's bounds, one of them trivial for a
one-sided test), pvalue (always-valid, against the bound), alpha and a reason.
"""

from __future__ import annotations

import math

import numpy as np

from rollguard.policy.conditional import Stratum, landing_test, ratio_bounds
from rollguard.policy.drift import DRIFT_MIN_ROWS, PSI_ALERT, PSI_WARN, drift_report
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import LATENCY_TAIL_ROWS, Check, Spec
from rollguard.policy.sequential import (
    Bounds,
    Side,
    difference_sequence,
    rate_sequence,
    stratified_difference_sequence,
)
from rollguard.policy.srm import SRM_MIN_PER_ARM, SRM_PVALUE, sequential_srm_pvalue, srm_pvalue
from rollguard.policy.verdict import CheckResult, Verdict

__all__ = [
    "MIN_CONDITIONAL_EVENTS",
    "MIN_EVENTS",
    "check_alpha",
    "evaluate",
    "evaluate_check",
    "evaluate_checks",
    "latency_rows",
    "latency_threshold",
]

MIN_EVENTS = 5
MIN_CONDITIONAL_EVENTS = 3
"""The conditional test FAILs from 3 of the candidate's bad events, not MIN_EVENTS (5).
MIN_EVENTS guards the normal approximation of the mixture SPRT; the conditional e-process
is exact at any count (no approximation to guard), and with HARM_GRID it cannot reject on
fewer than 3 events at weights of 1 % and up anyway. A hard failure (0 % → 5 % at a 5 %
weight) is then caught at the 3rd error instead of the 5th: p90 about 110 candidate
requests instead of 160."""
KS_MIN_STATISTIC = 0.1
_LABEL_RATE_TOLERANCE = 0.2  # label rates within 20 % of each other are "the same"
Detail = dict[str, float | int | str | None]


def _sequential(check: Check) -> bool:
    return check.metric in ("error_rate", "accuracy", "agreement") or check.percentile is not None


def check_alpha(spec: Spec, check: Check) -> float:
    """The alpha one check runs at: spec.alpha / (number of sequential checks), or less
    when the check sets a `confidence` of its own (the default 0.95 caps nothing: a
    spec.alpha above 0.05 is the policy's word)."""
    k = max(1, sum(_sequential(c) for c in spec.checks))
    share = spec.alpha / k
    if "confidence" not in check.model_fields_set:
        return share
    return min(share, 1.0 - check.confidence)


def evaluate_checks(spec: Spec, evidence: Evidence) -> list[CheckResult]:
    """Every check of the rollout, in order, at its Bonferroni share of spec.alpha."""
    return [evaluate_check(spec, check, evidence) for check in spec.checks]


def evaluate_check(spec: Spec, check: Check, evidence: Evidence) -> CheckResult:
    """One of the rollout's checks, at its Bonferroni share of spec.alpha."""
    if check.metric == "srm" and spec.strategy == "shadow":
        why = "a shadow mirrors all traffic; there is no split to check"
        return CheckResult(check, Verdict.INCONCLUSIVE, detail={"reason": why})
    return evaluate(check, evidence, alpha=check_alpha(spec, check))


def evaluate(check: Check, evidence: Evidence, *, alpha: float) -> CheckResult:
    """One check at the given alpha (see the module docstring for the semantics)."""
    if check.metric == "error_rate":
        return _error_rate(check, evidence, alpha)
    if check.percentile is not None:
        return _latency(check, evidence, alpha)
    if check.metric == "accuracy":
        return _accuracy(check, evidence, alpha)
    if check.metric == "agreement":
        return _agreement(check, evidence, alpha)
    if check.metric == "drift":
        return _drift(check, evidence, alpha)
    if check.metric == "srm":
        return _srm(check, evidence)
    raise ValueError(f"unknown metric {check.metric!r}")


def latency_threshold(check: Check, stable: VariantEvidence) -> float | None:
    """The threshold T (seconds) to freeze for a latency check, or None if not yet known.

    T = max for an absolute bound. For max_ratio_to_stable, T = stable's window pNN with
    the conditional test (the default; any T gives a valid two-sample test, the
    stable's own pNN gives it the most events), T = ratio × that pNN with test msprt,
    once stable has min_samples requests and its window holds enough rows for the
    pNN to rest on at least 10 slower requests (1000 for p99; a p99.9 needs a window of
    10000): a p99 from 200 rows is so noisy that a healthy candidate would be judged
    against a threshold set too low.

    The test is always-valid given T, but T carries the noise of one window's pNN, so
    the ratio is a tolerance to set with room: in load_tests/policy_simulation.py a
    candidate exactly 1.2× slower fails a 1.2 ratio in about 29 % of runs, an identical
    one fails a 1.1 ratio in under 1 %.
    """
    q = check.percentile
    if q is None:
        raise ValueError(f"{check.metric!r} is not a latency check")
    if check.max is not None:
        return check.max
    assert check.max_ratio_to_stable is not None  # the schema requires one of the two
    needed = max(check.min_samples, math.ceil(LATENCY_TAIL_ROWS / (1.0 - q / 100.0) - 1e-9))
    latencies = stable.latencies_up_to(latency_rows(stable))
    if stable.requests < check.min_samples or latencies.size < needed:
        return None
    ratio = check.max_ratio_to_stable if check.comparison_test == "msprt" else 1.0
    return ratio * float(np.percentile(latencies, q))


def latency_rows(stable: VariantEvidence) -> int:
    """R, the largest request (in rows) a latency check counts: the median batch size of
    the stable's recent window (1 before it has any), frozen together with T.

    Latency grows with a request's rows, so a request is only comparable with requests
    of about its size. Counting requests up to the stable's median keeps both variants
    to the sizes most of the stable's traffic has, and moving R takes more than half of
    the stable's traffic."""
    if stable.rows.size == 0:
        return 1
    return max(1, math.ceil(float(np.median(stable.rows))))


def _verdict(
    check: Check,
    enough: bool,
    crossed: bool,
    events: int,
    within: bool,
    min_events: int = MIN_EVENTS,
) -> Verdict:
    """`within`: the always-valid bound of the harm is inside the bound (pass_when bound)."""
    if not enough:
        return Verdict.INCONCLUSIVE
    if crossed and events >= min_events:
        return Verdict.FAIL
    if check.pass_when == "no_fail" or within:
        return Verdict.PASS
    return Verdict.INCONCLUSIVE


def _reason(check: Check, verdict: Verdict, enough: bool, need: str) -> str:
    if not enough:
        return f"too few samples: {need}"
    if verdict is Verdict.FAIL:
        return "the confidence sequence lies beyond the bound"
    if verdict is Verdict.PASS and check.pass_when == "no_fail":
        return "enough samples and no failure (pass_when: no_fail)"
    if verdict is Verdict.PASS:
        return "the confidence sequence lies within the bound"
    return "the confidence sequence still reaches beyond the bound: not decided yet"


def _bounds_detail(b: Bounds, alpha: float) -> Detail:
    return {"ci_lower": b.lower, "ci_upper": b.upper, "pvalue": b.pvalue, "alpha": alpha}


def _one_sample(
    check: Check, events: int, n: int, limit: float, alpha: float, *, good: bool, unit: str
) -> CheckResult:
    """The candidate's rate events/n held to `limit`: at least it if the events are
    `good` (correct, agreed), at most it otherwise (errors, slow requests)."""
    # Two one-sided sequences at alpha each: one shows harm (FAIL), the other its absence.
    fail_side: Side = "upper" if good else "lower"
    pass_side: Side = "lower" if good else "upper"
    b = rate_sequence(events, n, alpha, side=fail_side, null=limit)
    shown = rate_sequence(events, n, alpha, side=pass_side, null=limit)
    harmful = n - events if good else events
    crossed = b.upper < limit if good else b.lower > limit
    within = shown.lower >= limit if good else shown.upper <= limit
    enough = n >= check.min_samples
    verdict = _verdict(check, enough, crossed, harmful, within)
    need = f"candidate has {n} {unit}, needs {check.min_samples}"
    detail: Detail = {"n_candidate": n, "events_candidate": events, "harmful_events": harmful}
    detail |= _bounds_detail(b, alpha)
    detail |= {"ci_lower": shown.lower} if good else {"ci_upper": shown.upper}
    detail |= {"pass_pvalue": shown.pvalue, "reason": _reason(check, verdict, enough, need)}
    return CheckResult(check, verdict, b.estimate if n else None, limit, detail)


def _two_sample(
    check: Check,
    stable: tuple[int, int],
    candidate: tuple[int, int],
    margin: float,
    alpha: float,
    *,
    good: bool,
    unit: str,
    strata: list[tuple[int, int, int, int]] | None = None,
) -> CheckResult:
    """Candidate's rate worse than stable's by more than `margin` (events/n pairs).

    `strata`: the same counts per weight step, (stable events, n, candidate events, n)
    each; the harm is then compared within steps and combined by information
    (sequential.stratified_difference_sequence), so a rate moving in both arms while the
    weights ramp is not taken for harm (Simpson).

    FAIL when the lower bound of the harm exceeds fail_margin (default 0: any harm shown
    is harm); PASS when its upper bound is within `margin`, the practical margin (or,
    with pass_when no_fail, once min_samples are in without a FAIL). Each bound is a
    one-sided sequence at `alpha`, so a harm above `margin` is promoted with chance ≤ alpha
    however often it is looked at, and a candidate no worse is rolled back with ≤ alpha."""
    (xs, ns), (xc, nc) = stable, candidate
    fail_at = check.fail_margin if check.fail_margin is not None else 0.0
    # harm = stable − candidate for good events (correct), candidate − stable otherwise
    a, b_ = ((xc, nc), (xs, ns)) if good else ((xs, ns), (xc, nc))
    if strata is not None and len(strata) > 1:
        rows = [(c, m, s, n) if good else (s, n, c, m) for s, n, c, m in strata]
        b = stratified_difference_sequence(rows, alpha, side="lower", null=fail_at)
        shown = stratified_difference_sequence(rows, alpha, side="upper", null=margin)
    else:
        b = difference_sequence(*a, *b_, alpha, side="lower", null=fail_at)
        shown = difference_sequence(*a, *b_, alpha, side="upper", null=margin)
    harmful = nc - xc if good else xc
    enough = min(ns, nc) >= check.min_samples
    verdict = _verdict(check, enough, b.lower > fail_at, harmful, shown.upper <= margin)
    need = f"stable has {ns} and candidate {nc} {unit}, each needs {check.min_samples}"
    detail: Detail = {
        "n_stable": ns,
        "n_candidate": nc,
        "rate_stable": xs / ns if ns else None,
        "rate_candidate": xc / nc if nc else None,
        "harm": b.estimate,
        "harmful_events": harmful,
        "fail_margin": fail_at,
        "strata": len(strata) if strata is not None else 1,
    }
    detail |= _bounds_detail(b, alpha) | {"ci_upper": shown.upper, "pass_pvalue": shown.pvalue}
    detail["reason"] = _reason(check, verdict, enough, need)
    return CheckResult(check, verdict, b.estimate if ns and nc else None, margin, detail)


def _strata(ev: Evidence, *, latency: bool, units: bool = False) -> list[Stratum]:
    """Both arms' (events, exposures) per configured weight: errors per request, or slow
    requests per request counted against the latency threshold, the share being the
    candidate's share of the requests. Evidence without strata (built by hand) is one
    stratum of its totals.

    `units`: at a split weight w (0 < w < 100), count each key's first bad event
    instead (a request without a key is its own key), at share w: a sticky split
    assigns keys, not requests, so under H0 the key behind a first bad event is on
    the candidate with probability exactly w whatever users there are (heavy ones,
    error-prone ones); their later events carry no information on the assignment."""
    s, c = ev.stable, ev.candidate
    if not s.strata or not c.strata:
        if latency:
            return [Stratum(s.over_threshold, s.since_threshold, c.over_threshold,
                            c.since_threshold)]  # fmt: skip
        return [Stratum(s.errors, s.requests, c.errors, c.requests)]
    x, n, u = (4, 3, 6) if latency else (2, 1, 5)
    rows: dict[float, list[int]] = {}
    for w, *counts in s.strata:
        rows.setdefault(w, [0] * 6)[:3] = (counts[x - 1], counts[n - 1], counts[u - 1])
    for w, *counts in c.strata:
        rows.setdefault(w, [0] * 6)[3:] = (counts[x - 1], counts[n - 1], counts[u - 1])
    out = []
    for w, (xs, ns, us, xc, nc, uc) in sorted(rows.items()):
        if units and 0 < w < 100:
            out.append(Stratum(us, round(100 * (100 - w)), uc, round(100 * w)))
        else:
            out.append(Stratum(xs, ns, xc, nc))
    return out


def _conditional(
    check: Check, ev: Evidence, alpha: float, *, latency: bool, unit: str
) -> CheckResult:
    """A comparison with stable by where the bad events landed (policy/conditional.py).

    FAIL when the test of "candidate's bad-event rate ≤ r_fail × stable's" rejects at
    alpha (r_fail = 1, or 1 + fail_margin for latency) and the candidate shows at least
    MIN_CONDITIONAL_EVENTS bad events, at any sample size. PASS (pass_when bound, after min_samples)
    when harm beyond the tolerance is ruled out. Latency: the ratio is shown below
    max_ratio_to_stable, or the candidate's pNN below max_ratio_to_stable × T (its share
    of requests slower than that below 1 − NN/100). Errors: at alpha/4 each the stable's
    rate is below its upper bound u and the ratio below 1 + margin / u (so candidate −
    stable < margin), or at alpha/2 the candidate's own rate is below the margin."""
    strata = _strata(ev, latency=latency)
    units = _strata(ev, latency=latency, units=True)
    r_fail = 1.0 + (check.fail_margin or 0.0) if latency else 1.0
    fail = landing_test(units, r_fail, harm=True)
    pooled = landing_test(strata, r_fail, harm=True)  # totals and the ratio, for reports
    xs, ns, xc, nc = (
        pooled.events_stable,
        pooled.exposures_stable,
        pooled.events_candidate,
        pooled.exposures_candidate,
    )
    enough = min(ns, nc) >= check.min_samples
    crossed = fail.rejects(alpha)
    if latency:
        assert check.max_ratio_to_stable is not None and check.percentile is not None
        r_pass: float | None = check.max_ratio_to_stable
        safe = landing_test(strata, check.max_ratio_to_stable, harm=False)
        within = safe.rejects(alpha)
        tolerance = check.max_ratio_to_stable
        c = ev.candidate
        if not within and c.latency_tolerance is not None and c.since_threshold:
            # the candidate's pNN shown below ratio × T: its share of requests slower
            # than the tolerance below 1 − NN/100 (one-sided, at alpha)
            allowed = 1.0 - check.percentile / 100.0
            own = rate_sequence(c.over_tolerance, c.since_threshold, alpha, side="upper")
            within = own.upper <= allowed
    else:
        tolerance = check.max_increase_vs_stable or 0.0
        stable_upper = rate_sequence(xs, ns, alpha / 4, side="upper").upper if ns else 1.0
        r_pass = 1.0 + tolerance / stable_upper if stable_upper > 0 else None
        safe = landing_test(strata, r_pass or 1.0, harm=False)
        within = r_pass is not None and safe.rejects(alpha / 4)
        if not within and nc:
            own = rate_sequence(xc, nc, alpha / 2, side="upper")
            within = own.upper <= tolerance
    # The e-process is exact at every sample size: min_samples gates PASS, not FAIL.
    failed = crossed and fail.events_candidate >= MIN_CONDITIONAL_EVENTS
    verdict = _verdict(
        check, enough or failed, crossed, fail.events_candidate, within, MIN_CONDITIONAL_EVENTS
    )
    enough = enough or failed
    need = f"stable has {ns} and candidate {nc} {unit}, each needs {check.min_samples}"
    lower, upper = ratio_bounds(units, alpha)
    rate_s, rate_c = (xs / ns if ns else None), (xc / nc if nc else None)
    detail: Detail = {
        "test": "conditional",
        "scale": "ratio of keys' first bad events (the rate ratio when keys are few-request)",
        "n_stable": ns,
        "n_candidate": nc,
        "events_stable": xs,
        "events_candidate": xc,
        "rate_stable": rate_s,
        "rate_candidate": rate_c,
        "ratio": pooled.ratio,
        "harmful_events": xc,
        "units_stable": fail.events_stable,
        "units_candidate": fail.events_candidate,
        "strata": len(strata),
        "fail_ratio": r_fail,
        "pass_ratio": r_pass,
        "log_evalue": fail.log_evalue,
        "ci_lower": lower,
        "ci_upper": upper,
        "pvalue": fail.pvalue,
        "pass_pvalue": safe.pvalue,
        "alpha": alpha,
        "reason": _reason(check, verdict, enough, need),
    }
    if latency:
        return CheckResult(check, verdict, pooled.ratio, tolerance, detail)
    harm = rate_c - rate_s if rate_c is not None and rate_s is not None else None
    detail["harm"] = harm
    return CheckResult(check, verdict, harm, tolerance, detail)


def _error_rate(check: Check, ev: Evidence, alpha: float) -> CheckResult:
    s, c = ev.stable, ev.candidate
    if check.comparison_test == "conditional":
        return _conditional(check, ev, alpha, latency=False, unit="requests")
    if check.max is not None:
        return _one_sample(
            check, c.errors, c.requests, check.max, alpha, good=False, unit="requests"
        )
    margin = check.max_increase_vs_stable
    assert margin is not None  # the schema requires max or max_increase_vs_stable
    pairs = (s.errors, s.requests), (c.errors, c.requests)
    return _two_sample(check, *pairs, margin, alpha, good=False, unit="requests")


def _latency(check: Check, ev: Evidence, alpha: float) -> CheckResult:
    q = check.percentile
    assert q is not None
    s, c = ev.stable, ev.candidate
    rows = c.latency_rows
    p_s, p_c = s.percentile(q, rows), c.percentile(q, rows)
    window: Detail = {
        "stable_window_pnn": p_s,
        "candidate_window_pnn": p_c,
        "window_ratio": p_c / p_s if p_s and p_c is not None else None,
        "threshold_s": c.latency_threshold,
        "rows_counted_up_to": rows,
        "stable_exceedance": s.over_threshold / s.since_threshold if s.since_threshold else None,
    }
    if c.latency_threshold is None:
        detail = window | {"reason": "the latency threshold is not frozen yet"}
        return CheckResult(check, Verdict.INCONCLUSIVE, None, 1.0 - q / 100.0, detail)
    allowed = 1.0 - q / 100.0
    unit = "requests since the latency threshold was set"
    if check.comparison_test == "conditional":
        result = _conditional(check, ev, alpha, latency=True, unit=unit)
        return CheckResult(
            check, result.verdict, result.value, result.bound, window | result.detail
        )
    result = _one_sample(
        check, c.over_threshold, c.since_threshold, allowed, alpha, good=False, unit=unit
    )
    return CheckResult(check, result.verdict, result.value, result.bound, window | result.detail)


def _accuracy(check: Check, ev: Evidence, alpha: float) -> CheckResult:
    s, c = ev.stable, ev.candidate
    if check.min is not None:
        result = _one_sample(
            check, c.correct, c.labelled, check.min, alpha, good=True, unit="labels"
        )
    else:
        margin = check.max_drop_vs_stable
        assert margin is not None  # the schema requires min or max_drop_vs_stable
        pairs = (s.correct, s.labelled), (c.correct, c.labelled)
        strata = _label_strata(s, c)
        result = _two_sample(check, *pairs, margin, alpha, good=True, unit="labels", strata=strata)
    labels, differ = _label_rates(s, c, alpha)
    if differ and check.min is None and result.verdict is not Verdict.INCONCLUSIVE:
        why = (
            f"held: labels reach {_percent(labels['label_rate_stable'])} of the stable's "
            f"answered requests and {_percent(labels['label_rate_candidate'])} of the "
            "candidate's, beyond chance; accuracy on them could be biased, so the check "
            f"waits for the label rates to even out (it would {result.verdict.value})"
        )
        detail = result.detail | labels | {"reason": why}
        return CheckResult(check, Verdict.INCONCLUSIVE, result.value, result.bound, detail)
    return CheckResult(check, result.verdict, result.value, result.bound, result.detail | labels)


def _label_strata(s: VariantEvidence, c: VariantEvidence) -> list[tuple[int, int, int, int]] | None:
    """Both arms' (correct, labelled) per weight their requests were routed at, or None
    when the per-weight counts do not account for every label (labels of a process or
    a summary that did not count them per weight): then the totals are compared."""
    if not s.label_strata or not c.label_strata:
        return None
    rows: dict[float, list[int]] = {}
    for i, v in ((0, s), (2, c)):
        for w, n, ok in v.label_strata:
            rows.setdefault(w, [0, 0, 0, 0])[i : i + 2] = (ok, n)
        if sum(n for _, n, _ in v.label_strata) != v.labelled:
            return None
        if sum(ok for _, _, ok in v.label_strata) != v.correct:
            return None
    return [(a, b, x, y) for _, (a, b, x, y) in sorted(rows.items())]


def _label_rates(s: VariantEvidence, c: VariantEvidence, alpha: float) -> tuple[Detail, bool]:
    """Each arm's label rate (requests labelled / requests answered) and whether they
    differ: the always-valid two-sided interval of candidate − stable lies beyond
    ±_LABEL_RATE_TOLERANCE × the larger rate."""
    answered_s, answered_c = s.requests - s.errors, c.requests - c.errors
    labelled_s = min(s.labelled_requests, answered_s)
    labelled_c = min(c.labelled_requests, answered_c)
    rate_s = labelled_s / answered_s if answered_s > 0 else None
    rate_c = labelled_c / answered_c if answered_c > 0 else None
    differ = False
    if rate_s is not None and rate_c is not None and labelled_s + labelled_c:
        b = difference_sequence(labelled_s, answered_s, labelled_c, answered_c, alpha)
        tolerance = _LABEL_RATE_TOLERANCE * max(rate_s, rate_c)
        differ = b.lower > tolerance or b.upper < -tolerance
    detail: Detail = {
        "label_rate_stable": rate_s,
        "label_rate_candidate": rate_c,
        "label_rates_differ": "yes" if differ else "no",
    }
    return detail, differ


def _percent(rate: float | int | str | None) -> str:
    return f"{float(rate):.1%}" if isinstance(rate, float | int) else "none"


def _agreement(check: Check, ev: Evidence, alpha: float) -> CheckResult:
    c = ev.candidate
    assert check.min is not None  # the schema allows only min
    unit = "compared rows"
    return _one_sample(check, c.agreed, c.compared, check.min, alpha, good=True, unit=unit)


def _drift(check: Check, ev: Evidence, alpha: float) -> CheckResult:
    ref, cur = ev.reference, ev.candidate.inputs
    method = check.method or "psi"
    threshold = check.threshold or (PSI_ALERT if method == "psi" else KS_MIN_STATISTIC)
    rows = max(DRIFT_MIN_ROWS, check.min_samples)
    n_ref = 0 if ref is None else len(ref)
    n_cur = 0 if cur is None else len(cur)
    detail: Detail = {"reference_rows": n_ref, "candidate_rows": n_cur, "method": method}
    if ref is None or cur is None or min(n_ref, n_cur) < rows:
        detail["reason"] = f"too few samples: drift needs {rows} reference and live rows"
        return CheckResult(check, Verdict.INCONCLUSIVE, None, threshold, detail)
    if ref.reshape(n_ref, -1).shape[1] != cur.reshape(n_cur, -1).shape[1]:
        detail["reason"] = f"reference shape {ref.shape} does not match inputs {cur.shape}"
        return CheckResult(check, Verdict.INCONCLUSIVE, None, threshold, detail)
    report = drift_report(ref.reshape(n_ref, -1), cur.reshape(n_cur, -1))
    worst, worst_ks = report.worst, report.worst_ks
    detail |= {
        "features": len(report.features),
        "worst_feature": worst.feature,
        "worst_psi": worst.psi,
        "psi_level": "alert" if worst.psi > PSI_ALERT else "warn" if worst.psi > PSI_WARN else "ok",
        "worst_ks_feature": worst_ks.feature,
        "worst_ks_statistic": worst_ks.ks_statistic,
        "worst_ks_pvalue_adjusted": worst_ks.ks_pvalue_adjusted,
        "alpha": alpha,
    }
    if method == "psi":
        value, failed = worst.psi, worst.psi > threshold
    else:
        drifted = [
            f
            for f in report.features
            if f.ks_pvalue_adjusted < alpha and f.ks_statistic > threshold
        ]
        pick = max(drifted, key=lambda f: f.ks_statistic) if drifted else worst_ks
        value, failed = pick.ks_statistic, bool(drifted)
        detail["ks_feature"] = pick.feature
    detail["reason"] = f"{method} of the worst feature {'above' if failed else 'within'} bound"
    return CheckResult(check, Verdict.FAIL if failed else Verdict.PASS, value, threshold, detail)


def _srm(check: Check, ev: Evidence) -> CheckResult:
    w = ev.candidate_weight
    s, c = ev.stable, ev.candidate
    detail: Detail = {"routed_stable": s.routed, "routed_candidate": c.routed, "weight": w}
    # The randomisation unit: a sticky split assigns keys, not requests (heavy users
    # would make healthy request counts "mismatch"); counted units when the windows have them.
    if s.routed_units is not None and c.routed_units is not None:
        counts = [s.routed_units, c.routed_units]
        detail |= {
            "unit": "first-seen keys",
            "units_stable": counts[0],
            "units_candidate": counts[1],
        }
    else:
        counts = [s.routed, c.routed]
        detail["unit"] = "requests"
    if not 0 < w < 100:
        detail["reason"] = f"no split to check at candidate weight {w}"
        return CheckResult(check, Verdict.INCONCLUSIVE, None, SRM_PVALUE, detail)
    per_arm = check.min_samples if "min_samples" in check.model_fields_set else SRM_MIN_PER_ARM
    total = sum(counts)
    detail["observed_share"] = counts[1] / total if total else None
    before = ev.srm_pvalue_before
    enough = total * min(w, 100 - w) / 100 >= per_arm
    # The always-valid p-value is the running minimum over every look at this split: a
    # mismatch once shown stays shown when the counts even out (or a restart zeroed them).
    now = sequential_srm_pvalue(counts, [100 - w, w]) if enough else 1.0
    p = min(now, before)
    if not enough and p >= SRM_PVALUE:
        detail["reason"] = f"too few samples: needs {per_arm} expected per arm"
        detail["pvalue"] = p
        return CheckResult(check, Verdict.INCONCLUSIVE, None, SRM_PVALUE, detail)
    failed = p < SRM_PVALUE
    detail |= {
        "pvalue": p,
        "pvalue_now": now,
        "pearson_pvalue": srm_pvalue(counts, [100 - w, w]),
        "reason": "split mismatch" if failed else "split as configured",
    }
    return CheckResult(check, Verdict.FAIL if failed else Verdict.PASS, p, SRM_PVALUE, detail)
