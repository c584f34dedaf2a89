"""Per-version inference statistics in the shape of Triton's statistics extension.

`GET /v2/models/{model}[/versions/{version}]/stats` (and `/v2/models/stats` for all)
answer `{"model_stats": [...]}`, one object per version that has answered, as
`tritonclient`'s `get_inference_statistics` reads it from Triton:

    {"name", "version", "last_inference" (ms since the epoch), "inference_count" (rows),
     "execution_count" (calls), "inference_stats": {"success", "fail", "queue",
     "compute_input", "compute_infer", "compute_output"} each {"count", "ns"},
     "batch_stats": [{"batch_size", "compute_input", "compute_infer", "compute_output"}]}

What rollguard measures for each phase of a request to a version:
- `compute_input`: reading the request (decoding the body, checking it);
- `queue`: waiting for a slot of the version's own bulkhead (serving/bulkhead.py: its
  `version_concurrency` calls run at once, up to `version_queue` more wait), 0 when a
  slot was free, plus, for a version with `batching`, waiting for its batch to start
  (serving/batching.py, up to `max_delay_ms`);
- `compute_infer`: the version's call as routing makes it, after its queue;
- `compute_output`: encoding the answer;
- `success`: all of it, for requests the version answered; `fail`: the same for those
  that failed in the version (its error, timeout or upstream failure). A request refused
  before it reached a version (bad input, unknown model) is no version's inference.
Every call counts, routed or pinned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

MAX_BATCH_SIZES = 32  # distinct batch sizes tracked per version; more go to the largest


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class _Phases:
    """Compute input, infer and output of the answered requests, one count for the three
    (each answered request adds to all three at once)."""

    __slots__ = ("count", "infer_ns", "input_ns", "output_ns")

    def __init__(self) -> None:
        self.count = 0
        self.input_ns = 0
        self.infer_ns = 0
        self.output_ns = 0

    def json(self) -> dict[str, Any]:
        count = self.count
        return {
            "compute_input": {"count": count, "ns": self.input_ns},
            "compute_infer": {"count": count, "ns": self.infer_ns},
            "compute_output": {"count": count, "ns": self.output_ns},
        }


class VersionStats:
    """One version's counts and durations since the gateway started.

    Only an answered request adds to `success`, `queue`, the phases and the executions,
    each once: one count (`phases.count`) stands for all of them, bumped once a request."""

    __slots__ = ("batches", "fail", "last_ns", "phases", "queue_ns", "rows", "success_ns")

    def __init__(self) -> None:
        self.success_ns = 0
        self.fail = _Duration()
        self.queue_ns = 0
        self.phases = _Phases()
        self.batches: dict[int, _Phases] = {}
        self.rows = 0
        self.last_ns = 0  # ms in the report: divided there, not per request

    def json(self, model: str, version: str) -> dict[str, Any]:
        answered = self.phases.count
        return {
            "name": model,
            "version": version,
            "last_inference": self.last_ns // 1_000_000,
            "inference_count": self.rows,
            "execution_count": answered,
            "inference_stats": {
                "success": {"count": answered, "ns": self.success_ns},
                "fail": self.fail.json(),
                "queue": {"count": answered, "ns": self.queue_ns},
                **self.phases.json(),
            },
            "batch_stats": [
                {"batch_size": size, **phases.json()}
                for size, phases in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class Statistics:
    """Every version's `VersionStats`, recorded on the request path (event loop only)."""

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns  # last_inference is a wall-clock time, as Triton's
        self._versions: dict[tuple[str, str], VersionStats] = {}

    def _of(self, model: str, version: str) -> VersionStats:
        found = self._versions.get((model, version))
        if found is None:
            found = self._versions[(model, version)] = VersionStats()
        return found

    def succeeded(
        self,
        model: str,
        version: str,
        rows: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        queue_ns: int = 0,
    ) -> None:
        """One answered request; `infer_ns` is the version's call as routing made it, of
        which `queue_ns` waiting for a slot of the version (InferRequest.queue_ns)."""
        # On every answered request: the counters are bumped inline, not a method call each.
        stats = self._versions.get((model, version)) or self._of(model, version)
        stats.success_ns += input_ns + infer_ns + output_ns
        stats.queue_ns += queue_ns
        infer_ns -= queue_ns  # Triton's compute_infer excludes the queue
        phases = stats.phases
        phases.count += 1
        phases.input_ns += input_ns
        phases.infer_ns += infer_ns
        phases.output_ns += output_ns
        batches = stats.batches
        batch = batches.get(rows)
        if batch is None:
            if len(batches) >= MAX_BATCH_SIZES:
                rows = max(batches)
            batch = batches.setdefault(rows, _Phases())
        batch.count += 1
        batch.input_ns += input_ns
        batch.infer_ns += infer_ns
        batch.output_ns += output_ns
        stats.rows += rows
        stats.last_ns = self._wall_ns()

    def failed(self, model: str, version: str, ns: int) -> None:
        stats = self._of(model, version)
        stats.fail.add(ns)
        stats.last_ns = self._wall_ns()

    def report(self, versions: Iterable[tuple[str, str]]) -> dict[str, Any]:
        """The `{"model_stats": [...]}` document for these (model, version) pairs, in
        order; a version that has not answered yet has zero counts."""
        empty = VersionStats()
        return {"model_stats": [self._versions.get((m, v), empty).json(m, v) for m, v in versions]}
