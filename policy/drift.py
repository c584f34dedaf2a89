"""Input drift of live traffic against a training-input reference: PSI and KS per feature.

PSI (population stability index) on bins cut at the reference's deciles:
Σ (a − e)·ln(a / e) over bins, e and a the reference's and the live window's shares.
Conventional reading (Siddiqi, "Credit Risk Scorecards", 2006; Yurdakul, "Statistical
properties of the population stability index", 2018): < 0.1 stable, 0.1–0.25 worth a
look, > 0.25 shifted. PSI is biased upwards in small samples (about (bins − 1)·(1/n + 1/m)
with no drift at all), so windows of fewer than 500 rows are not judged.

KS: scipy.stats.ks_2samp per feature, its p-values Bonferroni-adjusted across features.
With thousands of rows KS flags differences too small to matter, so the drift check pairs
it with a minimum statistic (see policy/checks.py). scipy is the `drift` extra (136 MiB
installed, most of a proxy-only install without it): a policy with a drift check is
refused at load, naming the extra, where it is not installed (`drift_unavailable`).

Drift is a property of the inputs, not evidence that the candidate is worse, and these
are not sequential tests: use them to alert or hold, not to roll back.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DRIFT_EXTRA",
    "DRIFT_MIN_ROWS",
    "PSI_ALERT",
    "PSI_WARN",
    "DriftReport",
    "FeatureDrift",
    "drift_report",
    "drift_unavailable",
    "ks_test",
    "psi",
]

PSI_WARN = 0.1
PSI_ALERT = 0.25
DRIFT_MIN_ROWS = 500
DRIFT_EXTRA = "rollguard[drift]"
_FLOOR = 1e-4  # share given to an empty bin, so ln(a/e) stays finite (a common convention)


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> float:
    """PSI of `current` against `reference` (1-D), on bins at the reference's quantiles.

    Repeated quantiles (a discrete feature) merge, and each value that is an edge gets a
    bin of its own, between the open intervals: a constant feature is one bin and any
    other live value is drift; for continuous data those point bins stay empty.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs non-empty reference and current samples")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = _shares(edges, ref)
    actual = _shares(edges, cur)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _shares(edges: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Share of x in each of the 2k + 1 bins: (−∞, e1), {e1}, (e1, e2), ..., (ek, ∞)."""
    left = np.searchsorted(edges, x, side="left")
    on_edge = np.searchsorted(edges, x, side="right") != left
    counts = np.bincount(2 * left + on_edge, minlength=2 * edges.size + 1)
    return np.maximum(counts / x.size, _FLOOR)


def drift_unavailable() -> str | None:
    """Why this install cannot compute drift (scipy missing), else None. Looks the package
    up without importing it (scipy.stats costs half a second at start-up)."""
    try:
        found = importlib.util.find_spec("scipy") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if found:
        return None
    return f"the drift metric needs scipy, which is not installed (pip install '{DRIFT_EXTRA}')"


def ks_test(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp)."""
    # Imported here: scipy.stats costs half a second and tens of MB at start-up, and a
    # gateway whose rollouts check no drift never needs it.
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference).ravel(), np.asarray(current).ravel())
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: int  # column index
    psi: float
    ks_statistic: float
    ks_pvalue: float  # raw
    ks_pvalue_adjusted: float  # Bonferroni across the report's features


@dataclass(frozen=True, slots=True)
class DriftReport:
    features: tuple[FeatureDrift, ...]
    reference_rows: int
    current_rows: int

    @property
    def worst(self) -> FeatureDrift:
        """The feature with the largest PSI (ties: the smaller adjusted KS p-value)."""
        return max(self.features, key=lambda f: (f.psi, -f.ks_pvalue_adjusted))

    @property
    def worst_ks(self) -> FeatureDrift:
        """The feature with the smallest adjusted KS p-value (ties: the larger statistic)."""
        return min(self.features, key=lambda f: (f.ks_pvalue_adjusted, -f.ks_statistic))


def _columns(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"expected rows x features, got shape {a.shape}")
    return a


def drift_report(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> DriftReport:
    """PSI and KS for every feature (column) of `current` against `reference`."""
    ref, cur = _columns(reference), _columns(current)
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} features, current {cur.shape[1]}")
    if ref.shape[0] == 0 or cur.shape[0] == 0:
        raise ValueError("drift needs at least one reference row and one current row")
    k = ref.shape[1]
    features = []
    for j in range(k):
        statistic, pvalue = ks_test(ref[:, j], cur[:, j])
        features.append(
            FeatureDrift(
                feature=j,
                psi=psi(ref[:, j], cur[:, j], bins),
                ks_statistic=statistic,
                ks_pvalue=pvalue,
                ks_pvalue_adjusted=min(1.0, pvalue * k),
            )
        )
    return DriftReport(tuple(features), reference_rows=ref.shape[0], current_rows=cur.shape[0])
