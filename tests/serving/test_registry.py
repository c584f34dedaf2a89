"""Registry: scans, verifies and loads real models; refuses bad versions; follows the directory."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from rollguard.serving.availability import Availability
from rollguard.serving.batching import BatchingRunner
from rollguard.serving.deadlines import Deadline
from rollguard.serving.errors import ModelNotFound, NotReady, ServingError, VersionNotFound
from rollguard.serving.registry import Registry
from rollguard.serving.runners.onnx import OnnxRunner
from rollguard.serving.scheduling import Scheduled
from tests.serving.support import eventually, layers, predict_arrays

WriteVersion = Callable[..., Path]
TIMEOUT_S = 30.0
INLINE_BELOW_US = 200.0


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="model")
    yield pool
    pool.shutdown()


def make_registry(root: Path, executor: ThreadPoolExecutor, poll_interval: float) -> Registry:
    return Registry(
        root,
        threads=2,
        poll_interval=poll_interval,
        inline_below_us=INLINE_BELOW_US,
        timeout_s=TIMEOUT_S,
    )


@pytest.fixture
async def registry(registry_root: Path, executor: ThreadPoolExecutor) -> AsyncIterator[Registry]:
    registry = make_registry(registry_root, executor, 3600)  # tests drive refresh() themselves
    yield registry
    await registry.stop()


def answers(registry: Registry, model: str, version: str) -> bool:
    """Whether `registry.get` gives the version (rather than raising why not)."""
    try:
        registry.get(model, version)
    except ServingError:
        return False
    return True


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def replace_file(path: Path, data: bytes) -> None:
    """Write a new file over `path` atomically (new inode), as deploy tools do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def assert_serves(
    registry: Registry, version: str, features: np.ndarray, estimator: Pipeline
) -> None:
    runner = registry.get("fraud", version).runner
    outputs = await predict_arrays(runner, {"input": features[:20]})
    np.testing.assert_array_equal(outputs["label"], estimator.predict(features[:20]))


async def test_start_loads_every_good_version(
    registry: Registry,
    write_version: WriteVersion,
    cancer_features: np.ndarray,
    cancer_estimator: Pipeline,
) -> None:
    write_version("fraud", "1.10.0", "onnx", stage="production")
    write_version("fraud", "1.2.0", "sklearn")
    write_version("churn", "1", "onnx")
    await registry.start()
    assert registry.models() == ["churn", "fraud"]
    assert registry.versions("fraud") == ["1.2.0", "1.10.0"]  # natural order
    assert registry.refused() == {}
    for version in ("1.2.0", "1.10.0"):
        await assert_serves(registry, version, cancer_features, cancer_estimator)
    loaded = registry.get("fraud", "1.2.0")
    assert loaded.manifest.framework == "sklearn"
    assert loaded.directory == registry.root / "fraud" / "1.2.0"


async def test_new_version_is_loaded_on_refresh(
    registry: Registry,
    write_version: WriteVersion,
    cancer_features: np.ndarray,
    cancer_estimator: Pipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rollguard.serving.registry")
    write_version("fraud", "1.0.0")
    await registry.start()
    first = registry.get("fraud", "1.0.0")
    with pytest.raises(VersionNotFound):
        registry.get("fraud", "1.1.0")
    write_version("fraud", "1.1.0", "sklearn")
    await registry.refresh()
    assert registry.versions("fraud") == ["1.0.0", "1.1.0"]
    await assert_serves(registry, "1.1.0", cancer_features, cancer_estimator)
    assert [r.getMessage() for r in caplog.records][
        -1
    ] == "loaded fraud/1.1.0 (sklearn, development)"
    loaded = registry.get("fraud", "1.1.0")
    caplog.clear()
    await registry.refresh()  # nothing changed: nothing reloaded, nothing said
    assert registry.get("fraud", "1.1.0") is loaded
    assert registry.get("fraud", "1.0.0") is first
    assert registry.refused() == {}
    assert caplog.records == []


async def test_watcher_picks_up_a_new_version(
    registry_root: Path, executor: ThreadPoolExecutor, write_version: WriteVersion
) -> None:
    registry = make_registry(registry_root, executor, 0.05)
    await registry.start()
    try:
        write_version("fraud", "2.0.0", stage="production")
        await eventually(lambda: answers(registry, "fraud", "2.0.0"))
        assert registry.default_version("fraud") == "2.0.0"
    finally:
        await registry.stop()


async def test_watcher_refuses_a_bad_version(
    registry_root: Path,
    executor: ThreadPoolExecutor,
    write_version: WriteVersion,
    onnx_bytes: bytes,
) -> None:
    registry = make_registry(registry_root, executor, 0.05)
    await registry.start()
    try:
        directory = write_version("fraud", "1.0.0")
        replace_file(directory / "model.onnx", onnx_bytes[:100])
        await eventually(lambda: ("fraud", "1.0.0") in registry.refused())
        assert "sha256" in registry.refused()[("fraud", "1.0.0")]
        replace_file(directory / "model.onnx", onnx_bytes)  # fixed: the watcher loads it
        await eventually(lambda: answers(registry, "fraud", "1.0.0"))
        assert registry.refused() == {}
    finally:
        await registry.stop()


async def test_tampered_artifact_is_refused_and_others_keep_serving(
    registry: Registry,
    write_version: WriteVersion,
    onnx_bytes: bytes,
    cancer_features: np.ndarray,
    cancer_estimator: Pipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_version("fraud", "1.0.0")
    bad = write_version("fraud", "1.1.0")
    tampered = bytearray(onnx_bytes)
    tampered[-1] ^= 0xFF
    replace_file(bad / "model.onnx", bytes(tampered))
    await registry.start()
    reason = registry.refused()[("fraud", "1.1.0")]
    assert str(bad / "model.onnx") in reason
    assert "sha256" in reason
    assert warnings_in(caplog) == [f"refused fraud/1.1.0: {reason}"]
    assert registry.versions("fraud") == ["1.0.0"]
    await assert_serves(registry, "1.0.0", cancer_features, cancer_estimator)
    with pytest.raises(NotReady, match="refused"):
        registry.get("fraud", "1.1.0")
    assert registry.models() == ["fraud"]

    # Refused until its files change (and said once); then it is looked at again.
    await registry.refresh()
    assert registry.refused() == {("fraud", "1.1.0"): reason}
    assert warnings_in(caplog) == [f"refused fraud/1.1.0: {reason}"]
    replace_file(bad / "model.onnx", onnx_bytes)
    await registry.refresh()
    assert registry.refused() == {}
    assert registry.versions("fraud") == ["1.0.0", "1.1.0"]
    await assert_serves(registry, "1.1.0", cancer_features, cancer_estimator)


async def test_unloadable_artifact_and_unreadable_manifest_are_refused(
    registry: Registry,
    write_version: WriteVersion,
    write_version_files: WriteVersion,
    cancer_features: np.ndarray,
    cancer_estimator: Pipeline,
) -> None:
    write_version("fraud", "1.0.0")
    garbage = write_version_files(
        registry.root / "fraud" / "1.1.0",
        b"\x08\x07 not an onnx graph",
        name="fraud",
        version="1.1.0",
        framework="onnx",
        artifact_name="model.onnx",
    )
    unreadable = registry.root / "fraud" / "1.2.0"
    unreadable.mkdir()
    (unreadable / "model.yaml").write_bytes(b"name: \xff\xfe\n")
    await registry.refresh()
    # The sha256 matched, so the file is complete: no point waiting, refused at once.
    assert list(registry.refused()) == [("fraud", "1.1.0")]
    assert registry.refused()[("fraud", "1.1.0")].startswith(f"{garbage / 'model.onnx'}: ")
    with pytest.raises(NotReady, match="not loaded yet"):  # the manifest may still be copying
        registry.get("fraud", "1.2.0")
    await registry.refresh()
    assert "not UTF-8" in registry.refused()[("fraud", "1.2.0")]
    assert registry.versions("fraud") == ["1.0.0"]
    await assert_serves(registry, "1.0.0", cancer_features, cancer_estimator)


async def test_half_copied_version_waits_to_settle(
    registry: Registry, write_version: WriteVersion, onnx_bytes: bytes
) -> None:
    await registry.start()
    directory = write_version("fraud", "1.0.0")
    replace_file(directory / "model.onnx", onnx_bytes[:100])  # the copy is still running
    await registry.refresh()
    assert registry.refused() == {}  # not refused on first sight
    with pytest.raises(NotReady, match="not loaded yet"):
        registry.get("fraud", "1.0.0")
    replace_file(directory / "model.onnx", onnx_bytes)  # the copy finished
    await registry.refresh()
    assert registry.versions("fraud") == ["1.0.0"]
    assert registry.refused() == {}


async def test_version_that_stays_incomplete_is_refused_on_the_next_scan(
    registry: Registry, write_version: WriteVersion, onnx_bytes: bytes
) -> None:
    await registry.start()
    directory = write_version("fraud", "1.0.0")
    (directory / "model.onnx").unlink()
    await registry.refresh()
    assert registry.refused() == {}
    await registry.refresh()
    assert list(registry.refused()) == [("fraud", "1.0.0")]
    assert "model.onnx" in registry.refused()[("fraud", "1.0.0")]
    with pytest.raises(NotReady, match="refused"):
        registry.get("fraud", "1.0.0")


async def test_removed_version_is_unloaded(registry: Registry, write_version: WriteVersion) -> None:
    write_version("fraud", "1.0.0")
    write_version("fraud", "1.1.0")
    await registry.start()
    runner = registry.get("fraud", "1.1.0").runner
    shutil.rmtree(registry.root / "fraud" / "1.1.0")
    await registry.refresh()
    await eventually(lambda: not runner.ready)  # unloaded once idle, in the background
    assert registry.versions("fraud") == ["1.0.0"]
    with pytest.raises(VersionNotFound):
        registry.get("fraud", "1.1.0")
    shutil.rmtree(registry.root / "fraud")
    await registry.refresh()
    with pytest.raises(ModelNotFound):
        registry.get("fraud", "1.0.0")
    assert registry.models() == []


async def test_manifest_name_must_match_its_directory(
    registry: Registry, write_version: WriteVersion
) -> None:
    write_version("fraud", "1.0.0", name="churn")
    await registry.start()
    reason = registry.refused()[("fraud", "1.0.0")]
    assert "model.yaml" in reason
    assert "'churn' does not match its directory 'fraud'" in reason


async def test_serving_version_whose_files_turn_bad_keeps_its_last_verified_load(
    registry: Registry,
    write_version: WriteVersion,
    onnx_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = write_version("fraud", "1.0.0", stage="production")
    await registry.start()
    runner = registry.get("fraud", "1.0.0").runner
    replace_file(directory / "model.onnx", b"not a model")
    await registry.refresh()  # settling: the old one still serves
    assert registry.get("fraud", "1.0.0").runner is runner
    assert runner.ready and registry.refused() == {}
    assert registry.availability("fraud", "1.0.0") is Availability.READY
    await registry.refresh()
    assert list(registry.refused()) == [("fraud", "1.0.0")]
    assert registry.availability("fraud", "1.0.0") is Availability.STALE
    assert registry.get("fraud", "1.0.0").runner is runner and runner.ready
    assert registry.versions("fraud") == ["1.0.0"]
    assert registry.default_version("fraud") == "1.0.0"
    assert "still serving its last verified load" in caplog.records[-1].getMessage()
    replace_file(directory / "model.onnx", onnx_bytes)  # the good bytes are back
    await registry.refresh()
    assert registry.availability("fraud", "1.0.0") is Availability.READY
    assert registry.get("fraud", "1.0.0").runner is runner  # nothing to reload
    assert registry.refused() == {}


async def test_availability_of_each_state(
    registry: Registry, write_version: WriteVersion, onnx_bytes: bytes
) -> None:
    write_version("fraud", "1.0.0")
    never = write_version("fraud", "1.1.0")
    replace_file(never / "model.onnx", b"garbage")
    await registry.start()
    assert registry.availability("fraud", "1.0.0") is Availability.READY
    assert registry.availability("fraud", "1.1.0") is Availability.REFUSED
    assert registry.availability("fraud", "9.9.9") is Availability.MISSING
    assert registry.availability("churn", "1") is Availability.MISSING
    copying = write_version("fraud", "1.2.0")
    replace_file(copying / "model.onnx", onnx_bytes[:100])
    await registry.refresh()
    assert registry.availability("fraud", "1.2.0") is Availability.LOADING
    await registry.refresh()
    assert registry.availability("fraud", "1.2.0") is Availability.REFUSED
    shutil.rmtree(registry.root / "fraud" / "1.0.0")
    await registry.refresh()
    assert registry.availability("fraud", "1.0.0") is Availability.MISSING


async def test_refused_version_is_retried_with_back_off(
    registry_root: Path,
    executor: ThreadPoolExecutor,
    write_version: WriteVersion,
    onnx_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rollguard.serving.registry")
    now = [0.0]
    registry = Registry(
        registry_root,
        threads=2,
        poll_interval=1.0,
        inline_below_us=INLINE_BELOW_US,
        timeout_s=TIMEOUT_S,
        clock=lambda: now[0],
    )
    directory = write_version("fraud", "1.0.0")
    replace_file(directory / "model.onnx", onnx_bytes[:100])
    await registry.start()  # looked at twice: refused at start, at clock 0
    looks = []
    try:
        for _ in range(200):  # a scan every poll interval
            now[0] += 1.0
            caplog.clear()
            await registry.refresh()
            if any("still refused" in r.getMessage() for r in caplog.records):
                looks.append(now[0])
        # 1, 2, 4 ... poll intervals apart, then at most 32.
        assert looks == [1, 3, 7, 15, 31, 63, 95, 127, 159, 191]
        assert registry.availability("fraud", "1.0.0") is Availability.REFUSED
        replace_file(directory / "model.onnx", onnx_bytes)  # a change is seen at once
        now[0] += 1.0
        await registry.refresh()
        assert registry.availability("fraud", "1.0.0") is Availability.READY
    finally:
        await registry.stop()


async def test_default_version_is_the_highest_production_one(
    registry: Registry, write_version: WriteVersion
) -> None:
    write_version("fraud", "1.2.0", stage="production")
    write_version("fraud", "1.10.0", stage="production")
    write_version("fraud", "2.0.0", stage="staging")
    write_version("churn", "1", stage="development")
    await registry.start()
    assert registry.default_version("fraud") == "1.10.0"
    with pytest.raises(NotReady, match="churn"):
        registry.default_version("churn")
    with pytest.raises(ModelNotFound):
        registry.default_version("nope")


async def test_configmap_style_symlink_swap_is_picked_up(
    registry: Registry, onnx_bytes: bytes, write_version_files: WriteVersion
) -> None:
    # The layout a Kubernetes ConfigMap/Secret volume has: visible names link through
    # `..data`, which is swapped atomically to a new timestamped directory.
    version_dir = registry.root / "fraud" / "1.0.0"
    common = {"name": "fraud", "version": "1.0.0", "framework": "onnx"}
    write_version_files(version_dir / "..2026_01", onnx_bytes, artifact_name="model.onnx", **common)
    os.symlink("..2026_01", version_dir / "..data")
    for name in ("model.yaml", "model.onnx"):
        os.symlink(f"..data/{name}", version_dir / name)
    await registry.start()
    assert registry.get("fraud", "1.0.0").manifest.stage == "development"

    write_version_files(
        version_dir / "..2026_02",
        onnx_bytes,
        artifact_name="model.onnx",
        stage="production",
        batching={"max_batch_size": 8, "max_delay_ms": 1},
        **common,
    )
    os.symlink("..2026_02", version_dir / "..data_tmp")
    os.replace(version_dir / "..data_tmp", version_dir / "..data")
    shutil.rmtree(version_dir / "..2026_01")
    before = registry.get("fraud", "1.0.0")
    await registry.refresh()
    loaded = registry.get("fraud", "1.0.0")
    assert loaded is not before
    await eventually(lambda: not before.runner.ready)
    assert loaded.manifest.stage == "production"
    assert any(isinstance(layer, BatchingRunner) for layer in layers(loaded.runner))
    assert registry.default_version("fraud") == "1.0.0"


async def test_swapping_a_version_directory_symlink_reloads_it(
    registry: Registry,
    write_version_files: WriteVersion,
    onnx_bytes: bytes,
    joblib_bytes: bytes,
    cancer_features: np.ndarray,
) -> None:
    store = registry.root.parent / "store"
    common = {"name": "fraud", "version": "1.0.0"}
    write_version_files(
        store / "a", onnx_bytes, framework="onnx", artifact_name="model.onnx", **common
    )
    write_version_files(
        store / "b", joblib_bytes, framework="sklearn", artifact_name="model.joblib", **common
    )
    (registry.root / "fraud").mkdir()
    os.symlink(store / "a", registry.root / "fraud" / "1.0.0")
    await registry.start()
    old = registry.get("fraud", "1.0.0").runner
    assert registry.get("fraud", "1.0.0").manifest.framework == "onnx"
    os.symlink(store / "b", registry.root / "fraud" / ".swap")
    os.replace(registry.root / "fraud" / ".swap", registry.root / "fraud" / "1.0.0")
    await registry.refresh()
    assert registry.get("fraud", "1.0.0").manifest.framework == "sklearn"
    await eventually(lambda: not old.ready)
    runner = registry.get("fraud", "1.0.0").runner
    outputs = await predict_arrays(runner, {"input": cancer_features[:3]})
    assert outputs["probabilities"].shape == (3, 2)


async def test_unchanged_content_is_not_reloaded(
    registry: Registry, write_version: WriteVersion
) -> None:
    directory = write_version("fraud", "1.0.0")
    await registry.start()
    before = registry.get("fraud", "1.0.0")
    stat = (directory / "model.onnx").stat()
    os.utime(directory / "model.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    await registry.refresh()
    assert registry.get("fraud", "1.0.0") is before
    assert before.runner.ready


async def test_stop_unloads_everything(
    registry_root: Path, executor: ThreadPoolExecutor, write_version: WriteVersion
) -> None:
    write_version(
        "fraud",
        "1.0.0",
        batching={"max_batch_size": 4, "max_delay_ms": 1, "max_concurrent_batches": 1},
    )
    write_version("fraud", "1.1.0")
    registry = make_registry(registry_root, executor, 0.05)
    await registry.start()
    batched = layers(registry.get("fraud", "1.0.0").runner)
    plain = layers(registry.get("fraud", "1.1.0").runner)
    (batching,) = [layer for layer in batched if isinstance(layer, BatchingRunner)]
    assert batching.max_concurrent_batches == 1  # from the manifest
    assert all(layer.ready for layer in batched + plain)
    await registry.stop()
    assert not any(layer.ready for layer in batched + plain)
    assert registry.models() == []


async def test_missing_root_keeps_what_is_loaded(
    registry: Registry, write_version: WriteVersion, caplog: pytest.LogCaptureFixture
) -> None:
    write_version("fraud", "1.0.0")
    await registry.start()
    moved = registry.root.with_name("unmounted")
    registry.root.rename(moved)
    loaded = registry.get("fraud", "1.0.0")
    await registry.refresh()
    await registry.refresh()
    assert registry.versions("fraud") == ["1.0.0"]
    assert registry.get("fraud", "1.0.0") is loaded and loaded.runner.ready
    assert [r.getMessage() for r in caplog.records if "missing" in r.getMessage()] == [
        f"registry root {registry.root} is missing or not a directory; keeping the 1 "
        "loaded version(s)"
    ]
    moved.rename(registry.root)
    shutil.rmtree(registry.root / "fraud")
    await registry.refresh()
    assert registry.models() == []
    await eventually(lambda: not loaded.runner.ready)


async def test_local_versions_are_scheduled_and_batched_ones_bounded(
    registry: Registry, write_version: WriteVersion, cancer_features: np.ndarray
) -> None:
    write_version("fraud", "1.0.0")
    write_version("fraud", "1.1.0", batching={"max_batch_size": 8, "max_delay_ms": 1})
    await registry.start()
    plain = layers(registry.get("fraud", "1.0.0").runner)
    assert isinstance(plain[-1], OnnxRunner)
    (scheduled,) = [layer for layer in plain if isinstance(layer, Scheduled)]
    assert scheduled.inline_limit_s == INLINE_BELOW_US / 1e6  # the registry's limit
    assert scheduled.timeout_s == TIMEOUT_S
    assert not any(isinstance(layer, BatchingRunner) for layer in plain)

    batched = layers(registry.get("fraud", "1.1.0").runner)
    assert isinstance(batched[-1], OnnxRunner)
    (scheduled,) = [layer for layer in batched if isinstance(layer, Scheduled)]
    assert scheduled.inline_limit_s == 0  # a batched version never runs inline
    kinds = [type(layer) for layer in batched]
    assert kinds.index(BatchingRunner) < kinds.index(Scheduled)  # batches are scheduled
    # A caller waiting in the batching queue is bounded by the registry's limit.
    assert any(
        isinstance(layer, Deadline) and layer.seconds == TIMEOUT_S
        for layer in batched[: kinds.index(BatchingRunner)]
    )
    for version in ("1.0.0", "1.1.0"):
        runner = registry.get("fraud", version).runner
        outputs = await predict_arrays(runner, {"input": cancer_features[:5]})
        assert outputs["probabilities"].shape == (5, 2)
