"""Fire-and-forget shadow traffic: tracked tasks behind a bounded queue, shed under load.

Like Envoy's request mirroring, the client never waits for a shadow: `admit` and `start`
return at once. Two things bound what shadows may cost the primaries:

- a copy that does not fit the queue is dropped and counted (`dropped`), never queued
  without bound;
- while the gateway is busy (its event loop thread, its process or the host it shares
  with its upstreams near CPU saturation: `LoadGauge`), at most `budget` shadow copies
  per primary request are admitted and the rest are shed and counted (`shed`). An idle
  or lightly loaded gateway mirrors everything; a saturated one spends at most that share
  of its work on shadows, so the primary is never the one that slows down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from rollguard.proxy.load import LoadGauge
from rollguard.proxy.metrics import Metrics


class ShadowMirror:
    """Runs shadow calls at most `concurrency` at a time, `queue` more waiting."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        concurrency: int,
        queue: int,
        timeout_s: float,
        budget: float,
        gauge: LoadGauge | None,
    ) -> None:
        """`budget`: shadow copies admitted per primary request while `gauge` says busy
        (1.0: never shed for load). Without a gauge nothing is shed for load."""
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"shadow budget must be within [0, 1], got {budget}")
        self._metrics = metrics
        self._limit = concurrency + queue
        self._semaphore = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.timeout_s = timeout_s
        self.budget = budget
        self.gauge = gauge
        self._credit = 0.0  # copies that may still be admitted while busy
        self._children: dict[tuple[str, str, str], Counter] = {}
        self.dropped = 0
        self.shed = 0

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def admit(self, model: str, version: str) -> bool:
        """Whether a copy of the next primary may go to `version`; False is counted.

        Asked before the primary runs, so that a shed copy costs nothing else: no
        conversion of the primary's outputs for comparison, no task.
        """
        gauge = self.gauge
        if gauge is not None and gauge.busy and self.budget < 1.0:
            # Every primary earns `budget` of a copy; a whole one is spent per admission.
            credit = min(self._credit + self.budget, 1.0)
            if credit < 1.0 - 1e-9:  # twenty additions of 0.05 make 0.999...
                self._credit = credit
                self.shed += 1
                self.count(model, version, "shed")
                return False
            self._credit = max(credit - 1.0, 0.0)
        if len(self._tasks) >= self._limit:
            self.dropped += 1
            self.count(model, version, "dropped")
            return False
        return True

    def start(self, run: Callable[[], Awaitable[None]]) -> None:
        """Schedule a shadow call `admit` let through."""
        task = asyncio.get_running_loop().create_task(self._guarded(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def deadline(self) -> asyncio.Timeout:
        """The time limit of one shadow call."""
        return asyncio.timeout(self.timeout_s)

    def count(self, model: str, version: str, result: str) -> None:
        """One more shadow copy with `result` (ok, error, timeout, dropped, shed)."""
        key = (model, version, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics.shadow.labels(model, version, result)
        child.inc()

    async def _guarded(self, run: Callable[[], Awaitable[None]]) -> None:
        async with self._semaphore:
            await run()

    async def drain(self, wait_s: float = 5.0) -> None:
        """Wait for pending shadow calls (tests, shutdown); cancel what is left after."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=wait_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
