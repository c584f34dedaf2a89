"""ProcessIsolated: a local model in worker processes that are killed at the deadline,
restarted when they die, and gone once unloaded; the wire between them."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.batching import BatchingRunner
from rollguard.serving.bulkhead import Lane, in_shadow_lane
from rollguard.serving.errors import (
    ArtifactError,
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    Overloaded,
)
from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.isolation import ProcessIsolated
from rollguard.serving.manifest import MANIFEST_NAME, load_manifest
from rollguard.serving.runners import LocalRunner, create_runner
from rollguard.serving.runners.onnx import OnnxRunner
from rollguard.serving.worker import HEADER, WireError, decode_answer, encode, pack, unpack
from tests.serving.faulty_models import (
    CRASH_ON,
    HANG_VALUE,
    crashing_joblib,
    hanging_onnx,
    write_version,
)
from tests.serving.support import eventually, predict_arrays

ROW = np.array([[0.5, 1.0]], np.float32)
HANG = np.array([[HANG_VALUE, 1.0]], np.float32)
CRASH = np.array([[CRASH_ON, 1.0]], np.float32)


def gone(pid: int) -> bool:
    """No process `pid` any more, not even a zombie waiting to be reaped."""
    return not Path(f"/proc/{pid}").exists()


def local_runner(directory: Path) -> LocalRunner:
    manifest = load_manifest(directory / MANIFEST_NAME)
    runner = create_runner(manifest, directory, PinnedBytes.read(directory, manifest))
    assert isinstance(runner, LocalRunner)
    return runner


class Versions:
    """Starts process-isolated versions under `root` and remembers every worker seen."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ProcessIsolated] = []
        self.pids: set[int] = set()

    async def start(
        self, artifact: bytes, *, framework: str = "onnx", workers: int = 1, timeout_s: float = 2.0
    ) -> ProcessIsolated:
        name = f"m{len(self.started)}"
        directory = write_version(self.root, name, "1", artifact, framework=framework)
        runner = ProcessIsolated(local_runner(directory), workers, timeout_s)
        self.started.append(runner)
        await runner.load()
        return runner

    def seen(self, runner: ProcessIsolated) -> list[int]:
        found = runner.worker_pids()
        self.pids.update(found)
        return found


@pytest.fixture
async def versions(tmp_path: Path) -> AsyncIterator[Versions]:
    """Every version started is unloaded after the test, and its workers checked gone."""
    started = Versions(tmp_path)
    yield started
    for runner in started.started:
        started.seen(runner)
        await runner.unload()
    assert all(gone(pid) for pid in started.pids), "a worker process outlived its unload"


async def test_answers_what_the_model_answers_in_process(
    versions: Versions, tmp_path: Path
) -> None:
    runner = await versions.start(hanging_onnx(), workers=2)
    rows = np.random.default_rng(0).uniform(-3, 3, (64, 2)).astype(np.float32)
    directory = tmp_path / "m0" / "1"
    plain = OnnxRunner(load_manifest(directory / MANIFEST_NAME), directory)
    await plain.load()
    answers = await asyncio.gather(
        *(predict_arrays(runner, {"x": rows[i : i + 8]}) for i in range(0, 64, 8))
    )
    for i, answer in zip(range(0, 64, 8), answers, strict=True):
        expected = await predict_arrays(plain, {"x": rows[i : i + 8]})
        np.testing.assert_array_equal(answer["y"], expected["y"])
        assert answer["y"].dtype == np.float32
    assert len(versions.seen(runner)) == 2
    assert all(pid != os.getpid() for pid in runner.worker_pids())


async def test_each_worker_answers_a_call_of_zeros_before_the_version_takes_traffic(
    versions: Versions,
) -> None:
    runner = await versions.start(hanging_onnx(), workers=3)
    live = runner.pools[Lane.PRIMARY].live
    assert len(live) == 3 and all(worker.calls >= 1 for worker in live)  # warmed at load
    assert (await predict_arrays(runner, {"x": ROW}))["y"].tolist() == ROW.tolist()


async def test_a_hung_call_is_cut_off_and_the_version_serves_again(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx(), timeout_s=1.0)
    (before,) = versions.seen(runner)
    with pytest.raises(
        DeadlineExceeded, match=rf"within 1s; its worker process \(pid {before}\) was killed"
    ):
        await predict_arrays(runner, {"x": HANG})
    await eventually(lambda: gone(before))
    answer = await predict_arrays(runner, {"x": ROW})  # waits for the new worker
    np.testing.assert_array_equal(answer["y"], ROW)
    (after,) = versions.seen(runner)
    assert after != before
    assert runner.ready


async def test_a_call_waiting_for_a_worker_times_out_without_killing_one(
    versions: Versions,
) -> None:
    runner = await versions.start(hanging_onnx(), timeout_s=1.0)
    hung, waiting = await asyncio.gather(
        predict_arrays(runner, {"x": HANG}),
        predict_arrays(runner, {"x": ROW}),  # behind it, for the only worker
        return_exceptions=True,
    )
    assert isinstance(hung, DeadlineExceeded) and "was killed" in str(hung)
    assert isinstance(waiting, DeadlineExceeded)
    assert "waiting for a free worker process" in str(waiting)
    np.testing.assert_array_equal((await predict_arrays(runner, {"x": ROW}))["y"], ROW)


@pytest.mark.parametrize(("how", "cause"), [("segfault", "SIGSEGV"), ("exit", "exit code 3")])
async def test_a_worker_that_crashes_fails_its_call_and_is_replaced(
    versions: Versions, how: str, cause: str
) -> None:
    runner = await versions.start(crashing_joblib(how), framework="sklearn", timeout_s=20.0)
    (before,) = versions.seen(runner)
    assert (await predict_arrays(runner, {"x": ROW}))["label"].tolist() == [1]
    with pytest.raises(
        ModelExecutionError, match=rf"pid {before}\) died during the call \(.*{cause}"
    ):
        await predict_arrays(runner, {"x": CRASH})
    assert gone(before)
    assert runner.ready  # the first loss is replaced at once
    assert (await predict_arrays(runner, {"x": ROW}))["label"].tolist() == [1]
    assert versions.seen(runner) != [before]


async def test_a_worker_that_keeps_dying_is_restarted_after_a_back_off(versions: Versions) -> None:
    runner = await versions.start(crashing_joblib("exit"), framework="sklearn", timeout_s=20.0)
    for _ in range(2):
        with pytest.raises(ModelExecutionError, match="died during the call"):
            await predict_arrays(runner, {"x": CRASH})
    # Two lost in a row: no worker until the back-off ends, and the version says so.
    assert not runner.ready
    with pytest.raises(Overloaded, match="no worker process"):
        await predict_arrays(runner, {"x": ROW})
    await eventually(lambda: runner.ready)
    assert (await predict_arrays(runner, {"x": ROW}))["label"].tolist() == [1]


async def test_a_worker_killed_while_idle_is_replaced_and_no_call_fails(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx(), workers=2)
    first, second = versions.seen(runner)
    os.kill(first, signal.SIGKILL)  # the OOM killer, an operator
    await eventually(lambda: first not in runner.worker_pids() and len(runner.worker_pids()) == 2)
    answers = await asyncio.gather(*(predict_arrays(runner, {"x": ROW}) for _ in range(20)))
    assert all(np.array_equal(a["y"], ROW) for a in answers)
    assert second in versions.seen(runner)
    assert gone(first)


async def test_a_caller_that_gives_up_leaves_its_worker_to_finish(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx(), timeout_s=5.0)
    (pid,) = versions.seen(runner)
    slow = np.array([[1e5, 1.0]], np.float32)  # a few hundred ms of loop trips
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(predict_arrays(runner, {"x": slow}), 0.01)
    # The worker finishes the abandoned call, then takes the next one: it was not killed.
    answer = await predict_arrays(runner, {"x": ROW})
    np.testing.assert_array_equal(answer["y"], ROW)
    assert versions.seen(runner) == [pid]


async def test_shadow_copies_run_in_workers_of_their_own(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx(), timeout_s=3.0)
    (primary,) = versions.seen(runner)
    hung = asyncio.create_task(predict_arrays(runner, {"x": HANG}))

    async def shadow_copy() -> dict[str, np.ndarray]:
        in_shadow_lane()
        return await predict_arrays(runner, {"x": ROW})

    answer = await asyncio.create_task(shadow_copy())  # its own worker, started on demand
    np.testing.assert_array_equal(answer["y"], ROW)
    assert len(versions.seen(runner)) == 2
    assert not hung.done()
    with pytest.raises(DeadlineExceeded):
        await hung
    await eventually(lambda: gone(primary))


async def test_batches_run_in_the_workers_and_each_caller_gets_its_rows(
    versions: Versions,
) -> None:
    runner = await versions.start(hanging_onnx(), workers=2, timeout_s=10.0)
    batched = BatchingRunner(runner, max_batch_size=16, max_delay_ms=5.0)
    await batched.load()
    rows = [np.array([[i / 10, -i / 10]], np.float32) for i in range(40)]
    answers = await asyncio.gather(*(predict_arrays(batched, {"x": row}) for row in rows))
    for row, answer in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], row)
    await batched.unload()


async def test_a_model_error_in_the_worker_is_the_same_error_here(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx())
    (pid,) = versions.seen(runner)
    with pytest.raises(InvalidInput, match="missing input 'x'"):
        await predict_arrays(runner, {"z": ROW})
    with pytest.raises(ModelExecutionError):
        await predict_arrays(runner, {"x": np.zeros((1, 2), np.float64)})  # wrong dtype
    assert versions.seen(runner) == [pid]  # the worker is fine and still serving


async def test_a_load_that_fails_in_the_worker_is_refused_with_its_reason(tmp_path: Path) -> None:
    directory = write_version(tmp_path, "broken", "1", b"not an onnx graph")
    runner = ProcessIsolated(local_runner(directory), 2, 2.0)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it"):
        await runner.load()
    assert runner.worker_pids() == []
    assert not runner.ready


async def test_unload_kills_workers_even_in_a_hung_call(versions: Versions) -> None:
    runner = await versions.start(hanging_onnx(), workers=2, timeout_s=60.0)
    pids = versions.seen(runner)
    hung = asyncio.create_task(predict_arrays(runner, {"x": HANG}))
    primary = runner.pools[Lane.PRIMARY]
    await eventually(lambda: len(primary.idle) == 1)  # the call has taken one of the two
    await runner.unload()
    assert all(gone(pid) for pid in pids)
    assert runner.worker_pids() == []
    assert not runner.ready
    with pytest.raises(Exception, match="unloaded"):
        await hung


# --- the wire ----------------------------------------------------------------------------

_DTYPES = st.sampled_from(
    ["float32", "float64", "float16", "int8", "int32", "int64", "uint8", "bool"]
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        _DTYPES.flatmap(
            lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
        ),
        max_size=4,
    )
)
def test_tensors_cross_the_wire_unchanged(outputs: dict[str, np.ndarray]) -> None:
    data = encode(("ok", pack(outputs)))
    (length,) = HEADER.unpack(data[: HEADER.size])
    assert length == len(data) - HEADER.size
    tag, packed = decode_answer(data[HEADER.size :])
    received = unpack(packed)
    assert tag == "ok" and list(received) == list(outputs)
    for name, array in outputs.items():
        assert received[name].dtype == array.dtype and received[name].shape == array.shape
        np.testing.assert_array_equal(received[name], array)


def test_strings_and_objects_of_plain_values_cross_the_wire() -> None:
    labels = np.array([["benign", np.str_("malignant")]], dtype=object)
    sent = {"label": labels, "u": labels.astype(str), "t": np.arange(6).reshape(2, 3).T}
    received = unpack(decode_answer(encode(("ok", pack(sent)))[8:])[1])
    assert received["label"].tolist() == [["benign", "malignant"]]
    assert received["u"].dtype.kind == "U" and received["u"].tolist() == labels.tolist()
    np.testing.assert_array_equal(received["t"], sent["t"])


@pytest.mark.parametrize("payload", [os.system, pickle.loads, np.float32(1), np.zeros(2)])
def test_an_answer_that_names_any_global_is_refused(payload: object) -> None:
    with pytest.raises(WireError, match="plain values only"):
        decode_answer(pickle.dumps(("ok", [("y", "<f4", (1,), payload)]), protocol=5))


@pytest.mark.parametrize("body", [b"", b"garbage", pickle.dumps(["ok"]), pickle.dumps((1, 2))])
def test_an_unreadable_answer_is_refused(body: bytes) -> None:
    with pytest.raises(WireError):
        decode_answer(body)


@pytest.mark.parametrize(
    "packed",
    [
        {"y": 1},
        [("y", "<f4", (3,), b"\0" * 8)],  # 8 bytes are not 3 floats
        [("y", "|O", (1,), b"\0" * 8)],  # pointers from another process
        [("y", "<f4", (1,), [1.0])],
        [("y", "not a dtype", (1,), b"\0" * 4)],
        [("y", "<f4")],
    ],
)
def test_tensors_that_cannot_be_rebuilt_are_refused(packed: object) -> None:
    with pytest.raises(WireError):
        unpack(packed)


@pytest.mark.parametrize("delay_s", [0.0, 0.0005, 0.001, 0.002, 0.004, 0.008])
async def test_an_unload_while_a_replacement_worker_starts_leaves_no_process(
    versions: Versions, delay_s: float
) -> None:
    """A worker dies, its replacement is being started (in a thread: the fork server
    hand-over) and the version is unloaded right then. The start is abandoned, and the
    socket meant for the new worker is closed only once the thread has handed it over:
    closed under it, the hand-over fails and the fork server dies with it, leaving every
    worker it started unreaped (the fixture finds the other worker still there). The
    unload lands at six points of the hand-over; with the socket closed at once, 5 runs
    of this test in 8 failed here (CI met it once, in the shadow-lane test's teardown)."""
    runner = await versions.start(hanging_onnx(), workers=2)
    first, _ = versions.seen(runner)
    pool = runner.pools[Lane.PRIMARY]
    os.kill(first, signal.SIGKILL)
    async with asyncio.timeout(10):
        while pool.spawning != 1:  # noqa: ASYNC110 - the moment itself is the test
            await asyncio.sleep(0)
    await asyncio.sleep(0)  # the restart task starts its thread
    await asyncio.sleep(delay_s)  # somewhere in the thread's hand-over
    await runner.unload()  # the fixture checks every worker seen is gone, reaped
    answer = await predict_arrays(await versions.start(hanging_onnx()), {"x": ROW})
    np.testing.assert_array_equal(answer["y"], ROW)  # the fork server still starts workers
