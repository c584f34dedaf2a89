"""Per-variant ring-buffer windows and counters (labels reach them through the feedback
index, proxy/feedback.py, which remembers each request's predictions).

Owned by the event loop: `record` and friends run on the request path without locks;
`evidence()` is the one allocating call, made by the policy loop every few seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import numpy as np

from rollguard.policy.evidence import VariantEvidence
from rollguard.proxy.keysets import KeySet
from rollguard.serving.prediction import Predicted, is_missing, matches

_ANY_SIZE = 2**32 - 1  # the largest row count kept (uint32); "no size limit"
# Every reset of every window gets its own generation, so a label for a request recorded
# before a reset (or in a window since replaced) is told apart from a current one.
_GENERATIONS = itertools.count(1)


class Outcome(IntEnum):
    """How a routed request ended; bad input is never recorded at all.

    Latency is about answers. A MODEL_ERROR's time says how fast a version fails, not how
    fast it answers: it counts in the error rate only, never against a latency threshold
    nor in the latency percentiles (fast failures would hide a slow model, slow ones
    would blame its latency for its errors; the error latency is reported on its own).
    A TIMEOUT (a deadline, a full bulkhead) is an answer that came too late: it counts
    in both, as a request slower than any threshold below its deadline."""

    OK = 0
    MODEL_ERROR = 1
    TIMEOUT = 2


_FAILED = Outcome.MODEL_ERROR.value


class VariantWindow:
    """The last `size` requests of one version, plus counters since the last reset.

    Slot `seq % size` holds record `seq`. Counters cover every record since `reset()`
    even after the window has wrapped; labels are counted whenever they arrive, as long
    as their request was recorded in the current generation (since the last reset).
    """

    def __init__(
        self,
        version: str,
        size: int,
        *,
        input_width: int | None = None,
        tol: float = 0.0,
        bad_keys: tuple[KeySet, KeySet] | None = None,
    ) -> None:
        """`bad_keys`: the keys that already had an error, and a slow request, since the
        counters were reset; shared by the windows of one model's versions (a key moves
        from stable to candidate when the weight rises, and counts once)."""
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
        self._inputs = None if input_width is None else np.zeros((size, input_width), np.float32)
        self._has_row = None if input_width is None else np.zeros(size, dtype=np.bool_)
        self._next = 0  # the seq the next record gets; never reset
        self.generation = 0  # set by reset(): labels of older requests are not counted
        self._threshold: float | None = None
        self._threshold_rows: int = _ANY_SIZE  # larger requests are not counted against it
        self._tolerance: float | None = None
        self._over_tolerance = 0
        self._bad_keys = bad_keys or (KeySet(), KeySet())
        self._seen_keys = KeySet()  # routed since the split changed (sample-ratio checks)
        self.reset()
        self.reset_routed()

    def reset(self) -> None:
        """Zero the counters (a rollout begins); the recent samples stay."""
        self.generation = next(_GENERATIONS)
        self._requests = self._errors = 0
        # Per configured candidate weight at routing time: [requests, errors, requests
        # counted against the latency threshold, of those slower, keys' first errors,
        # keys' first slow requests] (policy/conditional.py; a request without a key is
        # its own key).
        self._strata: dict[float, list[int]] = {}
        for keys in self._bad_keys:
            keys.clear()
        self._labelled = self._correct = self._labelled_requests = 0
        # Per configured candidate weight when the labelled request was routed: [rows
        # labelled, of those correct] (the accuracy test compares the arms per weight).
        self._label_strata: dict[float, list[int]] = {}
        self._compared = self._agreed = 0
        self._since_threshold = self._over_threshold = self._over_tolerance = 0

    def reset_routed(self) -> None:
        """Zero the routed counts: the split weights just changed (sample-ratio checks)."""
        self._routed = self._routed_units = 0
        self._seen_keys.clear()

    def set_latency_threshold(
        self, seconds: float | None, rows: int | None = None, tolerance: float | None = None
    ) -> None:
        """Count requests slower than `seconds` from now on (None stops counting), among
        requests of at most `rows` rows (None: of any size), and of those the ones slower
        than `tolerance` (a latency check's ratio × seconds, which PASS tests against).

        The threshold was frozen from the stable's requests of at most `rows` rows (the
        stable's median batch size, policy/checks.py `latency_rows`): a larger request
        is neither slow nor fast by it, so a client sending huge batches to one variant
        can neither make it look slow nor hide that it is."""
        self._threshold = seconds
        self._threshold_rows = _ANY_SIZE if rows is None else rows
        self._tolerance = None if seconds is None else tolerance
        self._since_threshold = self._over_threshold = self._over_tolerance = 0
        for counts in self._strata.values():
            counts[2] = counts[3] = counts[5] = 0
        self._bad_keys[1].clear()

    def count_routed(self, key: str | None = None) -> None:
        """One request routed here; `key`: its stickiness key, when the split hashed one.

        A sticky split randomises keys, not requests, so sample-ratio checks count units:
        each key the first time it is routed here since the split changed, and each
        request without a key (proxy/keysets.py)."""
        self._routed += 1
        if key is None or self._seen_keys.add(key):
            self._routed_units += 1

    def record(
        self,
        latency_s: float,
        outcome: int,
        *,
        row: np.ndarray | None = None,
        rows: int = 1,
        share: float = 0.0,
        key: str | None = None,
    ) -> int:
        """Store one completed request of `rows` rows (`row`: its first input row, for
        drift); returns its sequence number. `share`: the candidate's configured percent
        when the request was routed (0 when its share failed over to the stable, or for
        a mirrored copy): the stratum the conditional tests count it in. `key`: its
        stickiness key when the split hashed one (None: the request is its own unit)."""
        seq = self._next
        self._next = seq + 1
        i = seq % self.size
        self._latency[i] = latency_s
        self._outcome[i] = outcome
        if not 1 <= rows < _ANY_SIZE:  # an empty batch is one request's worth of rows
            rows = 1 if rows < 1 else _ANY_SIZE
        self._rows[i] = rows
        if self._inputs is not None and self._has_row is not None:
            self._has_row[i] = row is not None
            if row is not None:
                self._inputs[i] = row
        self._requests += 1
        stratum = self._strata.get(share)
        if stratum is None:
            stratum = self._strata[share] = [0, 0, 0, 0, 0, 0]
        stratum[0] += 1
        if outcome:
            self._errors += 1
            stratum[1] += 1
            if key is None or self._bad_keys[0].add(key):
                stratum[4] += 1
        threshold = self._threshold
        if threshold is not None and rows <= self._threshold_rows and outcome != _FAILED:
            self._since_threshold += 1
            stratum[2] += 1
            if self._tolerance is not None and latency_s > self._tolerance:
                self._over_tolerance += 1
            if latency_s > threshold:
                self._over_threshold += 1
                stratum[3] += 1
                if key is None or self._bad_keys[1].add(key):
                    stratum[5] += 1
        return seq

    def label(
        self,
        generation: int,
        predictions: Sequence[Predicted],
        labels: Sequence[Predicted],
        share: float | None = None,
    ) -> tuple[int, int]:
        """Count one request's labels, a label per row against the row's prediction as the
        request was answered: (rows counted, rows correct). `share`: the candidate's
        configured percent when the request was routed (as `record` took it), the weight
        stratum the labels count in; None: not known (counted in the totals only).

        Rows without a prediction count nothing (an answer holding no prediction there),
        and neither does a request from an older generation (recorded before the last
        reset: its labels belong to an earlier rollout)."""
        counted = correct = 0
        for prediction, label in zip(predictions, labels, strict=True):
            if not is_missing(prediction):
                counted += 1
                correct += matches(prediction, label, self.tol)
        if generation != self.generation:
            return counted, correct
        if counted:
            self._labelled_requests += 1
            self._labelled += counted
            self._correct += correct
            if share is not None:
                stratum = self._label_strata.setdefault(share, [0, 0])
                stratum[0] += counted
                stratum[1] += correct
        return counted, correct

    def record_comparison(self, agreed: int, compared: int = 1) -> None:
        """A shadow answer was compared with the primary's: `agreed` of `compared` rows
        gave the same prediction."""
        self._compared += compared
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
        """A snapshot for the policy engine (copies the window; not for the hot path).
        Its latencies and rows are the recent requests that answered or timed out, not
        the model errors (Outcome)."""
        answered = self._chronological(self._outcome) != _FAILED
        inputs = None
        if self._inputs is not None and self._has_row is not None:
            inputs = self._chronological(self._inputs)[self._chronological(self._has_row)]
        return VariantEvidence(
            version=self.version,
            requests=self._requests,
            errors=self._errors,
            routed=self._routed,
            routed_units=self._routed_units,
            latency_threshold=self._threshold,
            latency_rows=None if self._threshold_rows == _ANY_SIZE else self._threshold_rows,
            since_threshold=self._since_threshold,
            over_threshold=self._over_threshold,
            latency_tolerance=self._tolerance,
            over_tolerance=self._over_tolerance,
            labelled=self._labelled,
            correct=self._correct,
            labelled_requests=self._labelled_requests,
            compared=self._compared,
            agreed=self._agreed,
            strata=tuple(
                (w, n[0], n[1], n[2], n[3], n[4], n[5]) for w, n in sorted(self._strata.items())
            ),
            label_strata=tuple((w, n[0], n[1]) for w, n in sorted(self._label_strata.items())),
            latencies=self._chronological(self._latency)[answered],
            rows=self._chronological(self._rows)[answered],
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
        failed = self._chronological(self._latency)[self._chronological(self._outcome) == _FAILED]
        return {
            "version": self.version,
            "requests": ev.requests,
            "errors": ev.errors,
            "error_rate": ev.error_rate,
            "routed": ev.routed,
            "window": min(self._next, self.size),
            "latency_p50": p50,
            "latency_p95": p95,
            "latency_p99": p99,
            "latency_per_row_p50": row_p50,
            "latency_per_row_p99": row_p99,
            # How fast the recent model errors failed (Outcome: not in the percentiles above).
            "error_latency_p99": float(np.percentile(failed, 99)) if failed.size else None,
            "rows_p50": float(np.median(ev.rows)) if ev.rows.size else None,
            "labelled": ev.labelled,
            "labelled_requests": ev.labelled_requests,
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
        self._bad_keys: dict[str, tuple[KeySet, KeySet]] = {}

    def _keys(self, model: str) -> tuple[KeySet, KeySet]:
        """The model's keys with an error / a slow request, shared by its versions."""
        return self._bad_keys.setdefault(model, (KeySet(), KeySet()))

    def get(self, model: str, version: str) -> VariantWindow:
        window = self._windows.get((model, version))
        if window is None:
            window = VariantWindow(version, self._default, tol=self._tol,
                                   bad_keys=self._keys(model))  # fmt: skip
            self._windows[(model, version)] = window
        return window

    def ensure(
        self, model: str, version: str, size: int, input_width: int | None = None
    ) -> VariantWindow:
        """The window, recreated when a rollout asks for another size or input width."""
        window = self._windows.get((model, version))
        if window is None or window.size != size or window.input_width != input_width:
            window = VariantWindow(version, size, input_width=input_width, tol=self._tol,
                                   bad_keys=self._keys(model))  # fmt: skip
            self._windows[(model, version)] = window
        return window
