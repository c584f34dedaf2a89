"""Sample-ratio mismatch: do the observed per-variant counts fit the configured split?

A split that does not deliver its configured ratio (a router bug, a variant that drops or
retries requests, bots stuck to one side) makes every comparison between the variants
suspect, so on SRM the engine should hold decisions rather than trust any of them.

Pearson's chi-square goodness of fit against the configured weights, df = k − 1, alarm at
p < 0.001 with at least 8 requests per arm: GrowthBook's defaults (back-end/src/util/
stats.ts, `checkSrm`; docs "Sample Ratio Mismatch"), and Statsig's red threshold. A 0.001
threshold, not 0.05, because the check runs at every look (it is not a sequential test:
load_tests/policy_simulation.py measures how often it alarms on a healthy split).
The 8 are *expected* counts: a candidate that receives none of its share is the most
blatant mismatch of all, and a rule on observed counts would never flag it.
"""

from __future__ import annotations

from collections.abc import Sequence

from scipy.stats import chi2

__all__ = ["SRM_MIN_PER_ARM", "SRM_PVALUE", "srm_alarm", "srm_pvalue"]

SRM_PVALUE = 0.001
SRM_MIN_PER_ARM = 8


def srm_pvalue(counts: Sequence[int], weights: Sequence[float]) -> float:
    """p-value of Pearson's chi-square test of `counts` against `weights` (any scale).

    1.0 when there is nothing to test (no requests yet).
    """
    if len(counts) != len(weights) or len(counts) < 2:
        raise ValueError(f"need >= 2 arms and one weight per count: {counts!r}, {weights!r}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must not be negative: {counts!r}")
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights must be positive: {weights!r}")
    total = sum(counts)
    if total == 0:
        return 1.0
    weight_sum = float(sum(weights))
    statistic = 0.0
    for count, weight in zip(counts, weights, strict=True):
        expected = total * weight / weight_sum
        statistic += (count - expected) ** 2 / expected
    return float(chi2.sf(statistic, len(counts) - 1))


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
