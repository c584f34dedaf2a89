"""Where a local model's calls run: on executor threads, or inline on the event loop.

`Scheduled` wraps a `LocalRunner`. For a model that answers in tens of microseconds,
handing the call to a thread and waking the event loop again costs more than the model
itself, so calls are measured in rounds of `WARMUP_CALLS` on the executor. When the
fastest call of a round took under `inline_below_us` (the fastest, because a call on a
thread also waits for the GIL while the event loop holds it, which says nothing about
the model), the version goes inline for batches up to the largest one that ran under
the limit in that round. There its own CPU time counts (collector pauses left out; the
OS may preempt the loop thread on a busy machine, which the wall clock would blame on
the model), in a moving average of calls clipped at 4x the limit: an average over the
limit, or one call over `SPIKE_FACTOR` x the limit by the wall clock (a model that
blocks), sends the version back to the executor, and each return doubles the next
round's length (to `MAX_ROUND`).

The time limit of a call is set here too, because only here is it known where the call
runs: one on a thread is left behind at `timeout_s` (DeadlineExceeded) and stopped
where the runtime can (`LocalRunner.give_up`: ONNX Runtime's terminate flag, checked
between nodes, so the thread comes back within a node's time; ONNX Runtime logs the stop
as an error line of its own); elsewhere the thread finishes on its own. One inline
cannot be interrupted by a timer, so none is set —
which is why only models measured to be cheap run inline. A timer on every inline call
would cost a third of the whole request (asyncio.timeout: about 10 µs against 37).

Only a model whose cost cannot depend on its inputs' values may go inline at all
(`fixed_cost`): an ONNX graph without control flow or value-sized operators
(serving/onnxgraph.py). scikit-learn estimators are arbitrary Python and TorchScript or
exported torch programs may loop on a value, so those always run on threads, where the
deadline holds. An inline call therefore costs what its batch size says, and the batch
size is capped at what was measured.

Before the version takes traffic, `load` starts every thread of both lanes and runs one
call on each of them with inputs of zeros shaped as the manifest declares (Triton's
model warm-up): a thread started by a call, or a model's first calls (imports, caches,
TorchScript's profiling runs), answered milliseconds late on a busy machine, and those
late answers counted against a candidate that had just begun to take traffic — four of
them rolled a healthy demo candidate back on latency. A warm-up call that fails or
outlives the deadline is logged and the version serves anyway, warmed or not.

An inline version under concurrent load coalesces its primaries (docs/performance.md):
once `BUSY_TURNS` turns of the event loop in a row have each made more than one inline
call, a primary joins the call that a callback makes for every primary of its turn
(`coalesce_rows` rows at most, the turn's others then answered at once; requests are
never split), and each caller gets its own rows: a model call of one row costs about
what one of 16 does. After `LONELY_FLUSHES` calls in a row of one request each, calls
are made at once again. A shared call that fails is made again per request, so a
request fails alone; outputs that are not a row per input row end coalescing for the
version. Shadow copies are not primaries: those the mirror held together
(proxy/shadow.py `hold`) come in one `predict_now_many` and share calls the same way.

Calls on threads run on the version's own daemon threads, one set per lane
(serving/bulkhead.py `Threads`): a hung or slow version ties up only its own threads,
a shadow copy never one that serves a client, and once all of a lane's threads are stuck
in calls past their deadline it answers `Overloaded` at once. A shadow copy of a version
measured cheap runs inline as its other calls do: handing it to a thread would cost the
event loop more than the model does, and what copies may take of the loop under CPU
pressure is bounded where they are admitted (proxy/shadow.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import numpy as np

from rollguard.serving.bulkhead import Lane, Threads, current_lane
from rollguard.serving.errors import DeadlineExceeded
from rollguard.serving.manifest import Manifest
from rollguard.serving.merging import Key, Waiting, key, merged, resolve, split, unsplittable
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.onnxgraph import NotOnnx, value_dependent_operators
from rollguard.serving.runners.base import LocalRunner, Now, Wrapper
from rollguard.serving.tensors import V2_TO_NUMPY, Tensors

log = logging.getLogger(__name__)


class _CollectorClock:
    """Seconds spent in the garbage collector since start-up, from `gc.callbacks`.

    The collector can run inside any call that allocates, and it holds the GIL while it
    does: its pauses are not the model's time, so inline timings leave them out.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_collect)
            self._installed = True

    def _on_collect(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started


_COLLECTOR = _CollectorClock()


def fixed_cost(runner: LocalRunner) -> str | None:
    """None when a call's cost cannot depend on its inputs' values (the model may run
    inline), else why it might (blocking: reads an ONNX artifact)."""
    manifest = runner.manifest
    if manifest.framework != "onnx":
        return f"framework {manifest.framework!r} may run code whose cost depends on values"
    try:
        found = value_dependent_operators(runner.artifact_path.read_bytes())
    except (OSError, NotOnnx) as exc:
        return f"its graph cannot be read ({exc})"
    return f"its graph uses {', '.join(found)}" if found else None


class Scheduled(Wrapper):
    """A local runner whose calls run on its own threads, or inline once measured cheap."""

    WARMUP_CALLS = 32
    MAX_ROUND = 4096
    SPIKE_FACTOR = 1000.0
    _SMOOTHING = 0.05  # weight of the newest inline call in the moving average
    BUSY_TURNS = 3  # turns of the loop in a row with more than one inline call: coalesce
    LONELY_FLUSHES = 3  # flushes in a row of one primary: stop coalescing
    COALESCE_ROWS = 32  # the most rows one coalesced call holds, by default

    def __init__(
        self,
        inner: LocalRunner,
        threads: int,
        inline_below_us: float,
        timeout_s: float,
        *,
        shadow_threads: int = 1,
        coalesce_rows: int = COALESCE_ROWS,
    ) -> None:
        """`threads` compute the version's calls (`shadow_threads` its shadow copies);
        `inline_below_us` 0 keeps every call on them; a manifest's
        `runtime.inline_below_us` overrides it for its version. `timeout_s` bounds each
        call on a thread. `coalesce_rows`: the most rows of primaries one coalesced call
        holds (0: none coalesce). Each waiting primary holds its bulkhead slot, so keep
        it below the version's concurrency: the turn's other primaries, answered at once
        once the call is full, find a slot free."""
        super().__init__(inner)
        self.local = inner
        label = f"{inner.manifest.name}/{inner.manifest.version}"
        self.threads = {
            Lane.PRIMARY: Threads(label, threads),
            Lane.SHADOW: Threads(f"{label} shadow", shadow_threads),
        }
        self.timeout_s = timeout_s
        limit_us = float(inner.manifest.runtime.get("inline_below_us", inline_below_us))
        self.inline_limit_s = max(limit_us, 0.0) / 1e6
        self.inline = False  # calls of up to `inline_rows` rows run on the loop
        self.inline_rows = 0
        self.mean_call_s = 0.0  # inline: moving average; else the last round's fastest call
        self._round_length = self.WARMUP_CALLS
        self._round_calls = 0
        self._round_fastest = math.inf
        self._round_rows = 0  # the largest batch of this round that ran under the limit
        # Coalescing (module doc): primaries of one turn of the loop in one inline call.
        self.coalescing = False
        self.coalesce_rows = coalesce_rows
        # False once a model's outputs were not a row per input row (or none may coalesce)
        self.splittable = coalesce_rows > 1
        self._pending: list[Waiting] = []
        self._pending_rows = 0
        self._turn_calls = 0
        self._counting = False
        self._busy_turns = 0
        self._lonely = 0
        self._fallbacks: set[asyncio.Future[None]] = set()

    async def load(self) -> None:
        await self.inner.load()
        if self.inline_limit_s:
            why = await asyncio.to_thread(fixed_cost, self.local)
            if why is not None:
                manifest = self.manifest
                log.info("%s/%s always runs on threads: %s", manifest.name, manifest.version, why)
                self.inline_limit_s = 0.0
            else:
                _COLLECTOR.install()
        await self._warm_up()

    async def _warm_up(self) -> None:
        """Start both lanes' threads and run one call of zeros on each (module doc)."""
        sample = zeros_for(self.manifest)
        for threads in self.threads.values():
            threads.start()
        if sample is None:
            return
        manifest = self.manifest
        label = f"{manifest.name}/{manifest.version}"
        for threads in self.threads.values():
            call = partial(self._on_thread, threads, self._untimed, sample)
            if not await warm_up(label, call, threads.started - 1):
                return

    async def unload(self) -> None:
        for threads in self.threads.values():
            threads.close()
        await self.inner.unload()

    async def predict(self, request: InferRequest) -> InferResponse:
        rows = request.rows()
        if self.coalescing and self.inline and rows <= self.inline_rows and _primary():
            if self._pending_rows + rows <= self.coalesce_rows:
                return InferResponse(arrays=await self._join(request, rows))
            return InferResponse(arrays=self._inline(request.arrays()))  # the turn's is full
        now = self.predict_now(request)
        if now is not None:
            return now
        outputs = await self._on_thread(self.threads[current_lane()], self._timed, request.arrays())
        return InferResponse.of_arrays(outputs)

    def predict_now(self, request: InferRequest) -> InferResponse | None:
        if self.inline and request.rows() <= self.inline_rows:
            if self.coalescing:
                if _primary():
                    return None  # to `predict`, which joins the turn's batch
            elif self.splittable:
                self._count_turn()
            return InferResponse(arrays=self._inline(request.arrays()))
        return None

    # --- coalescing: one inline call for the primaries of a turn of the event loop ---------

    def _count_turn(self) -> None:
        """Count an inline call of this turn of the loop (a callback ends the turn); after
        `BUSY_TURNS` turns in a row of more than one, primaries coalesce."""
        self._turn_calls += 1
        if not self._counting:
            self._counting = True
            asyncio.get_running_loop().call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        self._counting = False
        self._busy_turns = self._busy_turns + 1 if self._turn_calls > 1 else 0
        self._turn_calls = 0
        if self._busy_turns >= self.BUSY_TURNS:
            self._busy_turns = 0
            self._lonely = 0
            self.coalescing = True

    def _join(self, request: InferRequest, rows: int) -> asyncio.Future[Tensors]:
        """This primary's place in the batch the next turn of the loop computes."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Tensors] = loop.create_future()
        inputs = request.arrays()
        pending = self._pending
        pending.append(Waiting(inputs, rows, key(inputs), time.perf_counter(), answer, request))
        self._pending_rows += rows
        if len(pending) == 1:
            loop.call_soon(self._flush)
        return answer

    def _flush(self) -> None:
        """Answer every primary that joined since the last flush: compatible neighbours
        in one inline call (a call of its own for one that is not)."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        now = time.perf_counter()
        for waiting in pending:  # the turn's other requests' time: a queue (Triton's "queue")
            assert waiting.caller is not None  # a primary's request, always
            waited = now - waiting.arrived
            waiting.caller.shared_wait_s += waited
            waiting.caller.queue_ns += int(waited * 1e9)
        if len(pending) == 1:
            self._lonely += 1
            if self._lonely >= self.LONELY_FLUSHES:  # the load fell: each call on its own
                self.coalescing = False
        else:
            self._lonely = 0
        try:
            start = 0
            while start < len(pending):
                end = start + 1
                first = pending[start].key
                while end < len(pending) and first is not None and pending[end].key == first:
                    end += 1
                self._answer(pending[start:end])
                start = end
        except Exception as exc:  # a bug of ours: no caller is left waiting for ever
            log.exception("coalesced inline call failed")
            for waiting in pending:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)

    def _answer(self, group: list[Waiting]) -> None:
        live = [waiting for waiting in group if not waiting.future.done()]  # a caller gone
        parts = self._shared([waiting.inputs for waiting in live], [w.rows for w in live])
        if parts is not None:
            for waiting, part in zip(live, parts, strict=True):
                resolve(waiting.future, part)
            return
        for waiting in live:
            if self.inline:
                try:
                    resolve(waiting.future, self._inline(waiting.inputs))
                except Exception as exc:  # this caller's own failure
                    waiting.future.set_exception(exc)
            else:  # sent back to the threads meanwhile: a task waits for its thread there
                task = asyncio.ensure_future(self._on_thread_for(waiting.inputs, waiting.future))
                self._fallbacks.add(task)
                task.add_done_callback(self._fallbacks.discard)

    def _shared(self, inputs: list[Tensors], rows: list[int]) -> list[Tensors] | None:
        """One inline call for several requests' `inputs`, split back into each one's
        rows; None when there was no such call (one request, or the call failed: then
        each gets a call of its own, and its own error)."""
        if len(inputs) < 2 or not self.splittable:
            return None
        try:
            outputs = self._inline(merged(inputs), calls=len(inputs))
        except Exception:
            return None
        if unsplittable(outputs, sum(rows)) is not None:
            # Outputs that are not a row per input row cannot be split: never again.
            self.splittable = False
            self.coalescing = False
            return None
        return split(outputs, rows)

    @property
    def batches_now(self) -> bool:
        return self.inline and self.splittable

    def predict_now_many(self, requests: Sequence[InferRequest]) -> list[Now]:
        """Shadow copies held together (proxy/shadow.py): compatible neighbours in one
        inline call of `coalesce_rows` rows at most, as a turn's primaries are; a request
        too large to run inline, or met once the version has left the loop, is None."""
        answers: list[Now] = [(None, 0.0)] * len(requests)
        if not self.inline:
            return answers
        group: list[tuple[int, Tensors, int]] = []  # (the request's place, inputs, rows)
        held = 0
        first: Key | None = None
        for place, request in enumerate(requests):
            rows = request.rows()
            if rows > self.inline_rows:
                continue  # awaited on a thread
            inputs = request.arrays()
            found = key(inputs)
            if group and (found is None or found != first or held + rows > self.coalesce_rows):
                self._answer_now(group, answers)
                group, held = [], 0
            group.append((place, inputs, rows))
            first = found
            held += rows
        self._answer_now(group, answers)
        return answers

    def _answer_now(self, group: list[tuple[int, Tensors, int]], answers: list[Now]) -> None:
        """`predict_now_many`'s answers for one group of compatible requests: each of a
        shared call took all of it."""
        if not group:
            return
        start = time.perf_counter()
        parts = self._shared([inputs for _, inputs, _ in group], [rows for _, _, rows in group])
        if parts is not None:
            seconds = time.perf_counter() - start
            for (place, _, _), part in zip(group, parts, strict=True):
                answers[place] = (InferResponse(arrays=part), seconds)
            return
        for place, inputs, _ in group:
            if not self.inline:
                return  # left the loop meanwhile: the rest are awaited on threads
            start = time.perf_counter()
            try:
                answer: InferResponse | Exception = InferResponse(arrays=self._inline(inputs))
            except Exception as exc:  # this request's own failure
                answer = exc
            answers[place] = (answer, time.perf_counter() - start)

    async def _on_thread_for(self, inputs: Tensors, answer: asyncio.Future[Tensors]) -> None:
        try:
            outputs = await self._on_thread(self.threads[Lane.PRIMARY], self._timed, inputs)
        except Exception as exc:
            if not answer.done():
                answer.set_exception(exc)
            return
        if not answer.done():
            answer.set_result(outputs)

    async def _on_thread(
        self, threads: Threads, fn: Callable[[_Stoppable], Tensors], inputs: Tensors
    ) -> Tensors:
        """`fn` of the call on one of `threads`, within the deadline."""
        timeout = asyncio.timeout(self.timeout_s)
        call = _Stoppable(inputs)
        try:
            async with timeout:
                return await threads.run(fn, call)
        except BaseException as exc:
            # Nobody waits for the call any more (its deadline, or a caller cancelled):
            # stopped where the runtime can (ONNX Runtime's terminate flag), its thread
            # comes back instead of computing an answer for nobody. A no-op once it ended.
            self.local.give_up(call)
            if not isinstance(exc, TimeoutError) or not timeout.expired():
                raise  # the model's own failure, or a cancellation: not our deadline
            manifest = self.manifest
            raise DeadlineExceeded(
                f"{manifest.name}/{manifest.version} did not answer within {self.timeout_s:g}s"
            ) from None

    def _inline(self, inputs: Tensors, calls: int = 1) -> Tensors:
        """`calls`: how many callers' requests `inputs` holds (coalesced): each is
        charged its share of the call in the moving average."""
        collected = _COLLECTOR.total
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return self.local.predict_sync(inputs)
        finally:
            paused = _COLLECTOR.total - collected
            spent = (time.thread_time() - start_cpu - paused) / calls
            elapsed = time.perf_counter() - start - paused
            limit = self.inline_limit_s
            sample = spent if spent < 4.0 * limit else 4.0 * limit
            mean = self.mean_call_s + self._SMOOTHING * (sample - self.mean_call_s)
            self.mean_call_s = mean
            if mean > limit or elapsed > self.SPIKE_FACTOR * limit:
                self.inline = False
                self._round_length = min(2 * self._round_length, self.MAX_ROUND)

    def _untimed(self, call: _Stoppable) -> Tensors:
        """A warm-up call: not counted in the rounds that decide whether to go inline."""
        return self.local.predict_stoppable(call.inputs, call)

    def _timed(self, call: _Stoppable) -> Tensors:
        """The call on one of the version's threads, stoppable by its caller, timed to
        decide whether to go inline."""
        inputs = call.inputs
        start = time.perf_counter()
        try:
            return self.local.predict_stoppable(inputs, call)
        finally:
            # Two threads may race on these counters; a lost update only shifts when a
            # round ends.
            elapsed = time.perf_counter() - start
            if elapsed < self._round_fastest:
                self._round_fastest = elapsed
            if elapsed < self.inline_limit_s:
                self._round_rows = max(self._round_rows, _rows(inputs))
            self._round_calls += 1
            if self._round_calls >= self._round_length:
                fastest, rows = self._round_fastest, self._round_rows
                self._round_calls, self._round_fastest, self._round_rows = 0, math.inf, 0
                if fastest < self.inline_limit_s:  # 0 when the cost is not fixed
                    self.mean_call_s = fastest
                    self.inline_rows = rows
                    self.inline = True
                elif not self.inline:
                    self.mean_call_s = fastest
                # else: a round of batches too big to go inline while smaller calls do;
                # their cost must not count against the calls that run inline (one
                # client's big batches would push every small call onto the threads).


def _primary() -> bool:
    return current_lane() is Lane.PRIMARY


class _Stoppable:
    """One call handed to a thread: its inputs, and the token that names it to
    `LocalRunner.give_up` (the thread's queue entry holds it while the call runs, so
    its id() names no other call meanwhile)."""

    __slots__ = ("inputs",)

    def __init__(self, inputs: Tensors) -> None:
        self.inputs = inputs


async def warm_up(label: str, call: Callable[[], Awaitable[object]], then: int) -> bool:
    """One warm-up `call`, then `then` more at once (one first: a model that fails or
    hangs on zeros costs one call); False, logged, when one failed or outlived its
    deadline, and the version serves anyway."""
    try:
        await call()
        await asyncio.gather(*(call() for _ in range(then)))
    except Exception as exc:  # whatever the model raised on zeros, or its deadline
        log.warning("%s: a warm-up call on zeros failed (%s); serving anyway", label, exc)
        return False
    return True


def zeros_for(manifest: Manifest) -> Tensors | None:
    """One row of zeros per declared input (every -1 dimension 1), or None when the
    manifest declares no inputs or one that is not numeric."""
    specs = manifest.input_specs
    if not specs or any(spec.datatype == "BYTES" for spec in specs):
        return None
    return {
        spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], V2_TO_NUMPY[spec.datatype])
        for spec in specs
    }


def _rows(inputs: Tensors) -> int:
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0
