"""Deliberately bad candidates for the demo: a classifier that fails on some rows, one that is slow.

Both are real scikit-learn estimators wrapping a real one, so they fit, predict and
predict_proba like any classifier and are saved with joblib like any custom estimator.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

_HASH_SPAN = float(1 << 64)


def faulty_rows(features: np.ndarray, fault_rate: float) -> np.ndarray:
    """Which rows fail: a hash of each row's FP32 bytes, so a row always fails or never does."""
    rows = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)
    draws = np.array(
        [
            int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
            for row in rows
        ],
        dtype=np.float64,
    )
    return draws / _HASH_SPAN < fault_rate


class FaultyClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Raises on a fixed `fault_rate` share of rows, like a model with a crashing code path."""

    def __init__(self, estimator: Any, fault_rate: float = 0.05) -> None:
        self.estimator = estimator
        self.fault_rate = fault_rate

    def fit(self, X: np.ndarray, y: np.ndarray) -> FaultyClassifier:
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        return self

    def _check(self, X: np.ndarray) -> None:
        check_is_fitted(self)
        bad = np.flatnonzero(faulty_rows(X, self.fault_rate))
        if bad.size:
            raise ValueError(
                f"numerical fault in feature pipeline on row {int(bad[0])} "
                f"({bad.size} of {len(X)} rows in this batch)"
            )

    def predict(self, X: np.ndarray) -> np.ndarray:
        self._check(X)
        return np.asarray(self.estimator_.predict(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._check(X)
        return np.asarray(self.estimator_.predict_proba(X))


class SlowClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Adds `delay_s` to every predict and predict_proba, like an overweight model."""

    def __init__(self, estimator: Any, delay_s: float = 0.025) -> None:
        self.estimator = estimator
        self.delay_s = delay_s

    def fit(self, X: np.ndarray, y: np.ndarray) -> SlowClassifier:
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        time.sleep(self.delay_s)
        return np.asarray(self.estimator_.predict(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        time.sleep(self.delay_s)
        return np.asarray(self.estimator_.predict_proba(X))
