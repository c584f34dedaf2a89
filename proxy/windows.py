"""Per-variant ring-buffer windows and counters (the feedback index is proxy/feedback.py).

Owned by the event loop: `record` and friends run on the request path without locks;
`evidence()` is the one allocating call, made by the policy loop every few seconds.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any

import numpy as np

from rollguard.policy.evidence import VariantEvidence
from rollguard.serving.prediction import Predicted, is_missing, matches

_ANY_SIZE = 2**32 - 1  # the largest row count kept (uint32); "no size limit"


class Outcome(IntEnum):
    """How a routed request ended; bad input is never recorded at all."""

    OK = 0
    MODEL_ERROR = 1
    TIMEOUT = 2


class VariantWindow:
    """The last `size` requests of one version, plus counters since the last reset.

    Slot `seq % size` holds record `seq`; a parallel array of the seq in each slot lets
    late feedback tell whether its request is still there. Counters cover every
    record since `reset()` even after the window has wrapped.
    """

    def __init__(
        self, version: str, size: int, *, input_width: int | None = None, tol: float = 0.0
    ) -> None:
        if size < 1:
            raise ValueError(f"window size {size!r}: expected at least 1")
        if input_width is not None and input_width < 1:
            raise ValueError(f"input_width {input_width!r}: expected at least 1")
        if not tol >= 0.0:
            raise ValueError(f"tol {tol!r}: expected a non-negative tolerance")
        self.version = version
        self.size = size
        self.input_width = input_width
        self.tol = tol
        self._latency = np.zeros(size, dtype=np.float64)
        self._outcome = np.zeros(size, dtype=np.uint8)
        self._rows = np.ones(size, dtype=np.uint32)  # each request's batch size
        # A number or a class name per record (NaN: none); a list, since names are str.
        self._prediction: list[Predicted] = [math.nan] * size
        self._seqs = np.full(size, -1, dtype=np.int64)  # -1: empty, or its label consumed
        self._inputs = None if input_width is None else np.zeros((size, input_width), np.float32)
        self._has_row = None if input_width is None else np.zeros(size, dtype=np.bool_)
        self._next = 0  # the seq the next record gets; never reset
        self._epoch = 0  # first seq counted since the last reset()
        self._threshold: float | None = None
        self._threshold_rows: int = _ANY_SIZE  # larger requests are not counted against it
        self.reset()
        self.reset_routed()

    def reset(self) -> None:
        """Zero the counters (a rollout begins); the recent samples stay."""
        self._epoch = self._next
        self._requests = self._errors = 0
        self._labelled = self._correct = 0
        self._compared = self._agreed = 0
        self._since_threshold = self._over_threshold = 0

    def reset_routed(self) -> None:
        """Zero the routed count: the split weights just changed (sample-ratio checks)."""
        self._routed = 0

    def set_latency_threshold(self, seconds: float | None, rows: int | None = None) -> None:
        """Count requests slower than `seconds` from now on (None stops counting), among
        requests of at most `rows` rows (None: of any size).

        The threshold was frozen from the stable's requests of at most `rows` rows (the
        stable's median batch size, policy/checks.py `latency_rows`): a larger request
        is neither slow nor fast by it, so a client sending huge batches to one variant
        can neither make it look slow nor hide that it is."""
        self._threshold = seconds
        self._threshold_rows = _ANY_SIZE if rows is None else rows
        self._since_threshold = self._over_threshold = 0

    def count_routed(self) -> None:
        self._routed += 1

    def record(
        self,
        latency_s: float,
        outcome: int,
        prediction: Predicted,
        row: np.ndarray | None = None,
        rows: int = 1,
    ) -> int:
        """Store one completed request of `rows` rows; returns its sequence number for
        feedback."""
        seq = self._next
        self._next = seq + 1
        i = seq % self.size
        self._latency[i] = latency_s
        self._outcome[i] = outcome
        if not 1 <= rows < _ANY_SIZE:  # an empty batch is one request's worth of rows
            rows = 1 if rows < 1 else _ANY_SIZE
        self._rows[i] = rows
        self._prediction[i] = prediction
        self._seqs[i] = seq
        if self._inputs is not None and self._has_row is not None:
            self._has_row[i] = row is not None
            if row is not None:
                self._inputs[i] = row
        self._requests += 1
        if outcome:
            self._errors += 1
        threshold = self._threshold
        if threshold is not None and rows <= self._threshold_rows:
            self._since_threshold += 1
            if latency_s > threshold:
                self._over_threshold += 1
        return seq

    def holds(self, seq: int) -> bool:
        """Whether record `seq` can still take a label (in the window, not labelled yet)."""
        return seq >= 0 and bool(self._seqs[seq % self.size] == seq)

    def feedback(self, seq: int, label: Predicted) -> bool | None:
        """Whether the prediction of record `seq` matched `label`; None if it is gone.

        A record is gone once its slot is overwritten or it already took a label, so a
        label never lands on the wrong request or twice. Records without a prediction
        (errors) and records from before the last reset() answer but are not counted:
        errors already weigh in the error rate, and old labels belong to an old rollout.
        """
        if seq < 0:
            return None
        i = seq % self.size
        if self._seqs[i] != seq:
            return None
        self._seqs[i] = -1
        prediction = self._prediction[i]
        if is_missing(prediction):
            return False
        correct = matches(prediction, label, self.tol)
        if seq >= self._epoch:
            self._labelled += 1
            self._correct += correct
        return correct

    def record_comparison(self, agreed: bool) -> None:
        """A shadow answer was compared with the primary's."""
        self._compared += 1
        self._agreed += agreed

    @property
    def recorded(self) -> int:
        """Records ever made (the next record's seq)."""
        return self._next

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def routed(self) -> int:
        return self._routed

    def _chronological(self, array: np.ndarray) -> np.ndarray:
        """A copy of the valid part of a ring array, oldest first."""
        n = self._next
        if n <= self.size:
            return array[:n].copy()
        start = n % self.size
        return np.concatenate((array[start:], array[:start]))

    def evidence(self) -> VariantEvidence:
        """A snapshot for the policy engine (copies the window; not for the hot path)."""
        inputs = None
        if self._inputs is not None and self._has_row is not None:
            inputs = self._chronological(self._inputs)[self._chronological(self._has_row)]
        return VariantEvidence(
            version=self.version,
            requests=self._requests,
            errors=self._errors,
            routed=self._routed,
            latency_threshold=self._threshold,
            latency_rows=None if self._threshold_rows == _ANY_SIZE else self._threshold_rows,
            since_threshold=self._since_threshold,
            over_threshold=self._over_threshold,
            labelled=self._labelled,
            correct=self._correct,
            compared=self._compared,
            agreed=self._agreed,
            latencies=self._chronological(self._latency),
            rows=self._chronological(self._rows),
            inputs=inputs,
        )

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the admin API and the demo; latencies in seconds."""
        ev = self.evidence()
        p50, p95, p99 = (
            (float(q) for q in np.percentile(ev.latencies, (50, 95, 99)))
            if ev.latencies.size
            else (None, None, None)
        )
        per_row = ev.latencies / ev.rows
        row_p50, row_p99 = (
            (float(q) for q in np.percentile(per_row, (50, 99))) if per_row.size else (None, None)
        )
        return {
            "version": self.version,
            "requests": ev.requests,
            "errors": ev.errors,
            "error_rate": ev.error_rate,
            "routed": ev.routed,
            "window": int(ev.latencies.size),
            "latency_p50": p50,
            "latency_p95": p95,
            "latency_p99": p99,
            "latency_per_row_p50": row_p50,
            "latency_per_row_p99": row_p99,
            "rows_p50": float(np.median(ev.rows)) if ev.rows.size else None,
            "labelled": ev.labelled,
            "accuracy": ev.accuracy,
            "compared": ev.compared,
            "agreement": ev.agreement,
        }


class Windows:
    """The per-(model, version) ring buffers; sized by the rollout that watches them."""

    def __init__(self, default_size: int, tolerance: float) -> None:
        self._default = default_size
        self._tol = tolerance
        self._windows: dict[tuple[str, str], VariantWindow] = {}

    def get(self, model: str, version: str) -> VariantWindow:
        window = self._windows.get((model, version))
        if window is None:
            window = VariantWindow(version, self._default, tol=self._tol)
            self._windows[(model, version)] = window
        return window

    def ensure(
        self, model: str, version: str, size: int, input_width: int | None = None
    ) -> VariantWindow:
        """The window, recreated when a rollout asks for another size or input width."""
        window = self._windows.get((model, version))
        if window is None or window.size != size or window.input_width != input_width:
            window = VariantWindow(version, size, input_width=input_width, tol=self._tol)
            self._windows[(model, version)] = window
        return window
