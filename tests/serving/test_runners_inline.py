"""LocalRunner's inline mode: fast models leave the executor, slow or spiking ones stay on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.manifest import MANIFEST_NAME, load_manifest
from rollguard.serving.runners.onnx import OnnxRunner
from rollguard.serving.runners.sklearn import SklearnRunner
from rollguard.serving.tensors import Tensors


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    build_demo_registry(root, frameworks=("onnx", "sklearn"))
    return root


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="model")
    yield pool
    pool.shutdown()


class _Stalling(OnnxRunner):
    """The real ONNX model, plus a stall on the calls a test asks for (a GC pause, a page-in)."""

    stall_s = 0.0  # blocked (sleeping): wall-clock time only
    burn_s = 0.0  # computing: CPU time
    threads: set[str]

    def predict_sync(self, inputs: Tensors) -> Tensors:
        self.threads.add(threading.current_thread().name)
        if self.stall_s:
            time.sleep(self.stall_s)
        if self.burn_s:
            until = time.thread_time() + self.burn_s
            while time.thread_time() < until:
                pass
        return super().predict_sync(inputs)


def _row() -> Tensors:
    x, _ = load_eval_data()
    return {"input": x[:1]}


async def _warmed(
    registry: Path, executor: ThreadPoolExecutor, limit_us: float
) -> tuple[_Stalling, Tensors]:
    """fraud-onnx 1.0.0 under `limit_us`, past its first executor round: inline."""
    directory = registry / "fraud-onnx" / "1.0.0"
    runner = _Stalling(load_manifest(directory / MANIFEST_NAME), directory, executor, limit_us)
    runner.threads = set()
    await runner.load()
    row = _row()
    for _ in range(runner.WARMUP_CALLS):
        await runner.predict(row)
    assert runner.inline
    return runner, row


async def test_fast_model_goes_inline_after_warm_up(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    directory = registry / "fraud-onnx" / "1.0.0"
    runner = _Stalling(load_manifest(directory / MANIFEST_NAME), directory, executor, 50_000)
    runner.threads = set()
    await runner.load()
    row = _row()
    for _ in range(runner.WARMUP_CALLS - 1):
        await runner.predict(row)
    assert not runner.inline  # still measuring
    assert all(name.startswith("model") for name in runner.threads)
    await runner.predict(row)
    assert runner.inline and 0 < runner.mean_call_s < 0.05  # the round's fastest call
    runner.threads.clear()
    got = await runner.predict(row)
    assert runner.threads == {threading.current_thread().name}  # ran on the caller's thread
    want = runner.predict_sync(row)
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])


async def test_a_spike_sends_it_back_to_the_executor_until_it_decays(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    # 0.5 ms limit: the model's own ~20 us is far below it, a 0.6 s stall over 1000x it.
    runner, row = await _warmed(registry, executor, 500)
    runner.stall_s = 0.6
    await runner.predict(row)
    assert not runner.inline  # one call that long is enough
    runner.stall_s = 0.0
    runner.threads.clear()
    calls = 0
    while not runner.inline:
        await runner.predict(row)
        calls += 1
    # Back inline after one executor round, twice as long as the first.
    assert calls == 2 * runner.WARMUP_CALLS
    assert all(name.startswith("model") for name in runner.threads)


async def test_an_average_over_the_limit_sends_it_back_too(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    runner, row = await _warmed(registry, executor, 5_000)
    runner.burn_s = 0.008  # 8 ms of CPU a call: over the limit, the average catches it
    calls = 0
    while runner.inline:
        await runner.predict(row)
        calls += 1
    assert 1 < calls < 30 and runner.mean_call_s > 0.005


async def test_slow_model_never_goes_inline(registry: Path, executor: ThreadPoolExecutor) -> None:
    directory = registry / "fraud" / "1.3.0"  # the demo's slow candidate: 25 ms a call
    runner = SklearnRunner(load_manifest(directory / MANIFEST_NAME), directory, executor, 1_000)
    await runner.load()
    x, _ = load_eval_data()
    for _ in range(runner.WARMUP_CALLS + 3):
        await runner.predict({"input": x[:1]})
    assert not runner.inline and runner.mean_call_s > 0.02


async def test_zero_limit_or_manifest_opt_out_keeps_the_executor(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    directory = registry / "fraud-onnx" / "1.0.0"
    manifest = load_manifest(directory / MANIFEST_NAME)
    never = OnnxRunner(manifest, directory, executor, 0)
    opted_out = OnnxRunner(
        manifest.model_copy(update={"runtime": {"inline_below_us": 0}}), directory, executor, 1e6
    )
    for runner in (never, opted_out):
        await runner.load()
        for _ in range(runner.WARMUP_CALLS + 3):
            await runner.predict(_row())
        assert not runner.inline


async def test_one_pause_is_forgiven_and_big_batches_stay_on_the_executor(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    runner, row = await _warmed(registry, executor, 5_000)
    assert runner.inline_rows == 1
    runner.stall_s = 0.05  # a 50 ms pause (a collector pass, a page fault): clipped to 20 ms
    await runner.predict(row)
    runner.stall_s = 0.0
    assert runner.inline
    x, _ = load_eval_data()
    runner.threads.clear()
    big = await runner.predict({"input": x[:64]})  # 64 rows: never measured, not inline
    assert runner.threads and all(name.startswith("model") for name in runner.threads)
    assert big["label"].shape == (64,)
    assert not runner.fits_inline({"input": x[:64]}) and runner.fits_inline(row)
