"""Fire-and-forget shadow traffic: tracked tasks behind a bounded queue, shed only under
the gateway's own CPU pressure.

Like Envoy's request mirroring, the client never waits for a shadow: `admit` and `start`
return at once. A shadow version configured at 100 % gets a copy of every request
whenever there is room for it. Two things bound what shadows may cost the primaries:

- a copy that does not fit the queue (`concurrency` running, `queue` waiting) is dropped
  and counted (`dropped`), never queued without bound;
- while the gateway is under CPU pressure (`LoadGauge`, proxy/load.py: its event loop
  thread, its process or its cgroup's CPU quota at `shadow_pressure` or above; never
  the host's load), at most `budget` copies per primary request are admitted and the
  rest are shed and counted (`shed`).

What a copy costs: the request decoded once for the primary is the one the shadow
version gets (an upstream gets the client's own bytes, never a second encode, over the
pooled connections of its runner), and the call takes the version's shadow lane of its
bulkhead (serving/bulkhead.py), never a slot or a thread a client's request could use.

Exported per (model, shadow version), beside `rollguard_shadow_requests_total`:
`rollguard_shadow_mirrored_ratio` (copies started over copies wanted, since start) and,
for the gateway, `rollguard_shadow_pressure_ratio{signal}` (last sample),
`rollguard_shadow_pressure_threshold_ratio`, `rollguard_shadow_shedding` (1 while under
pressure) and `rollguard_shadow_budget_ratio`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rollguard.proxy.load import SIGNALS, LoadGauge
from rollguard.proxy.metrics import Metrics


class _Copies:
    """One (model, shadow version)'s copies: wanted, and started (admitted)."""

    __slots__ = ("started", "wanted")

    def __init__(self) -> None:
        self.wanted = 0
        self.started = 0


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
        """`budget`: shadow copies admitted per primary request while `gauge` says the
        gateway is under pressure (1.0: never shed for load). Without a gauge nothing is
        shed for load."""
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"shadow budget must be within [0, 1], got {budget}")
        self._metrics = metrics
        self._limit = concurrency + queue
        self._semaphore = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.timeout_s = timeout_s
        self.budget = budget
        self.gauge = gauge
        self._credit = 0.0  # copies that may still be admitted under pressure
        self._children: dict[tuple[str, str, str], Counter] = {}
        self.copies: dict[tuple[str, str], _Copies] = {}
        self.dropped = 0
        self.shed = 0
        metrics.registry.register(_ShadowCollector(self))

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def mirrored_share(self, model: str, version: str) -> float:
        """Copies started over copies wanted for `version` of `model`, since start (1.0
        before any was wanted)."""
        found = self.copies.get((model, version))
        return found.started / found.wanted if found is not None and found.wanted else 1.0

    def admit(self, model: str, version: str) -> bool:
        """Whether a copy of the next primary may go to `version`; False is counted.

        Asked before the primary runs, so that a shed copy costs nothing else: no
        conversion of the primary's outputs for comparison, no task.
        """
        copies = self.copies.get((model, version))
        if copies is None:
            copies = self.copies[(model, version)] = _Copies()
        copies.wanted += 1
        gauge = self.gauge
        if gauge is not None and gauge.busy and self.budget < 1.0:
            # Every primary earns `budget` of a copy; a whole one is spent per admission,
            # and what is left over carries (capping it at one copy admitted 1 in 2 for
            # any budget in (0.5, 1), and 1 in 3 for 0.4).
            credit = self._credit + self.budget
            if credit < 1.0 - 1e-9:  # twenty additions of 0.05 make 0.999...
                self._credit = credit
                self.shed += 1
                self.count(model, version, "shed")
                return False
            self._credit = max(credit - 1.0, 0.0)  # < 1: credit was < 1 + budget <= 2
        if len(self._tasks) >= self._limit:
            self.dropped += 1
            self.count(model, version, "dropped")
            return False
        copies.started += 1
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


class _ShadowCollector(Collector):
    """The mirror's shares and the shed decision's inputs, read at scrape time."""

    def __init__(self, mirror: ShadowMirror) -> None:
        self._mirror = mirror

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on what was mirrored

    def collect(self) -> Iterator[Metric]:
        mirror = self._mirror
        share = GaugeMetricFamily(
            "rollguard_shadow_mirrored_ratio",
            "Shadow copies started over copies wanted (100 % shadows: every routed request), "
            "since start; the rest were shed under pressure or dropped on a full queue.",
            labels=["model", "version"],
        )
        for (model, version), copies in sorted(mirror.copies.items()):
            share.add_metric([model, version], copies.started / copies.wanted)
        yield share
        gauge = mirror.gauge
        if gauge is None:
            return
        pressure = GaugeMetricFamily(
            "rollguard_shadow_pressure_ratio",
            "CPU pressure the shed decision reads, last sample, each as a share of its own "
            "limit: event_loop (one core), process (usable cores), cgroup (its CPU quota; "
            "0 without one).",
            labels=["signal"],
        )
        for signal in SIGNALS:
            pressure.add_metric([signal], gauge.shares[signal])
        yield pressure
        yield GaugeMetricFamily(
            "rollguard_shadow_pressure_threshold_ratio",
            "Pressure at or above which shadow copies are shed to the budget (shadow_pressure).",
            value=gauge.threshold,
        )
        yield GaugeMetricFamily(
            "rollguard_shadow_shedding",
            "1 while the gateway is under CPU pressure and sheds shadow copies, else 0.",
            value=float(gauge.busy and mirror.budget < 1.0),
        )
        yield GaugeMetricFamily(
            "rollguard_shadow_budget_ratio",
            "Shadow copies admitted per primary request while shedding (shadow_budget).",
            value=mirror.budget,
        )
