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
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import Counter

from rollguard.proxy.metrics import Metrics


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


PROC_STAT = Path("/proc/stat")


def host_cpu_times(path: Path = PROC_STAT) -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole host from /proc/stat; None where it is absent."""
    try:
        with path.open("rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    ticks = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
    return sum(ticks) - idle, sum(ticks)


def host_busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of the host's CPU time that was busy between two `host_cpu_times` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


class LoadGauge:
    """Whether the gateway is busy, from CPU time sampled every `period_s` on the loop.

    Busy means the event loop thread used at least `loop_busy` of one core over the last
    period (inline models, codecs, HTTP), or the whole process at least `cpu_busy` of
    every usable core (models on executor threads), or the host at least `host_busy` of
    all its CPUs (a sidecar shares its machine with the model servers it fronts, and a
    shadow copy sent to one of them takes CPU from the primary's). Sampling costs a few
    clock reads and one read of /proc/stat per period; the hot path only reads `busy`.
    """

    def __init__(
        self,
        *,
        period_s: float = 0.1,
        loop_busy: float = 0.6,
        cpu_busy: float = 0.8,
        host_busy: float = 0.9,
        cores: int | None = None,
        proc_stat: Path = PROC_STAT,
    ) -> None:
        self.period_s = period_s
        self.loop_busy = loop_busy
        self.cpu_busy = cpu_busy
        self.host_busy = host_busy
        self.host_share = 0.0  # of the whole host's CPU, last period
        self._proc_stat = proc_stat
        self._host: tuple[float, float] | None = None
        self.cores = cores or usable_cores()
        self.busy = False
        self.loop_share = 0.0  # of one core, last period
        self.cpu_share = 0.0  # of all usable cores, last period
        self._handle: asyncio.TimerHandle | None = None
        self._last = (0.0, 0.0, 0.0)

    def start(self) -> None:
        """Begin sampling; call on the event loop thread (thread_time is per thread)."""
        self._last = (time.monotonic(), time.thread_time(), time.process_time())
        self._host = host_cpu_times(self._proc_stat)
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._sample)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.busy = False

    def _sample(self) -> None:
        now = (time.monotonic(), time.thread_time(), time.process_time())
        wall = now[0] - self._last[0]
        if wall > 0:
            self.loop_share = (now[1] - self._last[1]) / wall
            self.cpu_share = (now[2] - self._last[2]) / wall / self.cores
        host = host_cpu_times(self._proc_stat) if self._host is not None else None
        if host is not None and self._host is not None:
            self.host_share = host_busy_share(self._host, host)
        self._host = host
        self.busy = (
            self.loop_share >= self.loop_busy
            or self.cpu_share >= self.cpu_busy
            or self.host_share >= self.host_busy
        )
        self._last = now
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._sample)


class ShadowMirror:
    """Runs shadow calls at most `concurrency` at a time, `queue` more waiting."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        concurrency: int = 8,
        queue: int = 256,
        timeout_s: float = 5.0,
        budget: float = 1.0,
        gauge: LoadGauge | None = None,
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
                self._count(model, version, "shed")
                return False
            self._credit = max(credit - 1.0, 0.0)
        if len(self._tasks) >= self._limit:
            self.dropped += 1
            self._count(model, version, "dropped")
            return False
        return True

    def start(self, run: Callable[[], Awaitable[None]]) -> None:
        """Schedule a shadow call `admit` let through."""
        task = asyncio.get_running_loop().create_task(self._guarded(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, model: str, version: str, result: str) -> None:
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
