"""Always-valid confidence sequences for a rate and a difference of rates (mixture SPRT).

A check that is looked at every few seconds for the life of a rollout needs intervals
that hold at every look at once, not at one fixed sample size. These are the normal
mixture sequences of:

- Johari, Koomen, Pekelis, Walsh, "Always Valid Inference: Continuous Monitoring of
  A/B Tests", KDD 2017 / Operations Research 2022 (the mSPRT behind Optimizely's Stats
  Engine): mixing N(θ₀, τ²) over the effect gives Λn and the sequence
  θ̂ ± sqrt(V(V + nτ²)/(n²τ²) · [2 log(1/α) + log((V + nτ²)/V)]).
- Howard, Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic
  confidence sequences", Ann. Statist. 2021, eq. (14): the one-sided normal mixture
  boundary, log(1 + sqrt(nρ² + 1)/(2α)) in place of log(sqrt(nρ² + 1)/α).
- Waudby-Smith et al., "Time-uniform central limit theory and asymptotic confidence
  sequences", arXiv 2103.06476: plug-in variances keep this valid asymptotically.
- GrowthBook, packages/stats/gbstats/frequentist/tests.py and
  docs/statistics/sequential.mdx: τ² = ρ²·s², ρ tuned by N*, the sample size at which
  the sequence is tightest: ρ = sqrt((−2 ln α + ln(−2 ln α + 1)) / N*), with 2α in
  place of α for one-sided use. With τ² = ρ²V the mSPRT sequence above is exactly
  GrowthBook's half-width s·sqrt(2(nρ² + 1)/(n²ρ²) · ln(sqrt(nρ² + 1)/α)).

Unequal arms (a 5 % canary). For independent arms with counts n_A, n_B the difference
of means θ̂ = Ȳ_B − Ȳ_A has Var = σ²_A/n_A + σ²_B/n_B =: 1/I, and for nested samples
Cov(θ̂_j, θ̂_k) = 1/I_k (j < k), whatever the allocation: θ̂·I is a Brownian motion with
drift θ in information time I (Jennison & Turnbull, "Group Sequential Methods", ch. 3,
the canonical joint distribution). The mSPRT therefore applies in information time with
a fixed τ². We fix τ² = ρ²·2V with V = σ²_A + σ²_B, so that with equal arms of m each
it is GrowthBook's sequence at n = 2m, and in general it is that sequence at the
balanced-equivalent total n_eff = 2V·I = 2V / (σ²_A/n_A + σ²_B/n_B) with s² = 2V.
Unlike GrowthBook's s² = n·Var (n = n_A + n_B), this τ² does not move when the canary
weight steps from 5 % to 50 %, which a mixture fixed in advance requires.

Bernoulli variances use a Laplace-smoothed rate p̃ = (x + 1)/(n + 2): p̃(1 − p̃) is never
below p̂(1 − p̂), so a run of zero errors cannot collapse the interval to a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_N_STAR",
    "Bounds",
    "Side",
    "difference_bounds",
    "difference_sequence",
    "mixture_halfwidth",
    "rate_bounds",
    "rate_sequence",
    "sequential_rho",
    "stratified_difference_sequence",
]

DEFAULT_N_STAR = 5000.0
Side = Literal["two-sided", "lower", "upper"]
"""Which bound carries the guarantee: "lower" is one-sided evidence that the parameter is
large (P(θ < lower at any look) ≤ α), "upper" that it is small, "two-sided" both."""

Floats = npt.NDArray[np.float64]
_MAX_EXPONENT = 700.0  # exp() overflows float64 just above 709


@dataclass(frozen=True, slots=True)
class Bounds:
    """One look at a confidence sequence, and the always-valid p-value against `null`."""

    estimate: float
    lower: float
    upper: float
    pvalue: float  # < alpha exactly when the sequence excludes `null` on the chosen side


def sequential_rho(
    alpha: float, n_star: float = DEFAULT_N_STAR, *, one_sided: bool = False
) -> float:
    """GrowthBook's ρ: the mixture's tuning that makes the sequence tightest near N*."""
    if not 0 < alpha < (0.5 if one_sided else 1):
        raise ValueError(f"alpha {alpha!r} must be in (0, {0.5 if one_sided else 1})")
    if n_star <= 0:
        raise ValueError(f"n_star {n_star!r} must be positive")
    a = 2 * alpha if one_sided else alpha
    return math.sqrt((-2 * math.log(a) + math.log(-2 * math.log(a) + 1)) / n_star)


def mixture_halfwidth(
    s2: npt.ArrayLike,
    n: npt.ArrayLike,
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    one_sided: bool = False,
) -> Floats:
    """Half-width of the normal-mixture sequence for a mean of n draws of variance s2.

    Infinite where n is 0. One-sided widths bound a single side at level alpha.
    """
    s2_a = np.asarray(s2, dtype=np.float64)
    n_a = np.asarray(n, dtype=np.float64)
    rho2 = sequential_rho(alpha, n_star, one_sided=one_sided) ** 2
    safe_n = np.where(n_a > 0, n_a, 1.0)
    tr2p1 = safe_n * rho2 + 1.0
    if one_sided:
        log_term = np.log1p(np.sqrt(tr2p1) / (2 * alpha))
    else:
        log_term = np.log(np.sqrt(tr2p1) / alpha)
    width = np.sqrt(s2_a * 2.0 * tr2p1 * log_term / (safe_n * safe_n * rho2))
    return np.where(n_a > 0, width, np.inf)


def _pvalue(
    excess: Floats, s2: Floats, n: Floats, alpha: float, n_star: float, side: Side
) -> Floats:
    """Always-valid p-value at this look: the level at which the sequence just touches
    the null, with ρ held at the configured alpha (as GrowthBook's bisection does).

    Two-sided: 1/Λn, Λn the mixture likelihood ratio (Johari et al. eq. for Λn). One-sided:
    solve log(1 + sqrt(nρ²+1)/(2α)) = D for α, with D = ρ² n² excess² / (2 s² (nρ²+1)),
    s² the variance of one draw (so s²/n is the estimate's).
    """
    one_sided = side != "two-sided"
    rho2 = sequential_rho(alpha, n_star, one_sided=one_sided) ** 2
    positive = (n > 0) & (s2 > 0)
    safe_n = np.where(positive, n, 1.0)
    safe_s2 = np.where(positive, s2, 1.0)
    tr2p1 = safe_n * rho2 + 1.0
    d = rho2 * safe_n * safe_n * excess * excess / (2.0 * safe_s2 * tr2p1)
    d = np.minimum(d, _MAX_EXPONENT)
    if one_sided:
        log_p = 0.5 * np.log(tr2p1) - math.log(2.0) - np.log(np.expm1(np.maximum(d, 1e-300)))
        harmful = excess > 0 if side == "lower" else excess < 0
        p = np.where(harmful, np.exp(np.minimum(log_p, 0.0)), 1.0)
    else:
        p = np.exp(np.minimum(0.5 * np.log(tr2p1) - d, 0.0))
    return np.where(positive, p, 1.0)


def _interval(
    estimate: Floats,
    s2: Floats,
    n: Floats,
    alpha: float,
    n_star: float,
    side: Side,
    limits: tuple[float, float],
) -> tuple[Floats, Floats]:
    half = mixture_halfwidth(s2, n, alpha, n_star=n_star, one_sided=side != "two-sided")
    lo, hi = limits
    lower = np.full_like(estimate, lo) if side == "upper" else np.clip(estimate - half, lo, hi)
    upper = np.full_like(estimate, hi) if side == "lower" else np.clip(estimate + half, lo, hi)
    return lower, upper


def _smoothed_variance(events: Floats, n: Floats) -> Floats:
    p = (events + 1.0) / (n + 2.0)
    return p * (1.0 - p)


def rate_bounds(
    events: npt.ArrayLike,
    n: npt.ArrayLike,
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    side: Side = "two-sided",
    null: float = 0.0,
) -> tuple[Floats, Floats, Floats, Floats]:
    """Vectorised one-sample sequence for a Bernoulli rate: (estimate, lower, upper, p).

    Bounds are clipped to [0, 1]; where n is 0 they are [0, 1] and p is 1.
    """
    x = np.asarray(events, dtype=np.float64)
    n_a = np.asarray(n, dtype=np.float64)
    estimate = np.where(n_a > 0, x / np.where(n_a > 0, n_a, 1.0), 0.0)
    s2 = _smoothed_variance(x, n_a)
    lower, upper = _interval(estimate, s2, n_a, alpha, n_star, side, (0.0, 1.0))
    return estimate, lower, upper, _pvalue(estimate - null, s2, n_a, alpha, n_star, side)


def difference_bounds(
    events_a: npt.ArrayLike,
    n_a: npt.ArrayLike,
    events_b: npt.ArrayLike,
    n_b: npt.ArrayLike,
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    side: Side = "two-sided",
    null: float = 0.0,
) -> tuple[Floats, Floats, Floats, Floats]:
    """Vectorised two-sample sequence for rate_b − rate_a: (estimate, lower, upper, p).

    Arms may be of any, changing, sizes (see the module docstring for the information-time
    form). Bounds are clipped to [−1, 1]; where either arm is empty they are [−1, 1].
    """
    xa, na = np.asarray(events_a, dtype=np.float64), np.asarray(n_a, dtype=np.float64)
    xb, nb = np.asarray(events_b, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    both = (na > 0) & (nb > 0)
    safe_na, safe_nb = np.where(na > 0, na, 1.0), np.where(nb > 0, nb, 1.0)
    estimate = np.where(both, xb / safe_nb - xa / safe_na, 0.0)
    var_a, var_b = _smoothed_variance(xa, na), _smoothed_variance(xb, nb)
    s2 = 2.0 * (var_a + var_b)
    n_eff = np.where(both, s2 / (var_a / safe_na + var_b / safe_nb), 0.0)
    lower, upper = _interval(estimate, s2, n_eff, alpha, n_star, side, (-1.0, 1.0))
    return estimate, lower, upper, _pvalue(estimate - null, s2, n_eff, alpha, n_star, side)


def rate_sequence(
    events: int,
    n: int,
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    side: Side = "two-sided",
    null: float = 0.0,
) -> Bounds:
    """One look at the sequence for a Bernoulli rate events/n."""
    if events < 0 or n < 0 or events > n:
        raise ValueError(f"need 0 <= events <= n, got events={events}, n={n}")
    est, lo, hi, p = rate_bounds(events, n, alpha, n_star=n_star, side=side, null=null)
    return Bounds(float(est), float(lo), float(hi), float(p))


def difference_sequence(
    events_a: int,
    n_a: int,
    events_b: int,
    n_b: int,
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    side: Side = "two-sided",
    null: float = 0.0,
) -> Bounds:
    """One look at the sequence for events_b/n_b − events_a/n_a (b the candidate)."""
    for x, n in ((events_a, n_a), (events_b, n_b)):
        if x < 0 or n < 0 or x > n:
            raise ValueError(f"need 0 <= events <= n, got events={x}, n={n}")
    est, lo, hi, p = difference_bounds(
        events_a, n_a, events_b, n_b, alpha, n_star=n_star, side=side, null=null
    )
    return Bounds(float(est), float(lo), float(hi), float(p))


def stratified_difference_sequence(
    strata: Sequence[tuple[int, int, int, int]],
    alpha: float,
    *,
    n_star: float = DEFAULT_N_STAR,
    side: Side = "two-sided",
    null: float = 0.0,
) -> Bounds:
    """One look at the sequence for rate_b − rate_a within strata (events_a, n_a,
    events_b, n_b), combined by information: the estimate Σ I_k θ̂_k / Σ I_k with
    I_k = 1 / (σ²_a/n_a + σ²_b/n_b) in stratum k, at information Σ I_k.

    Strata are the weight steps of a rollout: each arm is sampled alike within one, so
    a rate moving in both arms over time cancels within each, where pooled counts would
    compare the stable's early traffic with the candidate's late traffic (Simpson). Each
    stratum's score I_k·θ̂_k is (asymptotically) a Brownian motion in its information
    with drift θ, strata are independent, so their sum is one in Σ I_k (the canonical
    joint distribution, Jennison & Turnbull ch. 3), and the mixture applies to it as to
    one stratum, with τ² fixed from the variances of all strata pooled. A stratum with
    an empty arm carries no information and is left out; with one stratum this is
    `difference_sequence`.
    """
    rows = [(xa, na, xb, nb) for xa, na, xb, nb in strata if na > 0 and nb > 0]
    for row in rows:
        if min(row[0], row[2]) < 0 or row[0] > row[1] or row[2] > row[3]:
            raise ValueError(f"need 0 <= events <= n, got {row}")
    if not rows:
        return Bounds(0.0, -1.0, 1.0, 1.0)
    if len(rows) == 1:
        return difference_sequence(*rows[0], alpha, n_star=n_star, side=side, null=null)
    arr = np.asarray(rows, dtype=np.float64)
    xa, na, xb, nb = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
    info = 1.0 / (_smoothed_variance(xa, na) / na + _smoothed_variance(xb, nb) / nb)
    estimate = np.asarray(float(np.sum(info * (xb / nb - xa / na)) / np.sum(info)))
    pooled_a = _smoothed_variance(np.asarray(xa.sum()), np.asarray(na.sum()))
    pooled_b = _smoothed_variance(np.asarray(xb.sum()), np.asarray(nb.sum()))
    s2 = np.asarray(2.0 * (pooled_a + pooled_b))
    n_eff = np.asarray(s2 * float(np.sum(info)))
    lower, upper = _interval(estimate, s2, n_eff, alpha, n_star, side, (-1.0, 1.0))
    p = _pvalue(estimate - null, s2, n_eff, alpha, n_star, side)
    return Bounds(float(estimate), float(lower), float(upper), float(p))
