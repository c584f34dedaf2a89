"""Dynamic micro-batching: a Runner wrapper that coalesces concurrent predict() calls.

Callers queue their requests; one collector task takes the oldest, waits up to
`max_delay_ms` (monotonic clock) for compatible requests until `max_batch_size` rows,
concatenates them along axis 0, calls the wrapped runner once and hands each caller
exactly its own rows back. Requests are compatible when they carry the same input
names with the same dtypes and the same non-batch dimensions; incompatible ones wait
for a later batch (they keep their place at the head of the queue). A request is never
split: one with more rows than `max_batch_size` runs alone.

While `max_concurrent_batches` batches are running, the collector waits for a slot
before forming the next one, so the queue fills up and the next batch comes out full:
under load batches grow on their own, with no delay added.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable

from rollguard.serving.bulkhead import Lane, current_lane
from rollguard.serving.errors import ModelExecutionError, NotReady, Overloaded
from rollguard.serving.merging import Waiting, hand_back, key, merged, resolve, unsplittable
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Runner, Wrapper
from rollguard.serving.tensors import Tensors, batch_size


class BatchingRunner(Wrapper):
    """Wraps a runner; same interface, but concurrent predict() calls share inner calls."""

    def __init__(
        self,
        inner: Runner,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queued: int | None = None,
        max_concurrent_batches: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`max_queued` bounds waiting requests (default 16 batches' worth, at least 64);
        `max_concurrent_batches` defaults to the CPU count, which keeps a compute-bound
        model's threads busy without queueing batches inside the executor."""
        super().__init__(inner)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._accepting = False
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queued = max_queued or max(64, 16 * max_batch_size)
        self.max_concurrent_batches = max_concurrent_batches or os.cpu_count() or 1
        self._clock = clock
        self._queue: deque[Waiting] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0  # requests accepted but not yet handed to the inner runner
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        await self.inner.load()
        self._slots = asyncio.Semaphore(self.max_concurrent_batches)
        self._collector = asyncio.create_task(
            self._collect(), name=f"batching {self.manifest.name} {self.manifest.version}"
        )
        self._accepting = True

    @property
    def ready(self) -> bool:
        return self._accepting and self.inner.ready

    async def unload(self) -> None:
        """Stop taking requests, fail the queued ones with NotReady, let running batches
        finish, then unload the inner runner."""
        self._accepting = False
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(
                    NotReady(f"{self.manifest.name} {self.manifest.version} was unloaded")
                )
        self._waiting = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.inner.unload()

    async def predict(self, request: InferRequest) -> InferResponse:
        if not self._accepting:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        inputs = request.arrays()
        rows = batch_size(inputs)  # raises InvalidInput for ragged batches, to this caller only
        if self._waiting >= self.max_queued:
            raise Overloaded(
                f"{self.manifest.name} {self.manifest.version}: batching queue full "
                f"({self.max_queued} requests waiting)"
            )
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        # A client's request learns how long it waited for its batch (the statistics'
        # `queue`); a shadow copy shares the client's request object and must not.
        caller = request if current_lane() is Lane.PRIMARY else None
        self._queue.append(Waiting(inputs, rows, key(inputs), self._clock(), future, caller))
        self._waiting += 1
        self._arrived.set()
        return InferResponse.of_arrays(await future)

    async def _collect(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._waiting -= len(batch)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[Waiting]:
        first = await self._take_first()
        batch, rows = [first], first.rows
        if first.key is None or rows >= self.max_batch_size:
            return batch
        deferred: list[Waiting] = []
        # Counted from the oldest request's arrival: one that already waited for a free
        # batch slot does not wait again, so max_delay bounds the added latency.
        deadline = first.arrived + self.max_delay
        try:
            while True:
                while self._queue and rows < self.max_batch_size:
                    request = self._queue.popleft()
                    if request.future.done():  # its caller gave up
                        self._waiting -= 1
                    elif request.key == first.key and rows + request.rows <= self.max_batch_size:
                        batch.append(request)
                        rows += request.rows
                    else:
                        deferred.append(request)
                remaining = deadline - self._clock()
                if rows >= self.max_batch_size or remaining <= 0:
                    return batch
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    return batch
        except asyncio.CancelledError:
            # Unloading: hand every taken request back so unload() can fail it.
            deferred = batch + deferred
            raise
        finally:
            # Deferred requests go back to the head, in their original order.
            self._queue.extendleft(reversed(deferred))

    async def _take_first(self) -> Waiting:
        while True:
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    return request
                self._waiting -= 1
            self._arrived.clear()
            await self._arrived.wait()

    async def _run(self, batch: list[Waiting]) -> None:
        started = self._clock()
        for queued in batch:
            if queued.caller is not None:
                queued.caller.queue_ns += int((started - queued.arrived) * 1e9)
        try:
            if len(batch) == 1:
                answer = await self.inner.predict(InferRequest.of_arrays(batch[0].inputs))
                resolve(batch[0].future, answer.arrays())
                return
            shared = InferRequest.of_arrays(merged([waiting.inputs for waiting in batch]))
            outputs = (await self.inner.predict(shared)).arrays()
            total = sum(r.rows for r in batch)
            name = unsplittable(outputs, total)
            if name is not None:
                raise ModelExecutionError(
                    f"output '{name}' has shape {list(outputs[name].shape)}, which cannot be "
                    f"split back into a batch of {total} rows"
                )
            hand_back(batch, outputs)
        except Exception as exc:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        finally:
            assert self._slots is not None
            self._slots.release()
