"""Candidate requests to FAIL, and A/A false FAILs under drift, for the comparison tests.

Run `python load_tests/conditional_power.py [--replicates N] [--only NAME ...]`. Each
replicate streams requests through a split whose candidate weight follows a schedule,
counts errors and slow requests per arm and per weight exactly as proxy/windows.py does,
and every `--every` requests hands that evidence to the real policy.checks.evaluate for
each test (`conditional`, the default, and `msprt`, the two-sample mixture SPRT /
one-sample latency test). Looks are screened with the tests' own statistic (the
conditional e-value, or the mSPRT bound) only to skip looks that cannot FAIL; every
FAIL counted is evaluate()'s verdict.

Scenarios (latencies lognormal, median 50 ms, σ 0.5; p99 check frozen from the stable's
first 2,000 requests):
- err_1to2_w5 / err_1to2_w25: errors 1 % → 2 %, weight fixed at 5 % or 25 %;
- latency_+20%_w5: candidate 1.2× slower, weight 5 %;
- hard_0to5_w5: errors 0 % in stable, 5 % in the candidate, weight 5 %;
- aa_drift_ramp: A/A, errors drifting 0.5 % → 2 % and latencies ×1 → ×1.3 in both
  arms over the run while the weight ramps 5 → 25 → 50 %.
Reports the median and p90 candidate requests to FAIL, the share detected within the
horizon, and for A/A the false-FAIL rate with its upper 95 % Wilson bound.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollguard.policy.checks import MIN_EVENTS, evaluate
from rollguard.policy.conditional import Stratum, log_evalue
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Check
from rollguard.policy.verdict import Verdict

Test = Literal["conditional", "msprt"]
ALPHA = 0.05 / 3  # a policy's Bonferroni share with three sequential checks
MU, SIGMA = math.log(0.05), 0.5


@dataclass(frozen=True)
class Scenario:
    name: str
    weights: tuple[float, ...]  # equal-length segments over the horizon
    error: tuple[tuple[float, float], tuple[float, float]]  # (stable, cand) at start, end
    latency_scale: tuple[float, float] = (1.0, 1.0)  # candidate x, both arms x at the end
    horizon: int = 60_000
    metric: str = "error_rate"

    @property
    def aa(self) -> bool:
        (s0, c0), (s1, c1) = self.error
        return s0 == c0 and s1 == c1 and self.latency_scale[0] == 1.0


SCENARIOS = (
    Scenario("err_1to2_w5", (5.0,), ((0.01, 0.02), (0.01, 0.02)), horizon=120_000),
    Scenario("err_1to2_w25", (25.0,), ((0.01, 0.02), (0.01, 0.02)), horizon=30_000),
    Scenario("latency_+20%_w5", (5.0,), ((0.01, 0.01),) * 2, (1.2, 1.0), 80_000, "latency_p99"),
    Scenario("hard_0to5_w5", (5.0,), ((0.0, 0.05),) * 2, horizon=10_000),
    Scenario("aa_drift_ramp", (5.0, 25.0, 50.0), ((0.005, 0.005), (0.02, 0.02)), horizon=60_000),
    Scenario(
        "aa_drift_ramp_latency",
        (5.0, 25.0, 50.0),
        ((0.01, 0.01),) * 2,
        (1.0, 1.3),
        60_000,
        "latency_p99",
    ),
)


def _check(metric: str, test: Test) -> Check:
    if metric == "error_rate":
        return Check(metric="error_rate", max_increase_vs_stable=0.005, test=test)
    return Check(metric="latency_p99", max_ratio_to_stable=1.2, test=test)


def _stream(sc: Scenario, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    n = sc.horizon
    t = np.arange(n) / n
    seg = np.minimum((t * len(sc.weights)).astype(int), len(sc.weights) - 1)
    weight = np.asarray(sc.weights)[seg]
    cand = rng.random(n) < weight / 100.0
    (s0, c0), (s1, c1) = sc.error
    p = np.where(cand, c0 + (c1 - c0) * t, s0 + (s1 - s0) * t)
    err = rng.random(n) < p
    scale = np.where(cand, sc.latency_scale[0], 1.0) * (1.0 + (sc.latency_scale[1] - 1.0) * t)
    lat = np.exp(MU + SIGMA * rng.standard_normal(n)) * scale
    return weight, cand, err, lat


def _cumulative(
    arm: np.ndarray, weight: np.ndarray, err: np.ndarray, slow: np.ndarray, counted: np.ndarray
) -> dict[float, np.ndarray]:
    """Per weight, the running (requests, errors, since_threshold, over_threshold) of one arm."""
    out = {}
    for w in np.unique(weight):
        m = arm & (weight == w)
        cols = np.stack([m, m & err, m & counted, m & counted & slow], axis=1)
        out[float(w)] = np.cumsum(cols, axis=0)
    return out


def _variant(
    name: str, cum: dict[float, np.ndarray], end: int, threshold: float | None
) -> VariantEvidence:
    rows = [
        # independent requests: each is its own key, every bad event a unit
        (
            w,
            int(c[end - 1][0]),
            int(c[end - 1][1]),
            int(c[end - 1][2]),
            int(c[end - 1][3]),
            int(c[end - 1][1]),
            int(c[end - 1][3]),
        )
        for w, c in cum.items()
        if c[end - 1][0]
    ]
    return VariantEvidence(
        name,
        requests=sum(r[1] for r in rows),
        errors=sum(r[2] for r in rows),
        latency_threshold=threshold,
        since_threshold=sum(r[3] for r in rows),
        over_threshold=sum(r[4] for r in rows),
        strata=tuple(rows),
    )


def run_one(sc: Scenario, test: Test, rng: np.random.Generator, every: int) -> int | None:
    """Candidate requests at the first FAIL, or None if it never FAILs within the horizon."""
    weight, cand, err, lat = _stream(sc, rng)
    check = _check(sc.metric, test)
    threshold, start = None, 0
    if sc.metric != "error_rate":
        stable_idx = np.flatnonzero(~cand)
        start = int(stable_idx[1999]) + 1  # the stable's window holds 2,000 requests
        base = np.percentile(lat[stable_idx[:2000]], 99)
        threshold = float(base * (1.0 if test == "conditional" else 1.2))
    slow = lat > (threshold if threshold is not None else np.inf)
    counted = np.arange(sc.horizon) >= start
    cum_s = _cumulative(~cand, weight, err, slow, counted)
    cum_c = _cumulative(cand, weight, err, slow, counted)
    col = 1 if sc.metric == "error_rate" else 3
    for end in range(max(every, start + every), sc.horizon + 1, every):
        stable, candidate = (
            _variant("1", cum_s, end, threshold),
            _variant("2", cum_c, end, threshold),
        )
        if (candidate.errors if col == 1 else candidate.over_threshold) < MIN_EVENTS:
            continue
        ev = Evidence(stable, candidate, float(weight[end - 1]))
        if test == "conditional":  # screen: only an e-value past 1/alpha can FAIL
            strata = [
                Stratum(
                    int(cum_s[w][end - 1][col]),
                    int(cum_s[w][end - 1][col - 1 if col == 1 else 2]),
                    int(cum_c[w][end - 1][col]),
                    int(cum_c[w][end - 1][col - 1 if col == 1 else 2]),
                )
                for w in cum_s
            ]
            if log_evalue(strata, 1.0) < math.log(1 / ALPHA):
                continue
        if evaluate(check, ev, alpha=ALPHA).verdict is Verdict.FAIL:
            return candidate.requests
    return None


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + half) / (1 + z * z / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--every", type=int, default=200, help="requests between looks")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--tests", nargs="*", default=["conditional", "msprt"])
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    print(f"alpha per check {ALPHA:.4f}, look every {args.every} requests")
    for sc in SCENARIOS:
        if args.only and sc.name not in args.only:
            continue
        for name in args.tests:
            test: Test = "msprt" if name == "msprt" else "conditional"
            rng = np.random.default_rng(args.seed)
            found = [run_one(sc, test, rng, args.every) for _ in range(args.replicates)]
            hits = [f for f in found if f is not None]
            n = len(found)
            if sc.aa:
                print(
                    f"{sc.name:24s} {test:11s} false FAIL {len(hits)}/{n} "
                    f"(Wilson upper {wilson_upper(len(hits), n):.3f}, alpha {ALPHA:.4f})"
                )
            else:
                med = float(np.median(hits)) if hits else float("nan")
                p90 = float(np.percentile(hits, 90)) if hits else float("nan")
                print(
                    f"{sc.name:24s} {test:11s} detected {len(hits)}/{n}, candidate requests "
                    f"to FAIL median {med:.0f} p90 {p90:.0f}"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
