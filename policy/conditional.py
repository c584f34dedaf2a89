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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HARM_GRID",
    "SAFE_GRID",
    "Landing",
    "Stratum",
    "landing_test",
    "log_evalue",
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
    if not (r0 > 0 and math.isfinite(r0)):
        raise ValueError(f"null ratio {r0!r} must be positive and finite")
    rows = [(s.share, s.candidate_events, s.stable_events) for s in strata]
    rows = [(w, c, s) for w, c, s in rows if w is not None and c + s > 0]
    if not rows:
        return 0.0
    arr = np.asarray(rows, dtype=np.float64)
    share, on_c, on_s = arr[:, 0], arr[:, 1], arr[:, 2]
    offset = np.log(share) - np.log1p(-share)  # logit(share): events' log-odds at r = 1
    grid = np.asarray(HARM_GRID if harm else SAFE_GRID, dtype=np.float64)
    theta0 = offset + math.log(r0)  # (S,)
    theta = theta0[None, :] + np.log(grid)[:, None]  # (K, S)
    # log σ(z) = −log(1 + e^−z); log(1 − σ(z)) = log σ(−z)
    log_lr = on_c * (_log_sigmoid(theta) - _log_sigmoid(theta0)) + on_s * (
        _log_sigmoid(-theta) - _log_sigmoid(-theta0)
    )
    per_alternative = log_lr.sum(axis=1)
    # log of the mean of e^x over the grid, shifted by the largest term so that no e^x
    # overflows. Written out rather than scipy.special.logsumexp: the same arithmetic, but
    # scipy's array-API dispatch cost ~150 µs a call, and the interval of a check's
    # report (checks.py `_ratio_bounds`) calls this ~50 times a tick, on the event loop.
    top = float(per_alternative.max())
    return top + math.log(float(np.exp(per_alternative - top).sum()) / grid.size)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = -np.logaddexp(0.0, -z)
    return out


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
