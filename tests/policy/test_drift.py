"""PSI on reference deciles and per-feature KS with Bonferroni."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from rollguard.policy.drift import DRIFT_MIN_ROWS, PSI_ALERT, PSI_WARN, drift_report, ks_test, psi


def test_psi_by_hand() -> None:
    """All live values in the reference's lowest decile: 0.9 ln 10 + 9 (1e-4 − 0.1) ln(1e-3)."""
    reference = np.arange(1000.0)
    expected = 0.9 * math.log(10) + 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert psi(reference, np.zeros(200)) == pytest.approx(expected)
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_a_known_split() -> None:
    """Half the live rows in the bottom decile, the rest spread evenly over the other nine."""
    reference = np.arange(1000.0)
    current = np.concatenate([np.zeros(900), np.repeat(np.arange(150.0, 1000.0, 100.0), 100)])
    a = np.array([0.5] + [0.5 / 9] * 9)
    expected = float(np.sum((a - 0.1) * np.log(a / 0.1)))
    assert psi(reference, current) == pytest.approx(expected)


def test_constant_and_discrete_features() -> None:
    assert psi(np.ones(600), np.ones(600)) == 0.0
    assert psi(np.ones(600), np.full(600, 2.0)) > PSI_ALERT
    ref = np.repeat([0.0, 1.0, 2.0], 200)
    assert psi(ref, np.repeat([0.0, 1.0, 2.0], 300)) == pytest.approx(0.0, abs=1e-12)


def test_psi_noise_needs_large_windows() -> None:
    """No drift at all: 100-row windows often read above 0.1, 500-row windows rarely do."""
    rng = np.random.default_rng(3)
    reference = rng.normal(size=5000)
    small = [psi(reference, rng.normal(size=100)) for _ in range(300)]
    large = [psi(reference, rng.normal(size=DRIFT_MIN_ROWS)) for _ in range(300)]
    assert np.mean(np.array(small) > PSI_WARN) > 0.2
    assert np.mean(np.array(large) > PSI_WARN) < 0.05
    assert max(large) < PSI_ALERT


def test_ks_is_scipys() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=700), rng.normal(0.2, size=600)
    reference = ks_2samp(a, b)
    statistic, pvalue = ks_test(a, b)
    assert statistic == pytest.approx(reference.statistic)
    assert pvalue == pytest.approx(reference.pvalue)


def test_report_finds_the_worst_feature_and_adjusts_ks() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(2000, 4))
    current = rng.normal(size=(800, 4))
    current[:, 2] += 1.0  # one feature moved by a standard deviation
    report = drift_report(reference, current)
    assert (report.reference_rows, report.current_rows) == (2000, 800)
    assert report.worst.feature == 2 and report.worst.psi > PSI_ALERT
    assert report.worst_ks.feature == 2
    for f in report.features:
        assert f.ks_pvalue_adjusted == pytest.approx(min(1.0, 4 * f.ks_pvalue))
        assert f.psi == pytest.approx(psi(reference[:, f.feature], current[:, f.feature]))
    calm = [f for f in report.features if f.feature != 2]
    assert all(f.psi < PSI_WARN for f in calm)


def test_report_input_errors() -> None:
    with pytest.raises(ValueError, match="features"):
        drift_report(np.zeros((10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError):
        drift_report(np.zeros((0, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        psi([], [1.0])
    one_d = drift_report(np.arange(600.0), np.arange(600.0))
    assert len(one_d.features) == 1 and one_d.worst.psi == pytest.approx(0.0, abs=1e-12)
