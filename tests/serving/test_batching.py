"""BatchingRunner: callers get exactly their own rows back, batches coalesce, errors fan out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.pipeline import Pipeline

from rollguard.serving.batching import BatchingRunner
from rollguard.serving.errors import ModelExecutionError, NotReady, Overloaded
from rollguard.serving.manifest import MANIFEST_NAME, Manifest, load_manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners import Runner
from rollguard.serving.runners.onnx import OnnxRunner
from rollguard.serving.scheduling import Scheduled
from rollguard.serving.tensors import Tensors
from tests.serving.support import predict_arrays

MANIFEST = Manifest(
    name="rowwise", version="1", framework="onnx", artifact="model.onnx", sha256="0" * 64
)


class RowWise(Runner):
    """y = 2x + (sum of x's row): each output row depends on its own input row only.

    Computes on a worker thread, as a local model does. Raises ModelExecutionError if any
    input is negative; records the rows of every call; optionally holds each call until
    `gate` is set.
    """

    def __init__(self) -> None:
        super().__init__(MANIFEST, Path("."))
        self.calls: list[int] = []
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def load(self) -> None:
        self._ready = True

    async def predict(self, request: InferRequest) -> InferResponse:
        x = request.arrays()["x"]
        self.calls.append(x.shape[0])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return InferResponse.of_arrays(await asyncio.to_thread(self._compute, x))

    @staticmethod
    def _compute(x: np.ndarray) -> Tensors:
        if (x < 0).any():
            raise ModelExecutionError("negative input")
        return {"y": 2 * x + x.sum(axis=1, keepdims=True), "rows": np.arange(x.shape[0])}


def expected(x: np.ndarray) -> np.ndarray:
    y: np.ndarray = 2 * x + x.sum(axis=1, keepdims=True)
    return y


def rows_for(caller: int, n: int, width: int, dtype: type = np.float32) -> np.ndarray:
    # Integer-valued and unique per caller, so a mixed-up row is always detected.
    return (np.arange(n * width).reshape(n, width) + 1000 * caller).astype(dtype)


async def started(runner: RowWise) -> None:
    async with asyncio.timeout(10):  # "inner runner never called" otherwise
        await runner.started.wait()


def ask(runner: Runner, inputs: Tensors) -> asyncio.Task[Tensors]:
    """`runner`'s answer to `inputs` as arrays, asked in a task of its own."""
    return asyncio.ensure_future(predict_arrays(runner, inputs))


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(0, 12), st.sampled_from([2, 3]), st.sampled_from([np.float32, np.float64])
        ),
        min_size=1,
        max_size=40,
    ),
    yields=st.lists(st.integers(0, 3), min_size=40, max_size=40),
    max_batch_size=st.integers(1, 16),
    max_delay_ms=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_every_caller_gets_exactly_its_own_rows(
    requests: list[tuple[int, int, type]],
    yields: list[int],
    max_batch_size: int,
    max_delay_ms: float,
) -> None:
    async def scenario() -> None:
        inner = RowWise()
        runner = BatchingRunner(inner, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
        await runner.load()

        async def call(i: int, n: int, width: int, dtype: type) -> None:
            for _ in range(yields[i]):  # interleave arrivals without wall-clock sleeps
                await asyncio.sleep(0)
            x = rows_for(i, n, width, dtype)
            out = await predict_arrays(runner, {"x": x})
            assert out["y"].dtype == x.dtype
            np.testing.assert_array_equal(out["y"], expected(x))
            assert out["y"].shape == (n, width)

        try:
            await asyncio.gather(*(call(i, *r) for i, r in enumerate(requests)))
        finally:
            await runner.unload()
        assert sum(inner.calls) == sum(n for n, _, _ in requests)
        oversized = {n for n, _, _ in requests if n > max_batch_size}
        assert all(rows <= max_batch_size or rows in oversized for rows in inner.calls)

    asyncio.run(scenario())


async def test_concurrent_callers_share_inner_calls() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=32, max_delay_ms=1000)
    await runner.load()
    try:
        xs = [rows_for(i, 1, 3) for i in range(32)]
        outs = await asyncio.gather(*(predict_arrays(runner, {"x": x}) for x in xs))
    finally:
        await runner.unload()
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], expected(x))
    # The batch filled up (32 rows) so it ran at once, without waiting out the delay.
    assert len(inner.calls) < len(xs)
    assert sum(inner.calls) == 32


async def test_decoded_v2_requests_are_batched_like_arrays() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=4, max_delay_ms=1000)
    await runner.load()
    xs = [rows_for(i, 2, 3) for i in range(2)]
    bodies = [
        orjson.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.ravel()}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for x in xs
    ]
    try:
        answers = await asyncio.gather(
            *(runner.predict(InferRequest.decode(body)) for body in bodies)
        )
    finally:
        await runner.unload()
    assert inner.calls == [4]  # one inner call for both
    for i, (x, answer) in enumerate(zip(xs, answers, strict=True)):
        np.testing.assert_array_equal(answer.arrays()["y"], expected(x))
        np.testing.assert_array_equal(answer.arrays()["rows"], [2 * i, 2 * i + 1])  # its rows
        assert answer.prediction() == float(np.argmax(expected(x)[0]))


async def test_inner_error_reaches_every_caller_of_the_batch() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=8, max_delay_ms=1000)
    await runner.load()
    try:
        xs = [rows_for(i, 1, 2) for i in range(8)]
        xs[5] = -xs[5] - 1
        results = await asyncio.gather(
            *(predict_arrays(runner, {"x": x}) for x in xs), return_exceptions=True
        )
        assert inner.calls == [8]
        assert all(isinstance(r, ModelExecutionError) for r in results)
        # The runner keeps serving after a failed batch.
        out = await predict_arrays(runner, {"x": xs[0]})
        np.testing.assert_array_equal(out["y"], expected(xs[0]))
    finally:
        await runner.unload()


async def test_incompatible_inputs_run_in_separate_batches() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=6, max_delay_ms=0)
    await runner.load()
    try:
        xs = [rows_for(i, 2, 2 + i % 2, np.float32 if i % 3 else np.float64) for i in range(6)]
        outs = await asyncio.gather(*(predict_arrays(runner, {"x": x}) for x in xs))
    finally:
        await runner.unload()
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], expected(x))
    assert len(inner.calls) >= 2


async def test_request_larger_than_max_batch_runs_alone() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=4, max_delay_ms=0)
    await runner.load()
    try:
        big, small = rows_for(0, 10, 2), rows_for(1, 1, 2)
        out_big, out_small = await asyncio.gather(
            predict_arrays(runner, {"x": big}), predict_arrays(runner, {"x": small})
        )
    finally:
        await runner.unload()
    np.testing.assert_array_equal(out_big["y"], expected(big))
    np.testing.assert_array_equal(out_small["y"], expected(small))
    assert sorted(inner.calls) == [1, 10]


async def test_full_queue_is_overloaded_and_unload_fails_the_queued() -> None:
    inner = RowWise()
    inner.gate = asyncio.Event()
    runner = BatchingRunner(
        inner, max_batch_size=1, max_delay_ms=0, max_queued=2, max_concurrent_batches=1
    )
    await runner.load()
    running = ask(runner, {"x": rows_for(0, 1, 2)})
    await started(inner)  # the one batch slot is busy; what follows waits in the queue
    queued = [ask(runner, {"x": rows_for(i, 1, 2)}) for i in (1, 2)]
    await asyncio.sleep(0)  # one turn of the loop: each task queues before its first await
    with pytest.raises(Overloaded):
        await predict_arrays(runner, {"x": rows_for(3, 1, 2)})
    unloading = asyncio.create_task(runner.unload())
    for task in queued:
        with pytest.raises(NotReady):
            await task
    inner.gate.set()
    await unloading
    np.testing.assert_array_equal((await running)["y"], expected(rows_for(0, 1, 2)))
    with pytest.raises(NotReady):
        await predict_arrays(runner, {"x": rows_for(0, 1, 2)})


async def test_cancelled_caller_does_not_disturb_the_others() -> None:
    inner = RowWise()
    runner = BatchingRunner(inner, max_batch_size=4, max_delay_ms=1000)
    await runner.load()
    try:
        tasks = [ask(runner, {"x": rows_for(i, 1, 2)}) for i in range(5)]
        await asyncio.sleep(0)  # one turn of the loop: each task queues before its first await
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await runner.unload()
    assert isinstance(results[0], asyncio.CancelledError)
    for i, out in enumerate(results[1:], start=1):
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["y"], expected(rows_for(i, 1, 2)))


async def test_batches_a_real_onnx_model(
    write_version: Callable[..., Path], cancer_features: np.ndarray, cancer_estimator: Pipeline
) -> None:
    directory = write_version("cancer", "1")
    manifest = load_manifest(directory / MANIFEST_NAME)
    runner = BatchingRunner(
        Scheduled(OnnxRunner(manifest, directory), 2, 0, timeout_s=60),
        max_batch_size=16,
        max_delay_ms=5,
    )
    await runner.load()
    try:
        chunks = np.array_split(cancer_features[:100], 40)
        outs = await asyncio.gather(*(predict_arrays(runner, {"input": c}) for c in chunks))
    finally:
        await runner.unload()
    labels = np.concatenate([o["label"] for o in outs])
    probabilities = np.concatenate([o["probabilities"] for o in outs])
    np.testing.assert_array_equal(labels, cancer_estimator.predict(cancer_features[:100]))
    np.testing.assert_allclose(
        probabilities, cancer_estimator.predict_proba(cancer_features[:100]), atol=1e-5
    )
