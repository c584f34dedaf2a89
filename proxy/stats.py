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
    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()

    def add(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def json(self) -> dict[str, Any]:
        return {
            "compute_input": self.compute_input.json(),
            "compute_infer": self.compute_infer.json(),
            "compute_output": self.compute_output.json(),
        }


class VersionStats:
    """One version's counts and durations since the gateway started."""

    __slots__ = ("batches", "executions", "fail", "last_ms", "phases", "queue", "rows", "success")

    def __init__(self) -> None:
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.phases = _Phases()
        self.batches: dict[int, _Phases] = {}
        self.rows = 0
        self.executions = 0
        self.last_ms = 0

    def json(self, model: str, version: str) -> dict[str, Any]:
        return {
            "name": model,
            "version": version,
            "last_inference": self.last_ms,
            "inference_count": self.rows,
            "execution_count": self.executions,
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
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

    def __init__(self, wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._wall_ms = wall_ms  # last_inference is a wall-clock time, as Triton's
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
        success = stats.success
        success.count += 1
        success.ns += input_ns + infer_ns + output_ns
        stats.queue.count += 1
        stats.queue.ns += queue_ns
        infer_ns -= queue_ns  # Triton's compute_infer excludes the queue
        batches = stats.batches
        phases = batches.get(rows)
        if phases is None:
            if len(batches) >= MAX_BATCH_SIZES:
                rows = max(batches)
            phases = batches.setdefault(rows, _Phases())
        for p in (stats.phases, phases):
            p.compute_input.count += 1
            p.compute_input.ns += input_ns
            p.compute_infer.count += 1
            p.compute_infer.ns += infer_ns
            p.compute_output.count += 1
            p.compute_output.ns += output_ns
        stats.rows += rows
        stats.executions += 1
        stats.last_ms = self._wall_ms()

    def failed(self, model: str, version: str, ns: int) -> None:
        stats = self._of(model, version)
        stats.fail.add(ns)
        stats.last_ms = self._wall_ms()

    def report(self, versions: Iterable[tuple[str, str]]) -> dict[str, Any]:
        """The `{"model_stats": [...]}` document for these (model, version) pairs, in
        order; a version that has not answered yet has zero counts."""
        empty = VersionStats()
        return {"model_stats": [self._versions.get((m, v), empty).json(m, v) for m, v in versions]}
