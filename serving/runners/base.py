"""The one runner interface every framework implements: load, predict, unload."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from pathlib import Path

from rollguard.serving.manifest import Manifest
from rollguard.serving.tensors import Tensors


class Runner(ABC):
    """Takes a batch of named numpy inputs, returns named numpy outputs.

    `predict` never blocks the event loop. Outputs carry every output the model
    produces, batch dimension first; choosing the requested ones is the caller's job.
    """

    # True when `predict_raw` takes a V2 JSON infer body and gives the V2 JSON answer
    # untouched (remote runners): the gateway then forwards bytes instead of tensors.
    passes_v2_bodies = False
    # True while the model is fast enough to run on the caller's thread (LocalRunner).
    inline = False

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.manifest = manifest
        self.directory = directory
        self.ready = False

    @abstractmethod
    async def load(self) -> None:
        """Load the artifact (or connect to the upstream); raise ArtifactError on failure."""

    @abstractmethod
    async def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch; raise ModelExecutionError / UpstreamError on failure."""

    def fits_inline(self, inputs: Tensors) -> bool:
        """Whether `predict_inline` may take this batch (it neither yields nor times out)."""
        return False

    def predict_inline(self, inputs: Tensors) -> Tensors:
        """Compute on the calling thread; only for batches `fits_inline` accepts."""
        raise NotImplementedError(f"{type(self).__name__} cannot run inline")

    async def predict_raw(self, body: bytes) -> bytes:
        """Forward a V2 JSON infer body; only runners with `passes_v2_bodies` have it."""
        raise NotImplementedError(f"{type(self).__name__} takes tensors, not V2 bodies")

    async def unload(self) -> None:
        """Release what load() took."""
        self.ready = False

    @property
    def artifact_path(self) -> Path:
        assert self.manifest.artifact is not None
        return self.directory / self.manifest.artifact


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


def _rows(inputs: Tensors) -> int:
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0


class LocalRunner(Runner):
    """A runner whose model computes in-process, on executor threads or inline.

    ONNX Runtime, torch and most of scikit-learn release the GIL while computing,
    so a thread pool gives real parallelism without pickling tensors to processes.
    For a model that answers in tens of microseconds, though, handing the call to a
    thread and waking the event loop again costs more than the model itself.

    So calls are measured in rounds of `WARMUP_CALLS` on the executor. When the fastest
    call of a round took under `inline_below_us` (the fastest, because a call on a
    thread also waits for the GIL while the event loop holds it, which says nothing
    about the model), the version goes inline for batches up to the largest one that
    ran under the limit in that round: `predict_inline` runs those on the caller's
    thread. There their own CPU time counts (collector pauses left out; the OS may
    preempt the loop thread on a busy machine, which the wall clock would blame on the
    model), in a moving average of calls clipped at 4x the limit: an average over the
    limit, or one call over `SPIKE_FACTOR` x the limit by the wall clock (a model that
    blocks), sends the version back to the executor, and each return doubles the next
    round's length (to `MAX_ROUND`).
    """

    WARMUP_CALLS = 32
    MAX_ROUND = 4096
    SPIKE_FACTOR = 1000.0
    _SMOOTHING = 0.05  # weight of the newest inline call in the moving average

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        executor: Executor | None = None,
        inline_below_us: float = 0.0,
    ) -> None:
        super().__init__(manifest, directory)
        self._executor = executor
        limit_us = float(manifest.runtime.get("inline_below_us", inline_below_us))
        self.inline_limit_s = max(limit_us, 0.0) / 1e6
        if self.inline_limit_s:
            _COLLECTOR.install()
        self.inline_rows = 0  # the largest batch that may run inline
        self.mean_call_s = 0.0  # inline: moving average; else the last round's fastest call
        self._round_length = self.WARMUP_CALLS
        self._round_calls = 0
        self._round_fastest = math.inf
        self._round_rows = 0  # the largest batch of this round that ran under the limit

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_sync)
        self.ready = True

    async def predict(self, inputs: Tensors) -> Tensors:
        if self.inline and _rows(inputs) <= self.inline_rows:
            return self.predict_inline(inputs)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._timed_predict, inputs
        )

    def fits_inline(self, inputs: Tensors) -> bool:
        return self.inline and _rows(inputs) <= self.inline_rows

    def predict_inline(self, inputs: Tensors) -> Tensors:
        collected = _COLLECTOR.total
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return self.predict_sync(inputs)
        finally:
            paused = _COLLECTOR.total - collected
            # The average is of CPU time: on a shared machine the OS may preempt the loop
            # thread mid-call, which the wall clock would blame on the model.
            spent = time.thread_time() - start_cpu - paused
            elapsed = time.perf_counter() - start - paused
            limit = self.inline_limit_s
            sample = spent if spent < 4.0 * limit else 4.0 * limit
            mean = self.mean_call_s + self._SMOOTHING * (sample - self.mean_call_s)
            self.mean_call_s = mean
            if mean > limit or elapsed > self.SPIKE_FACTOR * limit:
                self.inline = False
                self._round_length = min(2 * self._round_length, self.MAX_ROUND)

    def _timed_predict(self, inputs: Tensors) -> Tensors:
        """predict_sync on an executor thread, timed to decide whether to go inline."""
        start = time.perf_counter()
        try:
            return self.predict_sync(inputs)
        finally:
            # Two executor threads may race on these counters; a lost update only
            # shifts when a round ends.
            elapsed = time.perf_counter() - start
            if elapsed < self._round_fastest:
                self._round_fastest = elapsed
            if elapsed < self.inline_limit_s:
                self._round_rows = max(self._round_rows, _rows(inputs))
            self._round_calls += 1
            if self._round_calls >= self._round_length:
                fastest, rows = self._round_fastest, self._round_rows
                self._round_calls, self._round_fastest, self._round_rows = 0, math.inf, 0
                self.mean_call_s = fastest
                if fastest < self.inline_limit_s:
                    self.inline_rows = rows
                    self.inline = True

    async def unload(self) -> None:
        self.ready = False
        self._unload_sync()

    @abstractmethod
    def _load_sync(self) -> None:
        """Read the artifact; raise ArtifactError with the reason when it cannot be used."""

    @abstractmethod
    def predict_sync(self, inputs: Tensors) -> Tensors:
        """Compute one batch on the calling thread; raise ModelExecutionError on failure."""

    def _unload_sync(self) -> None:
        """Drop references to the framework's objects."""
