"""The numbers a rollout decision is made from: per-variant counts and recent samples.

The gateway's windows produce these; the policy package only reads them, so every
check and decision can be tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

StratumRow = tuple[float, int, int, int, int, int, int]
LabelRow = tuple[float, int, int]  # weight, rows labelled, of those correct


@dataclass(frozen=True, slots=True)
class VariantEvidence:
    """One variant's record since the rollout began (counts) plus its recent window.

    Counts are cumulative since the rollout (candidate) began, which is what an
    always-valid sequential test needs; the arrays are the recent ring-buffer window,
    for percentiles and reports.
    """

    version: str
    requests: int = 0  # completed routed requests
    errors: int = 0  # of those, model errors and timeouts (never bad input)
    routed: int = 0  # requests routed here since the split weights last changed (for SRM)
    # Randomisation units routed here since then: keys seen for the first time, and
    # requests without a key (None: not counted, SRM counts requests).
    routed_units: int | None = None
    latency_threshold: float | None = None  # seconds; frozen by the engine, see checks
    latency_rows: int | None = None  # requests above this many rows are not counted against it
    since_threshold: int = 0  # completed requests since the threshold was set
    over_threshold: int = 0  # of those, slower than the threshold
    latency_tolerance: float | None = None  # seconds: ratio × threshold, for PASS
    over_tolerance: int = 0  # of since_threshold, slower than the tolerance
    labelled: int = 0  # rows whose feedback label arrived (a batch's rows each count)
    correct: int = 0  # of those, predicted correctly
    labelled_requests: int = 0  # requests that had labels (the label rate's numerator)
    compared: int = 0  # shadow: rows compared with the primary's answer
    agreed: int = 0  # of those, the same answer
    # Per configured candidate weight at routing time (0: failed over or mirrored):
    # (weight, requests, errors, since_threshold, over_threshold, error_units,
    # slow_units), for the conditional tests (policy/conditional.py); units are keys'
    # first errors / slow requests (a request without a key is its own key). Empty: not
    # known, the totals form one stratum.
    strata: tuple[StratumRow, ...] = ()
    # Labels per configured candidate weight when their request was routed: (weight,
    # rows labelled, correct), for the accuracy comparison within weights. Empty, or
    # not summing to labelled / correct (labels of an earlier process): not known.
    label_strata: tuple[LabelRow, ...] = ()
    latencies: np.ndarray = field(default_factory=lambda: np.empty(0))  # seconds, recent
    # Each recent request's batch size (rows), aligned with `latencies`; empty: not known.
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint32))
    inputs: np.ndarray | None = None  # recent input rows (2-D) for drift, when recorded

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def percentile(self, q: float, rows: int | None = None) -> float | None:
        """The q-th latency percentile of the recent window, in seconds: of its requests
        of at most `rows` rows when given."""
        latencies = self.latencies_up_to(rows)
        return float(np.percentile(latencies, q)) if latencies.size else None

    def latencies_up_to(self, rows: int | None) -> np.ndarray:
        """The recent latencies of requests of at most `rows` rows (None, or sizes not
        recorded: all of them)."""
        if rows is None or self.rows.size != self.latencies.size:
            return self.latencies
        return self.latencies[self.rows <= rows]


@dataclass(frozen=True, slots=True)
class Evidence:
    """Both sides of a rollout at one instant, plus what the split should look like."""

    stable: VariantEvidence
    candidate: VariantEvidence
    candidate_weight: float  # configured percent of traffic to the candidate
    reference: np.ndarray | None = None  # training-input sample for drift, 2-D
    # The smallest sequential SRM p-value seen before at this split (RolloutState.srm_pvalue):
    # the always-valid p-value is the running minimum, not the latest look.
    srm_pvalue_before: float = 1.0
