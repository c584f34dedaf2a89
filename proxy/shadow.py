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
Copies wait in one queue for `concurrency` long-lived worker tasks, started as copies
need them and in the shadow lane for good: a copy is a queue entry, not a task, a
context and a semaphore of its own (~9 µs of the event loop's ~47 µs per in-process
copy). A worker lets the loop run between two copies, so copies never hold it longer
than one call does. A copy of a version that runs inline (a model measured cheap,
serving/scheduling.py) needs no worker at all: `soon` completes it in a plain callback
once the request that made it is answered (~4 µs less loop CPU a copy), and hands it
to a worker only when its version cannot answer at once. A copy of a version whose
calls also batch (`Runner.batches_now`: inline, outputs a row per input row) is held
instead (`hold`): up to `HOLD_S` (2 ms), or until `HOLD_COPIES` (16) are held, then one
callback answers them all, each version's compatible copies in one model call
(`Runner.predict_now_many`), as a turn's primaries share one. Nobody waits for a copy,
so holding it costs no one latency; what it saves is the loop's: at 4,000 req/s with a
100 % shadow the gateway spent 7 µs of CPU a copy where each copy in its own callback
took 36 µs (load_tests/results/bench.md). A held copy's latency, as its window records
it, is the call it shared plus its own checks, as a coalesced primary's is; its wait to
be held is nobody's.

Exported per (model, shadow version), beside `rollguard_shadow_requests_total`:
`rollguard_shadow_mirrored_ratio` (copies started over copies wanted, since start) and,
for the gateway, `rollguard_shadow_pressure_ratio{signal}` (last sample),
`rollguard_shadow_pressure_threshold_ratio`, `rollguard_shadow_shedding` (1 while under
pressure) and `rollguard_shadow_budget_ratio`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rollguard.proxy.load import SIGNALS, LoadGauge
from rollguard.proxy.metrics import Metrics
from rollguard.serving.bulkhead import in_shadow_lane
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Runner

log = logging.getLogger(__name__)


class _Copies:
    """One (model, shadow version)'s copies: wanted, and started (admitted)."""

    __slots__ = ("started", "wanted")

    def __init__(self) -> None:
        self.wanted = 0
        self.started = 0


@dataclass(slots=True, eq=False)
class Held:
    """A copy `ShadowMirror.hold` keeps to answer with others: what answers it, and what
    to do with the answer (`answered`, `failed`: given the seconds the call took) or,
    when it must be awaited after all, the copy to run on a worker."""

    runner: Runner
    request: InferRequest
    answered: Callable[[float, InferResponse], None]
    failed: Callable[[float], None]
    run: Callable[[], Awaitable[None]]


def _complete(copy: Held, answer: InferResponse | Exception, seconds: float) -> None:
    """A held copy's answer, or its version's failure (one whose answer does not read)."""
    if not isinstance(answer, Exception):
        try:
            copy.answered(seconds, answer)
            return
        except Exception:
            pass
    copy.failed(seconds)


class ShadowMirror:
    """Runs shadow calls at most `concurrency` at a time, `queue` more waiting."""

    HOLD_S = 0.002  # the longest a copy of a version that batches on the loop is held
    HOLD_COPIES = 16  # held copies answered at once, however recent

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
        self._concurrency = concurrency
        self._queued: deque[Callable[[], Awaitable[None]]] = deque()
        self._running = 0
        self._soon = 0  # copies handed to `soon` whose callback has not run yet
        self._held: list[Held] = []  # copies `hold` keeps for one call
        self._release: asyncio.Handle | None = None  # when the held copies are answered
        self._release_soon = False  # at the loop's next turn (enough are held)
        # The context `soon`'s callbacks run in: the shadow lane, as a worker's.
        self._context = contextvars.copy_context()
        self._context.run(in_shadow_lane)
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for a copy
        self._workers: set[asyncio.Task[None]] = set()
        self._settled: asyncio.Future[None] | None = None  # drain's: nothing pending
        self._deadlines: dict[asyncio.Task[Any], _Deadline] = {}  # the copy each worker runs
        self._period = min(timeout_s / 10, 0.1)
        self._watchdog: asyncio.TimerHandle | None = None
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
        """Copies waiting or running."""
        return len(self._queued) + self._running + self._soon + len(self._held)

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
        if self.pending >= self._limit:
            self.dropped += 1
            self.count(model, version, "dropped")
            return False
        copies.started += 1
        return True

    def start(self, run: Callable[[], Awaitable[None]]) -> None:
        """Queue a shadow call `admit` let through, for the next free worker."""
        self._queued.append(run)
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._workers) < self._concurrency:
            worker = asyncio.get_running_loop().create_task(self._work())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def soon(self, now: Callable[[], bool], run: Callable[[], Awaitable[None]]) -> None:
        """Queue an admitted copy that may complete synchronously: `now` runs as a plain
        callback once the loop is done with the current request (its answer written),
        in the shadow lane, and returns False when the copy must be awaited instead:
        then `run` goes to a worker as `start` sends it. For a version that runs inline
        this skips a worker's wake-up, the deadline (an inline call cannot be stopped
        part way; scheduling.py takes a slow model off the loop) and the coroutines of
        the runner's wrappers: ~4 µs of an in-process copy's ~34 µs of loop CPU."""
        self._soon += 1
        asyncio.get_running_loop().call_soon(self._now, now, run, context=self._context)

    def hold(self, copy: Held) -> None:
        """Queue an admitted copy of a version whose calls batch on the loop
        (`Runner.batches_now`): held up to `HOLD_S`, or until `HOLD_COPIES` are, then all
        held copies answered in one callback in the shadow lane, a version's compatible
        ones in one call (`Runner.predict_now_many`); one that must be awaited after all
        goes to a worker as `start` sends it."""
        held = self._held
        held.append(copy)
        loop = asyncio.get_running_loop()
        if len(held) >= self.HOLD_COPIES:
            if not self._release_soon:
                if self._release is not None:
                    self._release.cancel()
                self._release = loop.call_soon(self._answer_held, context=self._context)
                self._release_soon = True
        elif self._release is None:
            self._release = loop.call_later(self.HOLD_S, self._answer_held, context=self._context)

    def _answer_held(self) -> None:
        held, self._held = self._held, []
        self._release, self._release_soon = None, False
        by_runner: dict[int, list[Held]] = {}
        for copy in held:
            by_runner.setdefault(id(copy.runner), []).append(copy)
        for copies in by_runner.values():
            try:
                answers = copies[0].runner.predict_now_many([copy.request for copy in copies])
            except Exception:  # a bug of ours: each copy is awaited on its own instead
                log.exception("held shadow copies could not be answered together")
                answers = [(None, 0.0)] * len(copies)
            for copy, (answer, seconds) in zip(copies, answers, strict=True):
                if answer is None:
                    self.start(copy.run)
                    continue
                try:
                    _complete(copy, answer, seconds)
                except Exception:  # a copy's own bug: logged, as a worker logs it
                    log.exception("a shadow copy failed outside its version's call")
        self._settle()

    def _now(self, now: Callable[[], bool], run: Callable[[], Awaitable[None]]) -> None:
        self._soon -= 1
        try:
            done = now()
        except Exception:  # a copy's own bug: logged, as a worker logs it
            log.exception("a shadow copy failed outside its version's call")
            done = True
        if not done:
            self.start(run)
            return
        self._settle()

    def _settle(self) -> None:
        """Tell a waiting `drain` once nothing is pending any more."""
        settled = self._settled
        if settled is not None and not self.pending and not settled.done():
            settled.set_result(None)

    def deadline(self) -> _Deadline:
        """The time limit of one shadow call, as `asyncio.timeout(timeout_s)` (TimeoutError
        out of the block once it is past), checked by one watchdog timer for all copies
        every tenth of the limit (at most 0.1 s) instead of a timer per copy (~5 µs each)."""
        return _Deadline(self)

    def _watch(self) -> None:
        """The watchdog: cancel each copy past its time limit; again while any runs."""
        self._watchdog = None
        deadlines = self._deadlines
        if not deadlines:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline in deadlines.values():
            if not deadline.expired and deadline.at <= now:
                deadline.expired = True
                deadline.task.cancel()
        self._watchdog = loop.call_later(self._period, self._watch)

    def count(self, model: str, version: str, result: str) -> None:
        """One more shadow copy with `result` (ok, error, timeout, dropped, shed)."""
        key = (model, version, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics.shadow.labels(model, version, result)
        child.inc()

    async def _work(self) -> None:
        """One worker: copies one after another, the loop free between two; waits while
        there are none. Its calls take the shadow lane (its own context)."""
        in_shadow_lane()
        loop = asyncio.get_running_loop()
        queued = self._queued
        while True:
            while queued:
                run = queued.popleft()
                self._running += 1
                try:
                    await run()
                except Exception:  # a copy's own bug: logged, never the worker's end
                    log.exception("a shadow copy failed outside its version's call")
                finally:
                    self._running -= 1
                self._settle()
                if queued:
                    await asyncio.sleep(0)  # the loop's other work between two copies
            waiter = loop.create_future()
            self._idle.append(waiter)
            await waiter

    async def drain(self, wait_s: float = 5.0) -> None:
        """Wait for pending shadow calls (tests, shutdown); cancel what is left after,
        and the workers with it."""
        if self.pending:
            self._settled = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._settled), wait_s)
            except TimeoutError:
                pass
            finally:
                self._settled = None
        workers = set(self._workers)
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._queued.clear()
        self._idle.clear()
        self._held.clear()
        if self._release is not None:
            self._release.cancel()
            self._release, self._release_soon = None, False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class _Deadline:
    """One shadow call's time limit (ShadowMirror.deadline): the watchdog cancels the
    task past it, and leaving the block turns that cancellation into a TimeoutError, as
    asyncio.timeout does; a cancellation from elsewhere stays one."""

    __slots__ = ("_cancelling", "_mirror", "at", "expired", "task")

    def __init__(self, mirror: ShadowMirror) -> None:
        self._mirror = mirror
        self.expired = False

    async def __aenter__(self) -> None:
        mirror = self._mirror
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a shadow call's deadline needs a task")
        self.task = task
        self._cancelling = task.cancelling()
        loop = asyncio.get_running_loop()
        self.at = loop.time() + mirror.timeout_s
        mirror._deadlines[task] = self
        if mirror._watchdog is None:
            mirror._watchdog = loop.call_later(mirror._period, mirror._watch)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: object
    ) -> None:
        self._mirror._deadlines.pop(self.task, None)
        if (
            self.expired
            and kind is asyncio.CancelledError
            and self.task.uncancel() <= self._cancelling
        ):
            raise TimeoutError(f"shadow call past {self._mirror.timeout_s:g}s") from error


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
