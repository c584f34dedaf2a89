"""Fire-and-forget shadow traffic: tracked tasks behind a bounded queue and semaphore.

Like Envoy's request mirroring, the client never waits for a shadow: `submit` returns
at once, and a copy that does not fit the queue is dropped and counted, never queued
without bound (the primary is never the one shed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.metrics import Metrics


class ShadowMirror:
    """Runs shadow calls at most `concurrency` at a time, `queue` more waiting."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        concurrency: int = 8,
        queue: int = 256,
        timeout_s: float = 5.0,
    ) -> None:
        self._metrics = metrics
        self._limit = concurrency + queue
        self._semaphore = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.timeout_s = timeout_s
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def submit(self, model: str, version: str, run: Callable[[], Awaitable[None]]) -> bool:
        """Schedule one shadow call; False (and counted) when the queue is full."""
        if len(self._tasks) >= self._limit:
            self.dropped += 1
            self._metrics.shadow.labels(model, version, "dropped").inc()
            return False
        task = asyncio.get_running_loop().create_task(self._guarded(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

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
