"""Mergeable summaries of a variant's window: what one process sends the fleet's decider.

A VariantSummary holds, for one version in one rollout generation, the counts the checks
test (requests, errors, labelled/correct, compared/agreed), the sample-ratio counts per
split weight, the latency-threshold counts per frozen threshold, the per-weight strata of
the conditional tests (policy/conditional.py), and a latency histogram per request size.
`merge` adds them; it is associative and commutative with `empty` as its identity, so
the decider can merge the latest summary of every live process in any order, and merging
the summaries of two processes gives exactly the summary one process would have made of
both streams (tests/policy/test_summary.py checks all of it).

Keys that processes may disagree on for a moment are kept apart, never mixed: routed
counts by the weight they were routed under (the split changes on every process within
a second of each other, not at once), threshold counts by the threshold they were
counted against. `to_evidence` takes the part that matches the decider's state.

The latency histogram has log-spaced buckets of 1 % relative width (DDSketch's mapping),
so a percentile of the merged histogram is within 1 % of the same percentile of the
pooled latencies; request sizes are exact up to 64 rows, then powers of two.

Labels are kept per weight their request was routed under (the accuracy comparison is
within weights, policy/sequential.py). For drift, a rollout that records input rows
sends its newest INPUT_SAMPLE rows (float32); merging pools the processes' rows, kept
sorted so that the merge is commutative (PSI and KS do not depend on row order). Rows
whose width is not the reference's are left out of the merge (`fleet_evidence`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rollguard.policy.evidence import Evidence, VariantEvidence

RELATIVE_ACCURACY = 0.01
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
MIN_LATENCY_S = 1e-6  # faster requests share the lowest bucket
EXACT_ROWS = 64  # request sizes above this are rounded up to a power of two
INPUT_SAMPLE = 1000  # newest input rows a process sends for drift, per variant

Threshold = tuple[float, int | None]  # a frozen latency threshold: seconds, rows counted


def _add(a: Mapping[Any, int], b: Mapping[Any, int]) -> dict[Any, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _add_pairs(
    a: Mapping[Any, tuple[int, int]], b: Mapping[Any, tuple[int, int]]
) -> dict[Any, tuple[int, int]]:
    out = dict(a)
    for k, (x, y) in b.items():
        had_x, had_y = out.get(k, (0, 0))
        out[k] = (had_x + x, had_y + y)
    return out


@dataclass(frozen=True, slots=True)
class VariantSummary:
    """One variant's counts and latency histogram, as one process (or several) saw them."""

    version: str
    generation: int  # the rollout generation the counts began with (windows reset then)
    requests: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    labelled_requests: int = 0
    compared: int = 0
    agreed: int = 0
    routed: Mapping[float, int] = field(default_factory=dict)  # weight -> routed requests
    # (threshold seconds, rows) -> (requests counted, of those slower than the threshold)
    exceedances: Mapping[Threshold, tuple[int, int]] = field(default_factory=dict)
    # Strata by the candidate weight a request was routed under: weight -> (requests,
    # errors), and (threshold seconds, rows, weight) -> (counted, slower).
    strata: Mapping[float, tuple[int, int]] = field(default_factory=dict)
    strata_exceedances: Mapping[tuple[float, int | None, float], tuple[int, int]] = field(
        default_factory=dict
    )
    latency: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (rows, bucket) -> n
    # Labels by the weight their request was routed under: weight -> (rows labelled, correct).
    label_strata: Mapping[float, tuple[int, int]] = field(default_factory=dict)
    # Input rows for drift: float32, C order, rows sorted; `input_width` 0 when none.
    inputs: bytes = b""
    input_width: int = 0

    @classmethod
    def empty(cls, version: str, generation: int) -> VariantSummary:
        return cls(version, generation)

    @classmethod
    def of(cls, evidence: VariantEvidence, *, generation: int, weight: float) -> VariantSummary:
        """The summary of one process's evidence; `weight` is the split it routed under."""
        exceedances: dict[Threshold, tuple[int, int]] = {}
        strata_exceedances: dict[tuple[float, int | None, float], tuple[int, int]] = {}
        threshold = evidence.latency_threshold
        if threshold is not None:
            key = (float(threshold), evidence.latency_rows)
            exceedances[key] = (evidence.since_threshold, evidence.over_threshold)
            for w, _, _, since, over, *_ in evidence.strata:
                strata_exceedances[(*key, float(w))] = (since, over)
        return cls(
            version=evidence.version,
            generation=generation,
            requests=evidence.requests,
            errors=evidence.errors,
            labelled=evidence.labelled,
            correct=evidence.correct,
            labelled_requests=evidence.labelled_requests,
            compared=evidence.compared,
            agreed=evidence.agreed,
            routed={float(weight): evidence.routed} if evidence.routed else {},
            exceedances=exceedances,
            strata={float(w): (n, e) for w, n, e, *_ in evidence.strata},
            strata_exceedances=strata_exceedances,
            latency=_histogram(evidence.latencies, evidence.rows),
            label_strata={float(w): (n, ok) for w, n, ok in evidence.label_strata},
            **_packed(evidence.inputs),
        )

    def input_rows(self) -> np.ndarray | None:
        """The input rows (2-D float32), or None when there are none."""
        if not self.input_width:
            return None
        return np.frombuffer(self.inputs, dtype="<f4").reshape(-1, self.input_width)

    def without_inputs(self) -> VariantSummary:
        return replace(self, inputs=b"", input_width=0)

    def merge(self, other: VariantSummary) -> VariantSummary:
        """Both summaries' counts together; ValueError for another version or generation."""
        if (self.version, self.generation) != (other.version, other.generation):
            raise ValueError(
                f"cannot merge the summary of version {other.version!r} generation "
                f"{other.generation} into version {self.version!r} generation {self.generation}"
            )
        if self.input_width and other.input_width and self.input_width != other.input_width:
            raise ValueError(
                f"cannot merge input rows {other.input_width} wide into rows "
                f"{self.input_width} wide (version {self.version!r})"
            )
        return VariantSummary(
            version=self.version,
            generation=self.generation,
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            labelled=self.labelled + other.labelled,
            correct=self.correct + other.correct,
            labelled_requests=self.labelled_requests + other.labelled_requests,
            compared=self.compared + other.compared,
            agreed=self.agreed + other.agreed,
            routed=_add(self.routed, other.routed),
            exceedances=_add_pairs(self.exceedances, other.exceedances),
            strata=_add_pairs(self.strata, other.strata),
            strata_exceedances=_add_pairs(self.strata_exceedances, other.strata_exceedances),
            latency=_add(self.latency, other.latency),
            label_strata=_add_pairs(self.label_strata, other.label_strata),
            **_pooled(self, other),
        )

    def to_evidence(self, *, weight: float, threshold: Threshold | None) -> VariantEvidence:
        """The evidence the checks read: counts routed under `weight`, latency counts
        against `threshold` (the decider's frozen one), recent latencies from the
        histogram (each at its bucket's centre, within 1 % of what was measured)."""
        since, over = (0, 0) if threshold is None else self.exceedances.get(threshold, (0, 0))
        # Keys' first bad events are not summarised (each process sees its own keys): in
        # fleet mode every bad event is its own unit (policy/checks.py `_strata`).
        strata = tuple(
            (w, n, e, since_w, over_w, e, over_w)
            for w, (n, e) in sorted(self.strata.items())
            for since_w, over_w in (self._stratum_exceedances(threshold, w),)
        )
        cells = sorted(self.latency.items())
        counts = np.array([n for _, n in cells], dtype=np.int64)
        rows = np.repeat(np.array([r for (r, _), _ in cells], dtype=np.uint32), counts)
        values = np.array([_centre(b) for (_, b), _ in cells], dtype=np.float64)
        return VariantEvidence(
            version=self.version,
            requests=self.requests,
            errors=self.errors,
            routed=self.routed.get(float(weight), 0),
            latency_threshold=None if threshold is None else threshold[0],
            latency_rows=None if threshold is None else threshold[1],
            since_threshold=since,
            over_threshold=over,
            labelled=self.labelled,
            correct=self.correct,
            labelled_requests=self.labelled_requests,
            compared=self.compared,
            agreed=self.agreed,
            strata=strata,
            label_strata=tuple((w, n, ok) for w, (n, ok) in sorted(self.label_strata.items())),
            latencies=np.repeat(values, counts),
            rows=rows,
            inputs=self.input_rows(),
        )

    def _stratum_exceedances(self, threshold: Threshold | None, weight: float) -> tuple[int, int]:
        if threshold is None:
            return (0, 0)
        return self.strata_exceedances.get((*threshold, weight), (0, 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "generation": self.generation,
            "requests": self.requests,
            "errors": self.errors,
            "labelled": self.labelled,
            "correct": self.correct,
            "labelled_requests": self.labelled_requests,
            "compared": self.compared,
            "agreed": self.agreed,
            "routed": [[w, n] for w, n in sorted(self.routed.items())],
            "exceedances": [
                [t, r, s, o] for (t, r), (s, o) in sorted(self.exceedances.items(), key=str)
            ],
            "strata": [[w, n, e] for w, (n, e) in sorted(self.strata.items())],
            "strata_exceedances": [
                [t, r, w, s, o]
                for (t, r, w), (s, o) in sorted(self.strata_exceedances.items(), key=str)
            ],
            "latency": [[r, b, n] for (r, b), n in sorted(self.latency.items())],
            "label_strata": [[w, n, ok] for w, (n, ok) in sorted(self.label_strata.items())],
            "inputs": base64.b64encode(self.inputs).decode("ascii"),
            "input_width": self.input_width,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> VariantSummary:
        """ValueError (naming the field) for anything but what to_json writes."""
        try:
            summary = cls(
                version=str(doc["version"]),
                generation=_count(doc["generation"]),
                requests=_count(doc["requests"]),
                errors=_count(doc["errors"]),
                labelled=_count(doc["labelled"]),
                correct=_count(doc["correct"]),
                labelled_requests=_count(doc["labelled_requests"]),
                compared=_count(doc["compared"]),
                agreed=_count(doc["agreed"]),
                routed={float(w): _count(n) for w, n in doc["routed"]},
                exceedances={
                    (float(t), None if r is None else _count(r)): (_count(s), _count(o))
                    for t, r, s, o in doc["exceedances"]
                },
                strata={float(w): (_count(n), _count(e)) for w, n, e in doc["strata"]},
                strata_exceedances={
                    (float(t), None if r is None else _count(r), float(w)): (_count(s), _count(o))
                    for t, r, w, s, o in doc["strata_exceedances"]
                },
                latency={(_count(r), _integer(b)): _count(n) for r, b, n in doc["latency"]},
                label_strata={
                    float(w): (_count(n), _count(ok)) for w, n, ok in doc["label_strata"]
                },
                **_inputs(doc["inputs"], doc["input_width"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a variant summary: {exc!r}") from exc
        return summary


def merge_all(summaries: Iterable[VariantSummary], version: str, generation: int) -> VariantSummary:
    """The merge of every summary of (`version`, `generation`); others are left out."""
    total = VariantSummary.empty(version, generation)
    for s in summaries:
        if (s.version, s.generation) == (version, generation):
            total = total.merge(s)
    return total


def fleet_evidence(
    summaries: Iterable[VariantSummary],
    *,
    stable: str,
    candidate: str,
    generation: int,
    weight: float,
    threshold: Threshold | None,
    reference: np.ndarray | None = None,
    srm_pvalue_before: float = 1.0,
) -> Evidence:
    """The evidence a decider checks: every process's summaries of this generation merged,
    read at the decider's weight and frozen threshold. Input rows count for drift only
    where they are as wide as the reference (none without one)."""
    width = None if reference is None else reference.reshape(len(reference), -1).shape[1]
    found = [s if s.input_width in (0, width) else s.without_inputs() for s in summaries]
    return Evidence(
        stable=merge_all(found, stable, generation).to_evidence(weight=weight, threshold=threshold),
        candidate=merge_all(found, candidate, generation).to_evidence(
            weight=weight, threshold=threshold
        ),
        candidate_weight=weight,
        reference=reference,
        srm_pvalue_before=srm_pvalue_before,
    )


def _histogram(latencies: np.ndarray, rows: np.ndarray) -> dict[tuple[int, int], int]:
    if latencies.size == 0:
        return {}
    buckets = np.ceil(np.log(np.maximum(latencies, MIN_LATENCY_S)) / _LOG_GAMMA).astype(np.int64)
    sizes = rows.astype(np.int64) if rows.size == latencies.size else np.ones_like(buckets)
    sizes = np.maximum(sizes, 1)
    big = sizes > EXACT_ROWS
    sizes[big] = 2 ** np.ceil(np.log2(sizes[big])).astype(np.int64)
    cells, counts = np.unique(np.stack((sizes, buckets), axis=1), axis=0, return_counts=True)
    return {(int(r), int(b)): int(n) for (r, b), n in zip(cells, counts, strict=True)}


def _centre(bucket: int) -> float:
    """The value within 1 % of every latency in `bucket` (γ^(i-1), γ^i]."""
    return 2 * _GAMMA**bucket / (_GAMMA + 1)


def _packed(inputs: np.ndarray | None) -> dict[str, Any]:
    """The newest INPUT_SAMPLE rows as the summary's fields, sorted."""
    if inputs is None or inputs.size == 0:
        return {"inputs": b"", "input_width": 0}
    rows = np.asarray(inputs, dtype="<f4").reshape(len(inputs), -1)[-INPUT_SAMPLE:]
    return {"inputs": _sorted_rows(rows).tobytes(), "input_width": rows.shape[1]}


def _pooled(a: VariantSummary, b: VariantSummary) -> dict[str, Any]:
    """Both summaries' input rows, sorted: the same bytes whatever the order of merging."""
    if not b.input_width:
        return {"inputs": a.inputs, "input_width": a.input_width}
    if not a.input_width:
        return {"inputs": b.inputs, "input_width": b.input_width}
    mine, theirs = a.input_rows(), b.input_rows()
    assert mine is not None and theirs is not None  # both have a width
    rows = np.concatenate([mine, theirs])
    return {"inputs": _sorted_rows(rows).tobytes(), "input_width": a.input_width}


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Rows in lexicographic order of their bytes: a canonical order for any multiset.
    (Ordered by the bit patterns, so -0.0 and 0.0 or NaNs of different payloads stay
    distinct rows and the order is total.)"""
    keys = np.ascontiguousarray(rows, dtype="<f4").view(np.uint32)
    order = np.lexsort(keys.T[::-1]) if len(keys) else np.empty(0, dtype=np.intp)
    return np.ascontiguousarray(rows[order], dtype="<f4")


def _inputs(text: object, width: object) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ValueError(f"inputs: expected base64 text, got {text!r}")
    raw = base64.b64decode(text, validate=True)
    columns = _count(width)
    if bool(raw) != bool(columns) or (columns and len(raw) % (4 * columns)):
        raise ValueError(f"inputs: {len(raw)} bytes are not rows of {columns} float32")
    return {"inputs": raw, "input_width": columns}


def _count(value: object) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return number


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
