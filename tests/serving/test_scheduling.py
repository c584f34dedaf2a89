"""Scheduled: fast models leave the executor for the event loop, slow or spiking ones stay
on it, and big batches never run inline."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollguard.serving.bulkhead import Bulkhead, Lane, in_shadow_lane
from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.errors import DeadlineExceeded, ModelExecutionError
from rollguard.serving.manifest import MANIFEST_NAME, Manifest, load_manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.outputs import CheckedOutputs
from rollguard.serving.runners import LocalRunner
from rollguard.serving.runners.onnx import OnnxRunner
from rollguard.serving.runners.sklearn import SklearnRunner
from rollguard.serving.scheduling import Scheduled
from rollguard.serving.tensors import Tensors
from tests.serving.support import eventually

_TIMEOUT_S = 60.0  # far beyond any call here: the limit is tested on its own


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
            time.sleep(self.stall_s)  # the model under test blocking, not synchronisation
        if self.burn_s:
            until = time.thread_time() + self.burn_s
            while time.thread_time() < until:
                pass
        return super().predict_sync(inputs)


def _row() -> InferRequest:
    x, _ = load_eval_data()
    return InferRequest.of_arrays({"input": x[:1]})


def _rows(n: int) -> InferRequest:
    x, _ = load_eval_data()
    return InferRequest.of_arrays({"input": x[:n]})


def _runs_inline(sched: Scheduled, request: InferRequest) -> bool:
    """What Scheduled.predict decides for this request."""
    return sched.inline and request.rows() <= sched.inline_rows


async def _stalling(
    registry: Path, executor: ThreadPoolExecutor, limit_us: float
) -> tuple[Scheduled, _Stalling]:
    directory = registry / "fraud-onnx" / "1.0.0"
    model = _Stalling(load_manifest(directory / MANIFEST_NAME), directory)
    model.threads = set()
    sched = Scheduled(model, 2, limit_us, timeout_s=_TIMEOUT_S)
    await sched.load()
    return sched, model


async def _warmed(
    registry: Path, executor: ThreadPoolExecutor, limit_us: float
) -> tuple[Scheduled, _Stalling, InferRequest]:
    """fraud-onnx 1.0.0 under `limit_us`, past its first executor round: inline."""
    sched, model = await _stalling(registry, executor, limit_us)
    row = _row()
    for _ in range(sched.WARMUP_CALLS):
        await sched.predict(row)
    assert sched.inline
    return sched, model, row


async def test_fast_model_goes_inline_after_warm_up(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    sched, model = await _stalling(registry, executor, 50_000)
    row = _row()
    for _ in range(sched.WARMUP_CALLS - 1):
        await sched.predict(row)
    assert not sched.inline  # still measuring
    assert model.threads and all(name.startswith("model") for name in model.threads)
    await sched.predict(row)
    assert sched.inline and 0 < sched.mean_call_s < 0.05  # the round's fastest call
    model.threads.clear()
    got = (await sched.predict(row)).arrays()
    assert model.threads == {threading.current_thread().name}  # ran on the caller's thread
    want = model.predict_sync(row.arrays())
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
    await sched.unload()
    assert not sched.ready and not model.ready


async def test_a_spike_sends_it_back_to_the_executor_until_it_decays(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    # 0.5 ms limit: the model's own ~20 us is far below it, a 0.6 s stall over 1000x it.
    sched, model, row = await _warmed(registry, executor, 500)
    model.stall_s = 0.6
    await sched.predict(row)
    assert not sched.inline  # one call that long is enough
    model.stall_s = 0.0
    model.threads.clear()
    calls = 0
    while not sched.inline:
        await sched.predict(row)
        calls += 1
    # Back inline after one executor round, twice as long as the first.
    assert calls == 2 * sched.WARMUP_CALLS
    assert all(name.startswith("model") for name in model.threads)


async def test_an_average_over_the_limit_sends_it_back_too(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    sched, model, row = await _warmed(registry, executor, 5_000)
    model.burn_s = 0.008  # 8 ms of CPU a call: over the limit, the average catches it
    calls = 0
    while sched.inline:
        await sched.predict(row)
        calls += 1
    assert 1 < calls < 30 and sched.mean_call_s > 0.005


async def test_slow_model_never_goes_inline(registry: Path, executor: ThreadPoolExecutor) -> None:
    directory = registry / "fraud" / "1.3.0"  # the demo's slow candidate: 25 ms a call
    model = SklearnRunner(load_manifest(directory / MANIFEST_NAME), directory)
    sched = Scheduled(model, 2, 1_000, timeout_s=_TIMEOUT_S)
    await sched.load()
    for _ in range(sched.WARMUP_CALLS + 3):
        await sched.predict(_row())
    assert not sched.inline and sched.mean_call_s > 0.02


async def test_zero_limit_or_manifest_opt_out_keeps_the_executor(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    directory = registry / "fraud-onnx" / "1.0.0"
    manifest = load_manifest(directory / MANIFEST_NAME)
    never = Scheduled(OnnxRunner(manifest, directory), 2, 0, timeout_s=_TIMEOUT_S)
    opted_out = Scheduled(
        OnnxRunner(manifest.model_copy(update={"runtime": {"inline_below_us": 0}}), directory),
        2,
        1e6,
        timeout_s=_TIMEOUT_S,
    )
    for sched in (never, opted_out):
        await sched.load()
        for _ in range(sched.WARMUP_CALLS + 3):
            await sched.predict(_row())
        assert not sched.inline and sched.inline_limit_s == 0


async def test_one_pause_is_forgiven_and_big_batches_stay_on_the_executor(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    sched, model, row = await _warmed(registry, executor, 5_000)
    assert sched.inline_rows == 1
    model.stall_s = 0.05  # a 50 ms pause (a collector pass, a page fault): clipped to 20 ms
    await sched.predict(row)
    model.stall_s = 0.0
    assert sched.inline
    model.threads.clear()
    big = _rows(64)  # 64 rows: never measured, not inline
    answer = await sched.predict(big)
    assert model.threads and all(name.startswith("model") for name in model.threads)
    assert answer.arrays()["label"].shape == (64,)
    assert not _runs_inline(sched, big) and _runs_inline(sched, row)


async def test_rounds_of_big_batches_leave_the_inline_average_of_small_calls_alone(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    """One client's large batches run on the threads in rounds of their own; that their
    fastest call is over the limit says nothing about the one-row calls running inline,
    which must stay inline (41fcb74: they were pushed onto the threads, and a canary's
    latency check rolled back a healthy candidate)."""
    sched, model, row = await _warmed(registry, executor, 5_000)
    small_mean = sched.mean_call_s
    assert sched.inline_rows == 1 and small_mean < 0.005
    big = _rows(64)
    model.burn_s = 0.006  # every call on the threads: over the 5 ms limit
    for _ in range(2 * sched.WARMUP_CALLS):  # two rounds (the round length while inline)
        await sched.predict(big)  # 64 rows: never inline
    model.burn_s = 0.0
    assert sched.inline and sched.mean_call_s == small_mean
    model.threads.clear()
    await sched.predict(row)
    assert model.threads == {threading.current_thread().name}  # still on the loop


class _Held(LocalRunner):
    """A local model that blocks its thread until `gate` is set (at most 10 s)."""

    def __init__(self) -> None:
        manifest = Manifest(
            name="held", version="3", framework="onnx", artifact="model.onnx", sha256="0" * 64
        )
        super().__init__(manifest, Path("."))
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.finished = threading.Event()

    def _load_sync(self) -> None:
        pass

    def predict_sync(self, inputs: Tensors) -> Tensors:
        self.entered.set()
        try:
            if not self.gate.wait(10):
                raise ModelExecutionError("never released")
            return {"y": inputs["x"] * 2}
        finally:
            self.finished.set()


async def test_a_call_on_a_thread_past_its_limit_is_deadline_exceeded(
    executor: ThreadPoolExecutor,
) -> None:
    model = _Held()
    sched = Scheduled(model, 2, 0, timeout_s=0.05)
    await sched.load()
    x = np.ones((2, 2), np.float32)
    async with asyncio.timeout(5):  # the caller is not kept waiting for the thread
        with pytest.raises(DeadlineExceeded, match=r"^held/3 did not answer within 0\.05s$"):
            await sched.predict(InferRequest.of_arrays({"x": x}))
    assert not model.finished.is_set()  # the caller did not wait for the held thread
    model.gate.set()
    sched.timeout_s = 30.0  # the next call is served (with room for a loaded machine)
    answer = await sched.predict(InferRequest.of_arrays({"x": x}))
    np.testing.assert_array_equal(answer.arrays()["y"], x * 2)


async def test_an_onnx_call_past_its_deadline_is_stopped_and_frees_its_thread(
    tmp_path: Path,
) -> None:
    """ONNX Runtime's terminate flag: a call of about 60 s (a Loop) given up at its 0.5 s
    deadline, or whose caller is cancelled, stops within a few Loop iterations' time, so
    its thread is back at once, not a minute later; the next call is served as usual."""
    from tests.faults import models

    data = models.onnx_bytes(models.with_loop(models.onnx_model(models.logistic())))
    directory = models.write_version(tmp_path / "registry", "loop", "1", "model.onnx", data)
    row = models.rows()[:1].copy()
    row[0, 0] = 60.0 / models.seconds_per_trip(data)
    model = OnnxRunner(load_manifest(directory / MANIFEST_NAME), directory)
    sched = Scheduled(model, 1, 0, timeout_s=0.5)
    await sched.load()
    threads = sched.threads[Lane.PRIMARY]
    with pytest.raises(DeadlineExceeded):
        await sched.predict(InferRequest.of_arrays({"input": row}))
    assert threads.stuck == 1  # its caller gave up; the thread still had the call
    deadline = time.monotonic() + 20  # a minute of Loop left had it not been stopped
    while threads.stuck:
        assert time.monotonic() < deadline, "the call was not stopped"
        await asyncio.sleep(0.01)
    # A caller cancelled (a client gone, a shadow's own deadline) stops its call too.
    sched.timeout_s = 600.0
    call = asyncio.create_task(sched.predict(InferRequest.of_arrays({"input": row})))
    deadline = time.monotonic() + 20
    while not threads._busy:  # until it is handed to the thread
        assert time.monotonic() < deadline, "the call never reached a thread"
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    deadline = time.monotonic() + 20
    while threads.stuck:
        assert time.monotonic() < deadline, "the cancelled call was not stopped"
        await asyncio.sleep(0.01)
    quick = models.rows()[:1].copy()
    quick[0, 0] = 1.0
    answer = await sched.predict(InferRequest.of_arrays({"input": quick}))
    assert answer.arrays()["label"].shape == (1,)
    await sched.unload()


class _Recording(OnnxRunner):
    """The real ONNX model, recording each call's thread and inputs; `on_zeros` raises or
    stalls on inputs of all zeros (the warm-up's), as a model might."""

    on_zeros: str = ""  # "", "raise" or "stall"
    stall_s = 0.0
    calls: list[tuple[str, bool, tuple[int, ...]]]

    def predict_sync(self, inputs: Tensors) -> Tensors:
        zeros = all(not a.any() for a in inputs.values())
        self.calls.append((threading.current_thread().name, zeros, inputs["input"].shape))
        if zeros and self.on_zeros == "raise":
            raise ModelExecutionError("this model refuses zeros")
        if zeros and self.on_zeros == "stall":
            time.sleep(self.stall_s)  # the model under test hanging, not synchronisation
        return super().predict_sync(inputs)


def _recording(registry: Path, *, on_zeros: str = "", timeout_s: float = _TIMEOUT_S) -> Scheduled:
    directory = registry / "fraud-onnx" / "1.0.0"
    model = _Recording(load_manifest(directory / MANIFEST_NAME), directory)
    model.calls, model.on_zeros = [], on_zeros
    return Scheduled(model, 2, 0, timeout_s=timeout_s)


async def test_load_starts_every_thread_and_runs_a_call_of_zeros_on_each(registry: Path) -> None:
    sched = _recording(registry)
    model = sched.local
    assert isinstance(model, _Recording)
    await sched.load()
    started = {lane: threads.started for lane, threads in sched.threads.items()}
    assert started == {Lane.PRIMARY: 4, Lane.SHADOW: 2}  # 2 x size each: never on a call
    warm = [(name, shape) for name, zeros, shape in model.calls if zeros]
    assert len(warm) == 6 and all(shape == (1, 30) for _, shape in warm)  # declared [-1, 30]
    assert len({name for name, _ in warm}) > 2  # spread over the threads, not one warm thread
    assert sched._round_calls == 0  # not counted in the rounds that decide going inline
    model.calls.clear()
    for _ in range(8):
        await sched.predict(_row())
    assert {lane: t.started for lane, t in sched.threads.items()} == started  # none spawned
    assert len(model.calls) == 8 and not any(zeros for _, zeros, _ in model.calls)
    await sched.unload()


async def test_a_model_that_fails_on_zeros_loads_and_serves_without_warm_up(
    registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sched = _recording(registry, on_zeros="raise")
    model = sched.local
    assert isinstance(model, _Recording)
    await sched.load()
    assert sched.ready
    assert "fraud-onnx/1.0.0: a warm-up call on zeros failed (this model refuses zeros)" in (
        caplog.text
    )
    assert sum(zeros for _, zeros, _ in model.calls) == 1  # the first failed: no more tried
    assert (await sched.predict(_row())).arrays()["probabilities"].shape == (1, 2)
    await sched.unload()


async def test_a_warm_up_call_that_hangs_ends_the_load_at_the_deadline(
    registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sched = _recording(registry, on_zeros="stall", timeout_s=0.2)
    model = sched.local
    assert isinstance(model, _Recording)
    model.stall_s = 2.0
    await asyncio.wait_for(sched.load(), 60)  # not 2 s x 6 calls: one stuck thread at most
    assert "did not answer within 0.2s" in caplog.text
    primary = sched.threads[Lane.PRIMARY]
    assert primary.stuck == 1 and primary.started == 4
    assert sched.threads[Lane.SHADOW].started == 2
    assert (await sched.predict(_row())).arrays()["probabilities"].shape == (1, 2)
    await sched.unload()


async def test_an_answer_now_comes_only_from_an_inline_call_with_a_free_slot(
    registry: Path, executor: ThreadPoolExecutor
) -> None:
    """`predict_now` (a shadow copy's synchronous way, proxy/shadow.py) answers exactly when
    `predict` would compute on the caller's thread at once: inline, a batch the rounds
    measured, a free slot in the caller's lane, a load not retiring. Otherwise None, and
    the caller awaits `predict`."""
    sched, model = await _stalling(registry, executor, 50_000)
    bulkhead = Bulkhead(
        CheckedOutputs(sched, local=True),
        concurrency=1,
        queue=4,
        shadow_concurrency=1,
        shadow_queue=4,
    )
    row = _row()
    assert bulkhead.predict_now(row) is None  # still measuring on threads
    for _ in range(sched.WARMUP_CALLS):
        await bulkhead.predict(row)
    assert sched.inline
    model.threads.clear()
    now = bulkhead.predict_now(row)
    assert now is not None and model.threads == {threading.current_thread().name}
    want = model.predict_sync(row.arrays())
    np.testing.assert_array_equal(now.arrays()["probabilities"], want["probabilities"])
    assert bulkhead.busy == 0  # the slot was held for the call only
    assert bulkhead.predict_now(_rows(64)) is None  # a batch bigger than any measured

    # The primary lane's one slot held by a call on a thread: no answer now in that
    # lane, one in the shadow lane (its own slot).
    model.stall_s = 0.3
    holding = asyncio.create_task(bulkhead.predict(_rows(64)))
    await eventually(lambda: bulkhead.busy == 1)
    assert bulkhead.predict_now(row) is None
    model.stall_s = 0.0

    def in_shadow_lane_now() -> object:
        in_shadow_lane()
        return bulkhead.predict_now(row)

    assert contextvars.copy_context().run(in_shadow_lane_now) is not None
    await holding
    assert bulkhead.predict_now(row) is not None

    # Retiring (a reload replaced this load while a call ran): no answer now; `predict`
    # still serves the calls routed to it until it has drained.
    model.stall_s = 1.0
    holding = asyncio.create_task(bulkhead.predict(_rows(64)))
    await eventually(lambda: bulkhead.busy == 1)
    model.stall_s = 0.0
    shadow_lane = contextvars.copy_context()
    assert shadow_lane.run(in_shadow_lane_now) is not None  # its lane has a free slot
    retiring = asyncio.create_task(bulkhead.retire(within_s=30))
    await eventually(lambda: shadow_lane.run(in_shadow_lane_now) is None)
    assert not retiring.done()  # still waiting for the call on a thread
    await holding
    await retiring
    assert not sched.ready


# --- coalescing: the primaries of one turn of the event loop in one inline call --------


class _Counting(_Stalling):
    """The real ONNX model, counting its calls; failing on any row whose first feature is
    `poison`; `extra` adds an output that is not a row per input row."""

    calls = 0
    poison = -1.0
    extra = False

    def predict_sync(self, inputs: Tensors) -> Tensors:
        self.calls += 1
        if (inputs["input"][:, 0] == self.poison).any():
            raise ModelExecutionError("a row this model cannot take")
        outputs = super().predict_sync(inputs)
        if self.extra:
            outputs["summary"] = np.zeros(7, np.float32)  # 7 however many rows
        return outputs


async def _coalescing(registry: Path, rows: int = 1) -> tuple[Scheduled, _Counting]:
    """fraud-onnx 1.0.0 inline for batches up to `rows`, then busy turns of the loop (more
    than one inline call each) until its primaries coalesce."""
    directory = registry / "fraud-onnx" / "1.0.0"
    model = _Counting(load_manifest(directory / MANIFEST_NAME), directory)
    model.threads = set()
    sched = Scheduled(model, 2, 50_000, timeout_s=_TIMEOUT_S)
    await sched.load()
    for i in range(sched.WARMUP_CALLS):
        await sched.predict(_rows(rows) if i == 0 else _row())
    assert sched.inline and sched.inline_rows == rows
    for _ in range(sched.BUSY_TURNS):
        assert not sched.coalescing
        assert sched.predict_now(_row()) is not None and sched.predict_now(_row()) is not None
        await asyncio.sleep(0)  # the turn ends
    assert sched.coalescing
    return sched, model


def _requests(rows: list[int]) -> list[InferRequest]:
    x, _ = load_eval_data()
    starts = np.cumsum([0, *rows])
    return [InferRequest.of_arrays({"input": x[a:b]}) for a, b in itertools.pairwise(starts)]


async def test_one_call_answers_a_turns_primaries_each_with_its_own_rows(registry: Path) -> None:
    sched, model = await _coalescing(registry, rows=3)
    requests = _requests([1, 3, 2, 1, 1, 3])
    lone = [model.predict_sync(r.arrays()) for r in requests]
    model.calls = 0
    answers = await asyncio.gather(*(sched.predict(r) for r in requests))
    assert model.calls == 1
    for request, answer, want in zip(requests, answers, lone, strict=True):
        got = answer.arrays()
        assert got["label"].shape == (request.rows(),)
        np.testing.assert_array_equal(got["label"], want["label"])
        # One call of many rows may round the last bit of a float otherwise than a lone
        # call does (ONNX Runtime's kernels), as any dynamic batcher's answers.
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-5)
    assert sched.predict_now(_row()) is None  # primaries wait for the turn's call...

    def in_shadow_lane_now() -> object:
        in_shadow_lane()
        return sched.predict_now(_row())

    assert contextvars.copy_context().run(in_shadow_lane_now) is not None  # ...copies do not


async def test_a_request_the_model_fails_on_fails_alone(registry: Path) -> None:
    sched, model = await _coalescing(registry)
    requests = _requests([1, 1, 1, 1])
    model.poison = float(requests[2].arrays()["input"][0, 0])
    model.calls = 0
    answers = await asyncio.gather(*(sched.predict(r) for r in requests), return_exceptions=True)
    assert isinstance(answers[2], ModelExecutionError)
    assert all(not isinstance(a, BaseException) for i, a in enumerate(answers) if i != 2)
    assert model.calls == 1 + len(requests)  # the shared call, then one each


async def test_answers_that_are_not_a_row_per_row_are_never_coalesced_again(
    registry: Path,
) -> None:
    sched, model = await _coalescing(registry)
    model.extra = True
    requests = _requests([1, 1, 1])
    model.calls = 0
    answers = await asyncio.gather(*(sched.predict(r) for r in requests))
    assert all(a.arrays()["summary"].shape == (7,) for a in answers)  # each its own call's
    assert model.calls == 1 + len(requests)
    assert not sched.coalescing and not sched.splittable
    for _ in range(sched.BUSY_TURNS + 1):
        sched.predict_now(_row())
        sched.predict_now(_row())
        await asyncio.sleep(0)
    assert not sched.coalescing


async def test_coalescing_ends_when_the_turns_hold_one_primary_each(registry: Path) -> None:
    sched, _ = await _coalescing(registry)
    for _ in range(sched.LONELY_FLUSHES):
        assert sched.coalescing
        await sched.predict(_row())
    assert not sched.coalescing
    assert sched.predict_now(_row()) is not None  # at once again


async def test_a_caller_that_gave_up_is_left_out_of_the_call(registry: Path) -> None:
    sched, model = await _coalescing(registry)
    requests = _requests([1, 1, 1])
    tasks = [asyncio.create_task(sched.predict(r)) for r in requests]
    await asyncio.sleep(0)  # every one has joined the turn's call
    tasks[1].cancel()
    model.calls = 0
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    answered = [a for a in done if not isinstance(a, BaseException)]
    assert [a.arrays()["label"].shape for a in answered] == [(1,), (1,)]
    assert model.calls == 1


async def test_a_full_call_leaves_the_turns_other_primaries_to_be_answered_at_once(
    registry: Path,
) -> None:
    """Each primary waiting for the call holds its bulkhead slot: past `coalesce_rows`
    rows the others are answered at once, so that they never queue for a slot (the
    registry keeps `coalesce_rows` at half the version's concurrency)."""
    sched, model = await _coalescing(registry)
    sched.coalesce_rows = 4
    requests = _requests([1, 1, 1, 1, 1, 1])
    model.calls = 0
    answers = await asyncio.gather(*(sched.predict(r) for r in requests))
    assert model.calls == 1 + 2  # four rows in the shared call, two at once
    assert [a.arrays()["label"].shape for a in answers] == [(1,)] * 6


async def test_a_bug_in_the_shared_call_fails_its_callers_and_leaves_none_waiting(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched, _ = await _coalescing(registry)

    def broken(group: object) -> None:
        raise RuntimeError("a bug in coalescing")

    monkeypatch.setattr(sched, "_answer", broken)
    done = await asyncio.gather(
        *(sched.predict(r) for r in _requests([1, 1, 1])), return_exceptions=True
    )
    assert all(isinstance(d, RuntimeError) for d in done)


async def test_the_wait_for_a_shared_call_is_told_apart_from_the_call(registry: Path) -> None:
    """The turn's other requests' time is a queue (Triton's statistics) and is left out
    of the rollout's latency (proxy/inference.py): a busy arm that coalesces would
    otherwise look slower than a quiet one answered at once."""
    sched, _ = await _coalescing(registry)
    requests = _requests([1, 1, 1])
    started = time.perf_counter()
    await asyncio.gather(*(sched.predict(r) for r in requests))
    elapsed = time.perf_counter() - started
    for request in requests:
        assert 0.0 < request.shared_wait_s < elapsed
        assert request.queue_ns == pytest.approx(request.shared_wait_s * 1e9, abs=1)
    lone = _row()
    sched.coalescing = False
    await sched.predict(lone)
    assert lone.shared_wait_s == 0.0 and lone.queue_ns == 0


async def test_callers_of_a_failed_call_go_to_the_threads_when_the_model_left_the_loop(
    registry: Path,
) -> None:
    """The shared call failed and, meanwhile, the model was sent back to its threads: each
    caller's own call runs there, with its deadline, not on the loop."""
    sched, model = await _coalescing(registry)
    requests = _requests([1, 1, 1])
    model.poison = float(requests[0].arrays()["input"][0, 0])
    tasks = [asyncio.create_task(sched.predict(r)) for r in requests]
    await asyncio.sleep(0)  # every one has joined the turn's call
    sched.inline = False
    model.threads.clear()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], ModelExecutionError)
    assert all(not isinstance(d, BaseException) for d in done[1:])
    assert model.threads and threading.current_thread().name not in model.threads


# --- shadow copies held together (proxy/shadow.py `hold`): `predict_now_many` ----------


async def test_held_copies_share_one_call_each_with_its_own_rows_and_time(registry: Path) -> None:
    """Compatible copies in one call of `coalesce_rows` rows at most, each answered its own
    rows and the time of the call it shared; a request too big to run inline is left to
    be awaited (None); through the bulkhead and the output checks, in the shadow lane."""
    sched, model = await _coalescing(registry, rows=3)
    sched.coalesce_rows = 6
    checked = Bulkhead(
        CheckedOutputs(sched, local=True),
        concurrency=1,
        queue=0,
        shadow_concurrency=1,
        shadow_queue=0,
    )
    assert checked.batches_now
    requests = _requests([1, 3, 2, 64, 1, 3, 1])
    lone = [model.predict_sync(r.arrays()) for r in requests]
    model.calls = 0

    def in_shadow_lane_now() -> list[Any]:
        in_shadow_lane()
        return checked.predict_now_many(requests)

    answers = contextvars.copy_context().run(in_shadow_lane_now)
    assert model.calls == 2  # rows 1+3+2, then 1+3+1: six at most per call
    assert answers[3] == (None, 0.0)  # 64 rows: never inline
    for i, (answer, seconds) in enumerate(answers):
        if i == 3:
            continue
        assert seconds > 0.0
        got = answer.arrays()
        np.testing.assert_array_equal(got["label"], lone[i]["label"])
        np.testing.assert_allclose(got["probabilities"], lone[i]["probabilities"], rtol=1e-5)
    assert checked.busy == 0
    # Each answer of a shared call took all of it (the output checks add each its own).
    shared = sched.predict_now_many(requests[:3])
    assert shared[0][1] == shared[1][1] == shared[2][1] > 0.0


def _answered(answer: object) -> Tensors:
    assert isinstance(answer, InferResponse)
    return answer.arrays()


def _labels(answer: object) -> np.ndarray:
    return _answered(answer)["label"]


async def test_a_held_copy_the_model_fails_on_fails_alone_and_odd_outputs_end_sharing(
    registry: Path,
) -> None:
    sched, model = await _coalescing(registry)
    requests = _requests([1, 1, 1, 1])
    model.poison = float(requests[1].arrays()["input"][0, 0])
    model.calls = 0
    answers = sched.predict_now_many(requests)
    assert isinstance(answers[1][0], ModelExecutionError)
    assert all(_labels(a).shape == (1,) for i, (a, _) in enumerate(answers) if i != 1)
    assert model.calls == 1 + len(requests)  # the shared call, then one each

    model.poison = -1.0
    model.extra = True
    model.calls = 0
    answers = sched.predict_now_many(requests)
    assert all(_answered(a)["summary"].shape == (7,) for a, _ in answers)  # each its own call's
    assert not sched.splittable and not sched.batches_now
    assert model.calls == 1 + len(requests)


async def test_no_copy_is_answered_now_once_the_model_left_the_loop(registry: Path) -> None:
    sched, model = await _coalescing(registry)
    requests = _requests([1, 1])
    sched.inline = False
    model.calls = 0
    assert not sched.batches_now
    assert sched.predict_now_many(requests) == [(None, 0.0), (None, 0.0)]
    assert model.calls == 0
    # Inputs that do not concatenate (a 0-d input) are answered each in a call of its own.
    sched.inline = True
    odd = InferRequest.of_arrays({"input": np.float32(1.0)})  # type: ignore[dict-item]
    assert sched.predict_now_many([odd, requests[0]])[1][0] is not None
