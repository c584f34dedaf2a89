"""Sample-ratio mismatch: do the observed per-variant counts fit the configured split?

A split that does not deliver its configured ratio (a router bug, a variant that drops or
retries requests, bots stuck to one side) makes every comparison between the variants
suspect, so on SRM the engine should hold decisions rather than trust any of them.

Two tests, both alarming at p < 0.001 with at least 8 *expected* requests per arm (a
candidate that receives none of its share is the most blatant mismatch of all, and a
rule on observed counts would never flag it):

- `srm_pvalue`: Pearson's chi-square goodness of fit against the configured weights,
  df = k − 1: GrowthBook's defaults (back-end/src/util/stats.ts, `checkSrm`; docs
  "Sample Ratio Mismatch") and Statsig's red threshold. It is a fixed-n test: looked at
  every 10 requests, a healthy split alarms in about 5 % of rollouts
  (load_tests/policy_simulation.py), so the policy engine does not decide on it.
- `sequential_srm_pvalue`: the anytime-valid test of Lindon & Malek (2022, "Anytime-valid
  inference for multinomial count data", NeurIPS; Optimizely's SSRM and the `savvi`
  package): a Dirichlet(k·θ0) mixture over the arm probabilities gives a Bayes factor
  against the configured split θ0 that is a nonnegative martingale under the null, so by
  Ville's inequality P(BF_n ≥ 1/α at any n) ≤ α however often it is looked at. The
  p-value is 1/BF_n (at most 1); what the checks decide on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

__all__ = [
    "SRM_CONCENTRATION",
    "SRM_MIN_PER_ARM",
    "SRM_PVALUE",
    "chi_square_sf",
    "sequential_srm_pvalue",
    "srm_alarm",
    "srm_pvalue",
]

SRM_PVALUE = 0.001
SRM_MIN_PER_ARM = 8
SRM_CONCENTRATION = 100.0
"""Prior concentration k of the Dirichlet(k·θ0) mixture: savvi's default. Larger k puts
the prior's mass nearer θ0, which finds small mismatches sooner and large ones later."""


def _checked(counts: Sequence[int], weights: Sequence[float]) -> None:
    if len(counts) != len(weights) or len(counts) < 2:
        raise ValueError(f"need >= 2 arms and one weight per count: {counts!r}, {weights!r}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must not be negative: {counts!r}")
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights must be positive: {weights!r}")


def sequential_srm_pvalue(
    counts: Sequence[int], weights: Sequence[float], *, concentration: float = SRM_CONCENTRATION
) -> float:
    """Anytime-valid p-value, min(1, 1/BF), of `counts` against the split `weights`.

    log BF = log B(α + x) − log B(α) − Σ x_i log θ0_i with α = k·θ0 and B the multivariate
    beta function; the multinomial coefficient cancels between the two hypotheses.
    """
    _checked(counts, weights)
    if not concentration > 0:
        raise ValueError(f"concentration must be positive: {concentration!r}")
    total = sum(counts)
    if total == 0:
        return 1.0
    weight_sum = float(sum(weights))
    theta = [w / weight_sum for w in weights]
    alpha = [concentration * t for t in theta]
    lgamma = math.lgamma
    log_bf = (
        lgamma(concentration)
        - sum(lgamma(a) for a in alpha)
        + sum(lgamma(a + x) for a, x in zip(alpha, counts, strict=True))
        - lgamma(concentration + total)
        - sum(x * math.log(t) for x, t in zip(counts, theta, strict=True))
    )
    return 1.0 if log_bf <= 0 else math.exp(-log_bf)


def srm_pvalue(counts: Sequence[int], weights: Sequence[float]) -> float:
    """p-value of Pearson's chi-square test of `counts` against `weights` (any scale).

    1.0 when there is nothing to test (no requests yet).
    """
    _checked(counts, weights)
    total = sum(counts)
    if total == 0:
        return 1.0
    weight_sum = float(sum(weights))
    statistic = 0.0
    for count, weight in zip(counts, weights, strict=True):
        expected = total * weight / weight_sum
        statistic += (count - expected) ** 2 / expected
    return chi_square_sf(statistic, len(counts) - 1)


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X chi-square with `df` degrees of freedom: the regularized
    upper incomplete gamma function Q(df/2, statistic/2).

    Computed as Numerical Recipes does (Press et al., 3rd ed., §6.2): below a + 1 by the
    series for P = 1 − Q, above it by Legendre's continued fraction for Q (modified
    Lentz), each to double precision, the prefactor x^a·e^−x/Γ(a) taken in logs so that
    deep tails keep their relative accuracy. tests/policy/test_srm.py holds it to
    scipy's `chdtrc` within 1e-10 relative.
    """
    if df < 1:
        raise ValueError(f"df must be at least 1: {df!r}")
    if not statistic > 0:
        return 1.0
    a, x = df / 2.0, statistic / 2.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = a
        for _ in range(_MAX_TERMS):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) <= abs(total) * _EPSILON:
                return max(0.0, 1.0 - total * math.exp(log_prefactor))
        raise ArithmeticError(f"chi-square series did not converge ({statistic!r}, {df!r})")
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) <= _EPSILON:
            return min(1.0, math.exp(log_prefactor) * h)
    raise ArithmeticError(f"chi-square fraction did not converge ({statistic!r}, {df!r})")


_EPSILON = sys.float_info.epsilon  # a term (or change) this small, relatively: converged
_TINY = 1e-300  # stands in for a zero divisor in Lentz's method
_MAX_TERMS = 100_000  # each converges in O(sqrt(a)) or O(sqrt(x)) terms: a bug's guard


def srm_alarm(
    counts: Sequence[int],
    weights: Sequence[float],
    *,
    threshold: float = SRM_PVALUE,
    min_per_arm: int = SRM_MIN_PER_ARM,
) -> bool:
    """True when every arm expects `min_per_arm` requests and the p-value is below threshold."""
    total, weight_sum = sum(counts), float(sum(weights))
    if min(total * w / weight_sum for w in weights) < min_per_arm:
        return False
    return srm_pvalue(counts, weights) < threshold
