"""Which arm did each bad event land on? A test exact under changing weights and drift.

A bad event (an error, a request slower than the frozen latency threshold) that happens
while the candidate takes a share w of the traffic lands on the candidate with
probability

    p(r, w) = w·r / (w·r + 1 − w),   r = candidate's bad-event rate / stable's,

whatever the two rates are at that moment: a base rate that drifts in both arms cancels,
and so does a weight that changes (each event carries its own w). Under H0: r ≤ r0 the
arm of each event is a Bernoulli draw with the known, time-varying null p(r0, w), so the
likelihood ratio of p(r, w) against p(r0, w) for a fixed r > r0 is a nonnegative
supermartingale; a mixture of such ratios over a grid of r is one too, and by Ville's
inequality P(it ever reaches 1/α) ≤ α however often it is looked at (Lindon & Malek,
"Anytime-valid inference for multinomial count data", NeurIPS 2022, and the `savvi`
package's conditional tests; the same construction is the e-process of a Bernoulli
sequence with a known null in Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2023).

The product over events depends only on how many events landed on each arm at each
share, so the sufficient statistic is one row per stratum (share, candidate events,
stable events): it is what the windows count, what the rollout state carries across a
restart, and the order of events within a stratum does not matter.

What counts as an event, and its share (policy/checks.py builds the strata):
- With a sticky (hash) split the split randomises keys, not requests: a heavy or
  error-prone user's events all land on one arm, and counted one by one they make a
  healthy candidate look worse (10-28 % false FAILs with Zipf users of heterogeneous
  error rates, against 0 of 100 counted per key). FAIL therefore counts each key's
  first bad event (a request without a key is its own key) at the configured weight w:
  under H0 the key behind it is on the candidate with probability exactly w.
- Reports, PASS and the strata of weight 0 (mirrored copies, failover) count requests,
  at the candidate's realised share of the requests: given the exposures this is the
  classic conditional test of two Poisson rates (candidate events | all events ~
  Binomial(events, p(r, share))), made sequential by the mixture.

The other direction, H0: r ≥ r1 against r < r1, is the same construction with a grid
below r1; checks use it to show a candidate is *not* worse than a tolerance (PASS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HARM_GRID",
    "SAFE_GRID",
    "Landing",
    "Stratum",
    "landing_test",
    "log_evalue",
    "log_evalues",
    "ratio_bounds",
]

HARM_GRID = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 30.0, 1000.0)
"""Multiples of r0 mixed over to show harm, uniform prior. From 1.25 (a quarter worse,
found slowly) to 1000 (a candidate failing where stable never does: hard failures
cross 1/α after three or four events). The spread costs log(11) ≈ 2.4 nats of evidence
against knowing the effect in advance; a grid of 1.5 and 2 alone reached 1 % → 2 % errors
about 10 % sooner and missed +20 % latency more often (load_tests/conditional_power.py)."""

SAFE_GRID = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.35, 0.2, 0.05)
"""Multiples of r1 mixed over to show a candidate is below r1 (PASS): a healthy
candidate sits at r = 1, i.e. at 1/r1 of the tolerance, typically 0.5–0.9."""


@dataclass(frozen=True, slots=True)
class Stratum:
    """Bad events per arm among exposures taken at one configured weight."""

    stable_events: int
    stable_exposures: int
    candidate_events: int
    candidate_exposures: int

    @property
    def share(self) -> float | None:
        """The candidate's share of the exposures, None when one arm had none (no
        information: every event's arm is certain)."""
        total = self.stable_exposures + self.candidate_exposures
        if self.stable_exposures <= 0 or self.candidate_exposures <= 0:
            return None
        return self.candidate_exposures / total


def log_evalue(strata: Iterable[Stratum], r0: float, *, harm: bool = True) -> float:
    """log of the mixture e-value against H0: r ≤ r0 (harm) or r ≥ r0 (not harm).

    0 before any informative event; reaching log(1/α) rejects H0 at level α, at any look.
    """
    return log_evalues(strata, harm=harm)([r0])[0]


def log_evalues(
    strata: Iterable[Stratum], *, harm: bool = True
) -> Callable[[Sequence[float]], list[float]]:
    """`log_evalue(strata, r0, harm=harm)` for each of many r0 at once: the same
    arithmetic, element by element, in one pass of array operations, and what does not
    depend on r0 done once. `ratio_bounds` below bisects on r0 ~45 times a tick, on the
    event loop, and a call's cost is the array operations' overhead, not their size."""
    rows = [(s.share, s.candidate_events, s.stable_events) for s in strata]
    rows = [(w, c, s) for w, c, s in rows if w is not None and c + s > 0]
    if not rows:
        return _no_evidence
    arr = np.asarray(rows, dtype=np.float64)
    share, on_c, on_s = arr[:, 0], arr[:, 1], arr[:, 2]
    offset = np.log(share) - np.log1p(-share)  # logit(share): events' log-odds at r = 1
    grid = np.asarray(HARM_GRID if harm else SAFE_GRID, dtype=np.float64)
    log_grid = np.log(grid)[None, :, None]

    def at(nulls: Sequence[float]) -> list[float]:
        log_r0 = np.asarray([math.log(_checked_null(r0)) for r0 in nulls], dtype=np.float64)
        theta0 = offset[None, :] + log_r0[:, None]  # (R, S)
        theta = theta0[:, None, :] + log_grid  # (R, K, S)
        # log σ(z) = −log(1 + e^−z); log(1 − σ(z)) = log σ(−z) = −log(1 + e^z)
        on_candidate, on_stable = _log_sigmoids(theta)
        on_candidate0, on_stable0 = _log_sigmoids(theta0[:, None, :])
        log_lr = on_c * (on_candidate - on_candidate0) + on_s * (on_stable - on_stable0)
        per_alternative = log_lr.sum(axis=2)  # (R, K)
        # log of the mean of e^x over the grid, shifted by the largest term so that no e^x
        # overflows. Written out rather than scipy.special.logsumexp: the same arithmetic,
        # but scipy's array-API dispatch cost ~150 µs a call.
        top = per_alternative.max(axis=1)
        total = np.exp(per_alternative - top[:, None]).sum(axis=1)
        pairs = zip(top.tolist(), total.tolist(), strict=True)
        return [t + math.log(x / grid.size) for t, x in pairs]

    return at


def _checked_null(r0: float) -> float:
    if not (r0 > 0 and math.isfinite(r0)):
        raise ValueError(f"null ratio {r0!r} must be positive and finite")
    return r0


def _no_evidence(nulls: Sequence[float]) -> list[float]:
    return [0.0 for _ in map(_checked_null, nulls)]


def _log_sigmoids(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log σ(z) and log σ(−z), as −log(1 + e^−z) and −log(1 + e^z)."""
    return -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)


@dataclass(frozen=True, slots=True)
class Landing:
    """One look at the conditional test: the e-value against r ≤ r0 and what it rests on."""

    log_evalue: float
    events_candidate: int
    events_stable: int
    exposures_candidate: int
    exposures_stable: int
    ratio: float | None  # observed rate ratio (candidate / stable), pooled, for reports

    @property
    def pvalue(self) -> float:
        """The always-valid p-value 1/E (at most 1)."""
        return math.exp(-self.log_evalue) if self.log_evalue > 0 else 1.0

    def rejects(self, alpha: float) -> bool:
        return self.log_evalue >= math.log(1.0 / alpha)


def landing_test(strata: Sequence[Stratum], r0: float, *, harm: bool = True) -> Landing:
    """The conditional test of H0: r ≤ r0 (harm) or r ≥ r0 (not harm) on these strata."""
    xs = sum(s.stable_events for s in strata)
    ns = sum(s.stable_exposures for s in strata)
    xc = sum(s.candidate_events for s in strata)
    nc = sum(s.candidate_exposures for s in strata)
    ratio = (xc / nc) / (xs / ns) if nc and ns and xs else None
    return Landing(log_evalue(strata, r0, harm=harm), xc, xs, nc, ns, ratio)


def ratio_bounds(strata: Sequence[Stratum], alpha: float) -> tuple[float, float]:
    """The always-valid one-sided bounds (at alpha each) of the rate ratio: the ratios
    r0 the conditional tests do not reject, found by bisection on log r0 (20 halvings)."""
    target = math.log(1.0 / alpha)

    def edge(harm: bool) -> float:
        evalues = log_evalues(strata, harm=harm)
        lo, hi = math.log(1e-3), math.log(1e4)
        rejects_lo, rejects_hi = (e >= target for e in evalues([math.exp(lo), math.exp(hi)]))
        if harm and not rejects_lo:
            return 0.0
        if not harm and not rejects_hi:
            return math.inf
        if harm and rejects_hi:
            return math.exp(hi)
        if not harm and rejects_lo:
            return math.exp(lo)
        # harm: rejects below the edge; not harm: above it (to 0.002 %)
        for steps in _ROUNDS:
            lo, hi = _halve(evalues, target, harm, lo, hi, steps)
        return math.exp(lo if harm else hi)

    return edge(True), edge(False)


_ROUNDS = (4, 4, 4, 4, 4)  # 20 halvings: each round's steps from one call of the e-values


def _halve(
    evalues: Callable[[Sequence[float]], list[float]],
    target: float,
    harm: bool,
    lo: float,
    hi: float,
    steps: int,
) -> tuple[float, float]:
    """`steps` steps of the bisection, from one call of `evalues`: every midpoint they
    could test (a tree, node i's halves at 2i + 1 and 2i + 2), each computed as the
    one-at-a-time bisection computes it, then the path its answers take."""
    spans, mids = [(lo, hi)], []
    for i in range(2**steps - 1):
        a, b = spans[i]
        mid = (a + b) / 2
        mids.append(mid)
        spans += [(a, mid), (mid, b)]
    rejects = [e >= target for e in evalues([math.exp(m) for m in mids])]
    i = 0
    for _ in range(steps):
        if rejects[i] == harm:
            lo, i = mids[i], 2 * i + 2
        else:
            hi, i = mids[i], 2 * i + 1
    return lo, hi
