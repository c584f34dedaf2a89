"""Process isolation: a local version's model in worker processes that can be cut off.

A thread stuck in a model can be left behind but never stopped (serving/bulkhead.py); a
process can. `ProcessIsolated` wraps the local runner of a version whose manifest says
`runtime: {isolation: process}` and runs its calls in worker processes of its own
(serving/worker.py), as MLServer's parallel inference pool runs a model's calls in
workers (`mlserver/parallel/`), and keeps the runner interface, so the bulkhead,
batching and failover wrap it as they wrap threads:

- Each lane (clients' calls, shadow copies) has its own pool of workers, `workers` for
  clients (loaded with the version) and `shadow_workers` for shadow copies (started on
  the first one). A worker computes one call at a time; a call waits for an idle one.
- A call has `timeout_s` from the moment it arrives. Past it the caller gets
  `DeadlineExceeded` (504) and, if the call is computing, its worker is killed
  (SIGKILL): the model can hang for ever, the version loses one worker for as long as
  a restart takes. A caller that gives up earlier leaves its call to finish (or be
  killed at the same deadline); the worker takes no other call meanwhile.
- A worker that dies in a call (a segfault, `os._exit`, the OOM killer) fails that call
  with `ModelExecutionError` (500, the model's fault); one that dies idle fails nothing.
- A lost worker is replaced at once; one that keeps dying (no call answered between
  deaths) is replaced after a doubling back-off, `FIRST_BACKOFF_S` to `MAX_BACKOFF_S`.
  While a lane has no live worker and none starting, its calls are answered
  `Overloaded` (503) at once, and while that is so for the clients' lane the version
  is not `ready`, so routing can send its traffic elsewhere.
- Every worker loads the bytes the registry verified: this wrapper keeps them, encoded
  once (one copy of the artifact in the gateway for as long as the version is loaded),
  and hands them to each worker it starts; nothing reads the path again.

A worker (serving/workerprocess.py starts it, serving/worker.py is its own side) is
forked from multiprocessing's fork server, so a restart costs a fork and the model's
load; it ends itself when the gateway's process ends, however it ends (even SIGKILL),
in a call or not. What a call costs (two socket hops, the arrays copied each way) is
measured in load_tests/bench_isolation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from functools import partial
from typing import Any

from rollguard.serving.bulkhead import Lane, current_lane
from rollguard.serving.errors import (
    DeadlineExceeded,
    NotReady,
    Overloaded,
    ServingError,
    WorkerLost,
)
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import LocalRunner, Wrapper
from rollguard.serving.scheduling import warm_up, zeros_for
from rollguard.serving.tensors import Tensors
from rollguard.serving.worker import WireError, encode
from rollguard.serving.workerprocess import WorkerProcess, describe, read_answer, reaped

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 30.0


class _Pool:
    """One lane's workers of one version: `size` of them, restarted when lost."""

    def __init__(self, label: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"{label}: needs at least one worker process, got {size}")
        self.label = label
        self.size = size
        self.load = b""  # the encoded load message, set by the runner before a start
        self.live: set[WorkerProcess] = set()
        self.idle: deque[WorkerProcess] = deque()
        self.waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self.spawning = 0  # workers being started and loaded right now
        self.deaths = 0  # workers lost in a row with no call answered between
        self.started = False
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # restarts and listeners

    @property
    def alive(self) -> bool:
        """A worker can take calls now, or soon (one is starting)."""
        return bool(self.live) or self.spawning > 0

    async def start(self) -> None:
        """Start every worker; the first failure, once all are stopped again."""
        self.started = True
        self.spawning += self.size
        try:
            started = await asyncio.gather(
                *(WorkerProcess.start(self.label, self.load) for _ in range(self.size)),
                return_exceptions=True,
            )
        finally:
            self.spawning -= self.size
        workers = [w for w in started if isinstance(w, WorkerProcess)]
        failed = [e for e in started if not isinstance(e, WorkerProcess)]
        if failed:
            await asyncio.gather(*(w.close() for w in workers))
            raise failed[0]
        for worker in workers:
            self._add(worker)

    async def acquire(self, deadline: float, overdue: str) -> WorkerProcess:
        """An idle worker, waiting for one until `deadline`."""
        if self.idle:
            # The worker idle for the shortest time: at low load one worker takes every
            # call and keeps its weights in the CPU's caches (each worker has its own).
            return self.idle.pop()
        if self.closed:
            raise NotReady(f"{self.label} is unloaded")
        if not self.started:  # a lane started on its first call (shadow copies)
            self.started = True
            for _ in range(self.size):
                self._restart_after(0.0)
        if not self.alive:
            raise self._no_worker()
        waiter: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # handed over as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"{overdue} (waiting for a free worker process)") from None
            raise

    def release(self, worker: WorkerProcess) -> None:
        """`worker` is free: to the first caller still waiting, else idle."""
        if worker not in self.live:
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self.idle.append(worker)

    async def close(self) -> None:
        """Kill every worker and stop restarting them; calls in them get NotReady."""
        self.closed = True
        while running := [t for t in self._tasks if not t.done()]:
            for task in running:  # restarts and listeners: none starts another once closed
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        self.spawning = 0
        unloaded = NotReady(f"{self.label} was unloaded")
        workers = list(self.live)
        self.live.clear()
        self.idle.clear()
        for worker in workers:
            worker.fail(unloaded)
        self._fail_waiters(unloaded)
        await asyncio.gather(*(w.close() for w in workers))

    def _add(self, worker: WorkerProcess) -> None:
        self.live.add(worker)
        self._track(self._listen(worker), f"{self.label} worker {worker.pid}")
        self.release(worker)

    async def _listen(self, worker: WorkerProcess) -> None:
        """Settle the worker's answers as they come; when its socket ends, replace it."""
        fault = ""
        try:
            while True:
                worker.settle(await read_answer(worker.reader))
                self.deaths = 0
                self.release(worker)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it died (or was killed): `reaped` says how
        except WireError as exc:
            fault = f"it sent {exc}"
            worker.kill()
        worker.writer.close()
        code = await reaped(worker.process)
        self._lost(worker, fault or describe(code))

    def _lost(self, worker: WorkerProcess, cause: str) -> None:
        self.live.discard(worker)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        during = worker.pending is not None
        worker.fail(
            WorkerLost(
                f"{self.label}: its worker process (pid {worker.pid}) died during the call "
                f"({cause})"
            )
        )
        if self.closed:
            return
        self.deaths += 1
        delay = 0.0 if self.deaths == 1 else FIRST_BACKOFF_S * 2 ** (self.deaths - 2)
        delay = min(delay, MAX_BACKOFF_S)
        if worker.overdue:
            what = f"was killed: {worker.overdue}"
        else:
            what = f"died {'during a call ' if during else ''}({cause})"
        log.warning(
            "%s: worker process %d %s; starting another%s",
            self.label, worker.pid, what,
            f" in {delay:g}s ({self.deaths} lost in a row)" if delay else "",
        )  # fmt: skip
        self._restart_after(delay)
        if not self.alive:
            self._fail_waiters(self._no_worker())

    def _restart_after(self, delay: float) -> None:
        if not delay:
            self.spawning += 1  # starting from now on: callers wait for it
        self._track(self._restart(delay), f"{self.label} restart")

    async def _restart(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
            self.spawning += 1
        try:
            worker = await WorkerProcess.start(self.label, self.load)
        except Exception as exc:
            self.spawning -= 1
            if self.closed:
                return
            self.deaths += 1
            delay = min(FIRST_BACKOFF_S * 2 ** max(self.deaths - 2, 0), MAX_BACKOFF_S)
            log.warning(
                "%s: a new worker process failed: %s; next try in %gs", self.label, exc, delay
            )
            self._restart_after(delay)
            if not self.alive:
                self._fail_waiters(self._no_worker())
            return
        except BaseException:
            self.spawning -= 1
            raise
        self.spawning -= 1
        if self.closed:  # unloaded while it started
            await worker.close()
            return
        self._add(worker)

    def _track(self, work: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _no_worker(self) -> Overloaded:
        return Overloaded(
            f"{self.label}: no worker process (lost {self.deaths} in a row; the next one "
            "starts after a back-off)"
        )

    def _fail_waiters(self, error: ServingError) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class ProcessIsolated(Wrapper):
    """A local runner whose calls run in worker processes that are killed when a call
    outlives its deadline and restarted when they die."""

    def __init__(
        self, inner: LocalRunner, workers: int, timeout_s: float, *, shadow_workers: int = 1
    ) -> None:
        super().__init__(inner)
        self.local = inner
        self.timeout_s = timeout_s
        manifest = inner.manifest
        self.label = f"{manifest.name}/{manifest.version}"
        self.pools = {
            Lane.PRIMARY: _Pool(self.label, workers),
            Lane.SHADOW: _Pool(f"{self.label} shadow", shadow_workers),
        }
        self._loaded = False
        self._overdue = f"{self.label} did not answer within {timeout_s:g}s"

    @property
    def ready(self) -> bool:
        return self._loaded and self.pools[Lane.PRIMARY].alive

    async def load(self) -> None:
        """Start the clients' workers, each loading the verified bytes (ArtifactError
        with the worker's reason when they cannot)."""
        pinned = await asyncio.to_thread(self.local.take_pinned)
        load = encode(("load", self.manifest, self.directory, pinned))
        del pinned
        for pool in self.pools.values():
            pool.load = load
        try:
            await self.pools[Lane.PRIMARY].start()
        except BaseException:
            for pool in self.pools.values():
                pool.load = b""
            raise
        self._loaded = True
        await self._warm_up()

    async def _warm_up(self) -> None:
        """A call of zeros in each primary worker before the version takes traffic (a
        model's first calls are slow: serving/scheduling.py). One first, so that a model
        that fails or hangs on zeros costs one call (a worker killed at the deadline is
        restarted, cold); logged, and the version serves anyway. Workers started later
        (the shadow lane's, replacements) are not warmed."""
        sample = zeros_for(self.manifest)
        if sample is None:
            return
        pool = self.pools[Lane.PRIMARY]
        # `size` at once after the first: each takes an idle worker, so every one is warmed.
        await warm_up(self.label, partial(self._call, pool, sample), pool.size)

    async def predict(self, request: InferRequest) -> InferResponse:
        return InferResponse.of_arrays(
            await self._call(self.pools[current_lane()], request.arrays())
        )

    async def _call(self, pool: _Pool, inputs: Tensors) -> Tensors:
        """`inputs` computed by a worker of `pool`, within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        worker = await pool.acquire(deadline, self._overdue)
        try:
            if loop.time() >= deadline:
                raise DeadlineExceeded(self._overdue)
            answer = worker.call(inputs, deadline, self._overdue)
        except BaseException:
            pool.release(worker)
            raise
        return await answer

    async def unload(self) -> None:
        """Kill every worker (a call still in one gets NotReady)."""
        self._loaded = False
        for pool in self.pools.values():
            await pool.close()
            pool.load = b""

    def worker_pids(self) -> list[int]:
        """The process ids of the live workers, every lane."""
        return sorted(w.pid for pool in self.pools.values() for w in pool.live if w.pid)
