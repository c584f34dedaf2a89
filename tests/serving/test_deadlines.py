"""Deadline: an answer within the limit passes through untouched; past it the caller gets
DeadlineExceeded at once, naming the version, and gives up its place in a queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from rollguard.serving.batching import BatchingRunner
from rollguard.serving.deadlines import Deadline
from rollguard.serving.errors import DeadlineExceeded, ModelExecutionError, ServingError
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners import Runner
from tests.serving.support import predict_arrays

MANIFEST = Manifest(
    name="sleepy", version="2.1.0", framework="onnx", artifact="model.onnx", sha256="0" * 64
)


class Sleeper(Runner):
    """Answers y = x after sleeping `delay_s` (or holding until `gate` is set), or raises
    `error`; records the rows of every call it started and whether one was cancelled."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(MANIFEST, Path("."))
        self.delay_s = delay_s
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.calls: list[int] = []
        self.started = asyncio.Event()
        self.cancelled = False
        self.answers: list[InferResponse] = []

    async def load(self) -> None:
        self._ready = True

    async def predict(self, request: InferRequest) -> InferResponse:
        x = request.arrays()["x"]
        self.calls.append(len(x))
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s)  # the model being slow, not synchronisation
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        answer = InferResponse.of_arrays({"y": x})
        self.answers.append(answer)
        return answer


def _request(value: float, rows: int = 1) -> InferRequest:
    return InferRequest.of_arrays({"x": np.full((rows, 2), value, np.float32)})


async def test_a_runner_that_sleeps_past_the_limit_raises_deadline_exceeded() -> None:
    inner = Sleeper(delay_s=3600)
    runner = Deadline(inner, 0.05)
    await runner.load()
    async with asyncio.timeout(10):  # the caller is not kept waiting for the model
        with pytest.raises(DeadlineExceeded) as info:
            await runner.predict(_request(1))
    assert str(info.value) == "sleepy/2.1.0 did not answer within 0.05s"
    assert isinstance(info.value, ServingError)
    assert inner.cancelled  # the caller's wait ended at the deadline
    assert runner.ready  # a slow call is not a reason to stop serving


async def test_an_answer_in_time_passes_through() -> None:
    inner = Sleeper()
    runner = Deadline(inner, 30)
    await runner.load()
    request = _request(2, rows=3)
    answer = await runner.predict(request)
    assert answer is inner.answers[0]  # untouched
    np.testing.assert_array_equal(answer.arrays()["y"], request.arrays()["x"])
    assert not inner.cancelled


async def test_errors_pass_through_and_lifecycle_is_the_inner_runners() -> None:
    inner = Sleeper()
    runner = Deadline(inner, 30)
    assert (runner.manifest, runner.directory) == (inner.manifest, inner.directory)
    assert not runner.ready
    await runner.load()
    assert runner.ready and inner.ready
    inner.error = ModelExecutionError("numerical fault")
    with pytest.raises(ModelExecutionError, match="numerical fault"):
        await runner.predict(_request(1))
    await runner.unload()
    assert not runner.ready and not inner.ready


async def test_a_caller_queued_behind_a_busy_batch_gives_up_its_place() -> None:
    inner = Sleeper()
    inner.gate = asyncio.Event()
    batching = BatchingRunner(inner, max_batch_size=1, max_delay_ms=0, max_concurrent_batches=1)
    runner = Deadline(batching, 0.05)
    await runner.load()
    try:
        busy = asyncio.ensure_future(predict_arrays(batching, {"x": np.zeros((1, 2), np.float32)}))
        async with asyncio.timeout(10):
            await inner.started.wait()  # the one batch slot is taken
            with pytest.raises(DeadlineExceeded, match=r"sleepy/2\.1\.0"):
                await runner.predict(_request(7))  # waits in the queue past its deadline
        inner.gate.set()
        np.testing.assert_array_equal((await busy)["y"], np.zeros((1, 2)))
        runner.seconds = 30.0  # the next caller is served (with room for a loaded machine)
        answer = await runner.predict(_request(3))
        np.testing.assert_array_equal(answer.arrays()["y"], np.full((1, 2), 3))
    finally:
        await runner.unload()
    assert inner.calls == [1, 1]  # the caller that gave up never reached the model


class _RaisesTimeoutError(Runner):
    """Fails at once with a TimeoutError of its own (say, a lock or a client it uses)."""

    async def load(self) -> None:
        self._ready = True

    async def predict(self, request: InferRequest) -> InferResponse:
        raise TimeoutError("the feature store did not answer")


async def test_an_inner_timeout_error_is_not_mistaken_for_the_deadline() -> None:
    runner = Deadline(_RaisesTimeoutError(MANIFEST, Path(".")), 30)
    await runner.load()
    with pytest.raises(TimeoutError, match="feature store"):
        await runner.predict(_request(1))
