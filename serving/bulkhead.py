"""Bulkheads: each version's own bounded concurrency and queue, and its own threads.

A fault in one version must cost only that version's capacity. Two pieces do it:

- `Bulkhead` wraps a version's runner: at most `concurrency` calls run in it at once and
  at most `queue` more wait (FIFO); one more is refused at once with `Overloaded` (503),
  counted against that version. It has two lanes, primary and shadow, each with its own
  slots: a shadow copy (`in_shadow_lane`) never takes a slot a client's request could
  use. A caller that gives up (its deadline, serving/deadlines.py, cancels it) frees its
  slot at once, whether it was waiting or running.
- `Threads` runs one lane's blocking calls of one local version on daemon threads of its
  own. A call whose caller gave up while the thread still computes is *stuck*: the slot
  is free again (a fresh thread takes the next call), the thread is counted as stuck
  until it returns, and once `size` threads are stuck the lane answers `Overloaded` at
  once instead of letting its calls pile up behind threads that may never come back.
  The threads are daemons, so a thread that never returns cannot keep the process from
  exiting either. Cutting a stuck call off for good needs a process (serving/isolation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from rollguard.serving.errors import Overloaded
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Now, Runner, Wrapper

T = TypeVar("T")
A = TypeVar("A")


THREAD_PREFIX = "model "  # every model thread's name starts so (proxy/cli.py looks for them)


class Lane(Enum):
    """Which slots a call takes: a client's request, or a shadow copy of one."""

    PRIMARY = "primary"
    SHADOW = "shadow"


_LANE: contextvars.ContextVar[Lane] = contextvars.ContextVar("rollguard_lane", default=Lane.PRIMARY)


def in_shadow_lane() -> None:
    """Make every call the current task makes from now on a shadow call.

    A context variable rather than an argument: the runner interface stays
    `predict(request)`, and a shadow copy runs in a task of its own, so setting it there
    touches nothing else.
    """
    _LANE.set(Lane.SHADOW)


def current_lane() -> Lane:
    return _LANE.get()


@dataclass(slots=True)
class _Slots:
    """One lane's admission: `running` of `concurrency`, FIFO waiters up to `queue`."""

    concurrency: int
    queue: int
    running: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    async def acquire(self, what: str) -> None:
        if self.running < self.concurrency and not self.waiters:
            self.running += 1
            return
        if len(self.waiters) >= self.queue:
            raise Overloaded(
                f"{what}: {self.running} calls running and {len(self.waiters)} waiting, "
                f"its limit (bulkhead full)"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we gave up: pass it on
            else:
                waiter.cancel()
                self._forget(waiter)
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self.running -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    @property
    def waiting(self) -> int:
        return len(self.waiters)


@dataclass(frozen=True, slots=True)
class Isolation:
    """How much of the process one version may take: per lane, calls running at once
    and calls waiting for them; local versions' threads for shadow copies."""

    concurrency: int = 64
    queue: int = 256
    shadow_concurrency: int = 64
    shadow_queue: int = 16
    shadow_threads: int = 1


class Bulkhead(Wrapper):
    """A version's runner behind its own slots: `concurrency` running, `queue` waiting,
    per lane; beyond that `Overloaded` at once."""

    def __init__(
        self,
        inner: Runner,
        *,
        concurrency: int,
        queue: int,
        shadow_concurrency: int,
        shadow_queue: int,
    ) -> None:
        super().__init__(inner)
        if min(concurrency, shadow_concurrency) < 1 or min(queue, shadow_queue) < 0:
            raise ValueError("a bulkhead needs at least one slot per lane and a queue >= 0")
        self._primary = _Slots(concurrency, queue)
        self.lanes = {
            Lane.PRIMARY: self._primary,
            Lane.SHADOW: _Slots(shadow_concurrency, shadow_queue),
        }
        self._drained: asyncio.Event | None = None  # set once idle, while retiring
        manifest = inner.manifest
        self._what = {lane: f"{manifest.name} {manifest.version} ({lane.value})" for lane in Lane}

    async def predict(self, request: InferRequest) -> InferResponse:
        lane = _LANE.get()
        # The primary lane's slots without a dict lookup: an Enum's hash is Python code.
        slots = self._primary if lane is Lane.PRIMARY else self.lanes[lane]
        if slots.running < slots.concurrency and not slots.waiters:
            slots.running += 1  # a free slot: taken without a coroutine of its own
        else:
            waiting = time.perf_counter_ns()
            await slots.acquire(self._what[lane])
            if lane is Lane.PRIMARY:  # the statistics extension's `queue` (proxy/stats.py)
                request.queue_ns += time.perf_counter_ns() - waiting
        try:
            return await self.inner.predict(request)
        finally:
            slots.release()
            if self._drained is not None and self.busy == 0:
                self._drained.set()

    def predict_now(self, request: InferRequest) -> InferResponse | None:
        """The inner runner's answer right now when its lane has a free slot (taken for
        the length of the call); None when the call would wait for one, or the load is
        retiring (then `predict` handles it)."""
        lane = _LANE.get()
        slots = self._primary if lane is Lane.PRIMARY else self.lanes[lane]
        if slots.running >= slots.concurrency or slots.waiters or self._drained is not None:
            return None
        slots.running += 1
        try:
            return self.inner.predict_now(request)
        finally:
            slots.running -= 1

    @property
    def batches_now(self) -> bool:
        return self.inner.batches_now

    def predict_now_many(self, requests: Sequence[InferRequest]) -> list[Now]:
        """As `predict_now`, one slot for the one call they share."""
        lane = _LANE.get()
        slots = self._primary if lane is Lane.PRIMARY else self.lanes[lane]
        if slots.running >= slots.concurrency or slots.waiters or self._drained is not None:
            return [(None, 0.0)] * len(requests)
        slots.running += 1
        try:
            return self.inner.predict_now_many(requests)
        finally:
            slots.running -= 1

    @property
    def busy(self) -> int:
        """Calls running or waiting in either lane."""
        return sum(s.running + s.waiting for s in self.lanes.values())

    async def retire(self, within_s: float) -> None:
        """Unload once the calls already admitted have finished (a reload replaced this
        load while they ran), or after `within_s` at the latest. Calls admitted meanwhile
        still run on this load; they were routed to it before it was replaced."""
        if self.busy:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self._drained.wait()
        await self.unload()


class Threads:
    """Daemon threads for one lane of one local version: `size` calls computing at once
    for callers still waiting, plus at most `size` stuck ones their callers gave up on."""

    def __init__(self, name: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"{name}: needs at least one thread, got {size}")
        self.name = name
        self.size = size
        self.stuck = 0  # calls whose caller gave up while their thread still computes
        self._busy = 0  # calls handed to a thread and not yet returned (stuck included)
        self._threads: list[threading.Thread] = []
        self._work: queue.SimpleQueue[_Call[Any, Any] | None] = queue.SimpleQueue()
        self._closed = False

    async def run(self, fn: Callable[[A], T], arg: A) -> T:
        """`fn(arg)` on one of the lane's threads; `Overloaded` at once when all its
        threads are stuck. Every counter is changed on the event loop's thread only."""
        if self.stuck >= self.size:
            raise Overloaded(
                f"{self.name}: all {self.size} of its threads are stuck in calls that "
                f"outlived their deadline"
            )
        loop = asyncio.get_running_loop()
        call: _Call[A, T] = _Call(fn, arg, loop.create_future(), loop, self)
        self._busy += 1
        if self._busy > len(self._threads) and len(self._threads) < 2 * self.size:
            self._spawn()
        self._work.put(call)
        try:
            return await call.future
        except BaseException:
            if not call.finished:
                call.abandoned = True
                self.stuck += 1
            raise

    @property
    def started(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        """Start every thread the lane may run (2 x size) now rather than on the calls
        that would otherwise wait for them (serving/scheduling.py: the warm-up)."""
        while len(self._threads) < 2 * self.size and not self._closed:
            self._spawn()

    def close(self) -> None:
        """Let idle threads end; a stuck one ends when its call returns (daemon: or never)."""
        self._closed = True
        for _ in self._threads:
            self._work.put(None)

    def _spawn(self) -> None:
        thread = threading.Thread(
            target=self._serve, name=f"{THREAD_PREFIX}{self.name} {len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            call = self._work.get()
            if call is None:
                return
            call.execute()

    def _finished(self, call: _Call[Any, Any]) -> None:
        self._busy -= 1
        if call.abandoned:
            self.stuck -= 1


class _Call(Generic[A, T]):
    __slots__ = ("abandoned", "arg", "finished", "fn", "future", "loop", "owner")

    def __init__(
        self,
        fn: Callable[[A], T],
        arg: A,
        future: asyncio.Future[T],
        loop: asyncio.AbstractEventLoop,
        owner: Threads,
    ) -> None:
        self.fn = fn
        self.arg = arg
        self.future = future
        self.loop = loop
        self.owner = owner
        self.finished = False
        self.abandoned = False

    def execute(self) -> None:
        """On a worker thread: compute, then hand the outcome to the loop's thread. A
        call whose caller gave up while it waited for a thread is not computed at all."""
        result: Any = None
        error: BaseException | None = None
        if not self.abandoned:  # read without a lock: one abandoned this instant still runs
            try:
                result = self.fn(self.arg)
            except BaseException as exc:  # handed to the caller, whatever it is
                error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        self.finished = True
        self.owner._finished(self)
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
