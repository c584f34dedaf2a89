"""Registry: scans, verifies and loads real models; refuses bad versions; follows the directory."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from rollguard.serving.batching import BatchingRunner
from rollguard.serving.errors import ModelNotFound, NotReady, VersionNotFound
from rollguard.serving.registry import Registry, RegistryChanges

WriteVersion = Callable[..., Path]


@pytest.fixture
async def registry(registry_root: Path) -> AsyncIterator[Registry]:
    registry = Registry(registry_root, poll_interval=3600)  # tests drive refresh() themselves
    yield registry
    await registry.stop()


def replace_file(path: Path, data: bytes) -> None:
    """Write a new file over `path` atomically (new inode), as deploy tools do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def assert_serves(
    registry: Registry, version: str, features: np.ndarray, estimator: Pipeline
) -> None:
    runner = registry.get("fraud", version).runner
    outputs = await runner.predict({"input": features[:20]})
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


async def test_new_version_is_loaded_on_refresh_and_announced(
    registry: Registry,
    write_version: WriteVersion,
    cancer_features: np.ndarray,
    cancer_estimator: Pipeline,
) -> None:
    write_version("fraud", "1.0.0")
    await registry.start()
    seen: list[RegistryChanges] = []
    unsubscribe = registry.subscribe(seen.append)
    write_version("fraud", "1.1.0", "sklearn")
    changes = await registry.refresh()
    assert changes == RegistryChanges(loaded=(("fraud", "1.1.0"),))
    assert seen == [changes]
    await assert_serves(registry, "1.1.0", cancer_features, cancer_estimator)
    assert await registry.refresh() == RegistryChanges()  # nothing changed: nothing to say
    unsubscribe()
    write_version("fraud", "1.2.0")
    await registry.refresh()
    assert seen == [changes]


async def test_watcher_picks_up_a_new_version(
    registry_root: Path, write_version: WriteVersion
) -> None:
    registry = Registry(registry_root, poll_interval=0.05)
    await registry.start()
    try:
        arrived = asyncio.Event()
        registry.subscribe(lambda c: arrived.set() if ("fraud", "2.0.0") in c.loaded else None)
        write_version("fraud", "2.0.0", stage="production")
        async with asyncio.timeout(20):
            await arrived.wait()
        assert registry.default_version("fraud") == "2.0.0"
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
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"refused fraud/1.1.0: {reason}"]
    assert registry.versions("fraud") == ["1.0.0"]
    await assert_serves(registry, "1.0.0", cancer_features, cancer_estimator)
    with pytest.raises(NotReady, match="refused"):
        registry.get("fraud", "1.1.0")
    states = {s.version: (s.status, s.reason) for s in registry.known_versions("fraud")}
    assert states == {"1.0.0": ("loaded", None), "1.1.0": ("refused", reason)}

    # Refused until its files change; then it is looked at again.
    assert await registry.refresh() == RegistryChanges()
    replace_file(bad / "model.onnx", onnx_bytes)
    assert (await registry.refresh()).loaded == (("fraud", "1.1.0"),)
    assert registry.refused() == {}
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
    first = await registry.refresh()
    # The sha256 matched, so the file is complete: no point waiting, refused at once.
    assert first.refused == (("fraud", "1.1.0", registry.refused()[("fraud", "1.1.0")]),)
    assert registry.refused()[("fraud", "1.1.0")].startswith(f"{garbage / 'model.onnx'}: ")
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
    assert await registry.refresh() == RegistryChanges()  # not refused on first sight
    with pytest.raises(NotReady, match="not loaded yet"):
        registry.get("fraud", "1.0.0")
    replace_file(directory / "model.onnx", onnx_bytes)  # the copy finished
    assert (await registry.refresh()).loaded == (("fraud", "1.0.0"),)


async def test_version_that_stays_incomplete_is_refused_on_the_next_scan(
    registry: Registry, write_version: WriteVersion, onnx_bytes: bytes
) -> None:
    await registry.start()
    directory = write_version("fraud", "1.0.0")
    (directory / "model.onnx").unlink()
    assert await registry.refresh() == RegistryChanges()
    changes = await registry.refresh()
    assert changes.refused == (("fraud", "1.0.0", registry.refused()[("fraud", "1.0.0")]),)
    assert "model.onnx" in changes.refused[0][2]


async def test_removed_version_is_unloaded(registry: Registry, write_version: WriteVersion) -> None:
    write_version("fraud", "1.0.0")
    write_version("fraud", "1.1.0")
    await registry.start()
    runner = registry.get("fraud", "1.1.0").runner
    shutil.rmtree(registry.root / "fraud" / "1.1.0")
    assert await registry.refresh() == RegistryChanges(unloaded=(("fraud", "1.1.0"),))
    assert not runner.ready
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


async def test_serving_version_whose_files_turn_bad_is_unloaded(
    registry: Registry, write_version: WriteVersion, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_version("fraud", "1.0.0")
    await registry.start()
    runner = registry.get("fraud", "1.0.0").runner
    replace_file(directory / "model.onnx", b"not a model")
    assert await registry.refresh() == RegistryChanges()  # settling: the old one still serves
    assert registry.get("fraud", "1.0.0").runner is runner
    changes = await registry.refresh()
    assert changes.unloaded == (("fraud", "1.0.0"),)
    assert not runner.ready
    assert "it was serving; unloaded" in caplog.records[-1].getMessage()


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
    assert (await registry.refresh()).loaded == (("fraud", "1.0.0"),)
    loaded = registry.get("fraud", "1.0.0")
    assert loaded.manifest.stage == "production"
    assert isinstance(loaded.runner, BatchingRunner)
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
    assert (await registry.refresh()).loaded == (("fraud", "1.0.0"),)
    assert registry.get("fraud", "1.0.0").manifest.framework == "sklearn"
    assert not old.ready
    outputs = await registry.get("fraud", "1.0.0").runner.predict({"input": cancer_features[:3]})
    assert outputs["probabilities"].shape == (3, 2)


async def test_unchanged_content_is_not_reloaded(
    registry: Registry, write_version: WriteVersion
) -> None:
    directory = write_version("fraud", "1.0.0")
    await registry.start()
    before = registry.get("fraud", "1.0.0")
    stat = (directory / "model.onnx").stat()
    os.utime(directory / "model.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert await registry.refresh() == RegistryChanges()
    assert registry.get("fraud", "1.0.0") is before


async def test_stop_unloads_everything(registry_root: Path, write_version: WriteVersion) -> None:
    write_version(
        "fraud",
        "1.0.0",
        batching={"max_batch_size": 4, "max_delay_ms": 1, "max_concurrent_batches": 1},
    )
    registry = Registry(registry_root, poll_interval=0.05)
    await registry.start()
    runner = registry.get("fraud", "1.0.0").runner
    assert isinstance(runner, BatchingRunner)
    assert runner.max_concurrent_batches == 1  # from the manifest
    await registry.stop()
    assert not runner.ready
    assert not runner.inner.ready
    assert registry.models() == []


async def test_missing_root_keeps_what_is_loaded(
    registry: Registry, write_version: WriteVersion, caplog: pytest.LogCaptureFixture
) -> None:
    write_version("fraud", "1.0.0")
    await registry.start()
    moved = registry.root.with_name("unmounted")
    registry.root.rename(moved)
    assert await registry.refresh() == RegistryChanges()
    assert await registry.refresh() == RegistryChanges()
    assert registry.versions("fraud") == ["1.0.0"]
    assert [r.getMessage() for r in caplog.records if "missing" in r.getMessage()] == [
        f"registry root {registry.root} is missing or not a directory; keeping the 1 "
        "loaded version(s)"
    ]
    moved.rename(registry.root)
    shutil.rmtree(registry.root / "fraud")
    assert await registry.refresh() == RegistryChanges(unloaded=(("fraud", "1.0.0"),))
