"""SklearnRunner against the demo registry's real scikit-learn versions."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression

from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.demo.faulty import faulty_rows
from rollguard.serving.errors import ArtifactError, ModelExecutionError, NotReady
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, load_manifest, parse_manifest
from rollguard.serving.runners.sklearn import SklearnRunner
from tests.serving.support import predict_arrays


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    build_demo_registry(root, frameworks=("sklearn",))
    return root


def _runner(directory: Path, **update: Any) -> SklearnRunner:
    manifest = load_manifest(directory / MANIFEST_NAME)
    return SklearnRunner(manifest.model_copy(update=update), directory)


async def test_skops_version_matches_the_estimator(registry: Path) -> None:
    directory = registry / "fraud" / "1.0.0"
    runner = _runner(directory)
    await runner.load()
    assert runner.ready
    x, _ = load_eval_data()
    outputs = await predict_arrays(runner, {"input": x})
    model = skops.io.load(directory / "model.skops", trusted=[])
    assert list(outputs) == ["label", "probabilities"]
    assert outputs["label"].dtype == np.int64
    assert outputs["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(outputs["label"], model.predict(x))
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(x), rtol=1e-6)
    await runner.unload()
    assert not runner.ready
    with pytest.raises(NotReady):
        runner.predict_sync({"input": x})


async def test_faulty_version_fails_on_about_five_percent_of_rows(registry: Path) -> None:
    faulty, stable = _runner(registry / "fraud" / "1.2.0"), _runner(registry / "fraud" / "1.0.0")
    await faulty.load()
    await stable.load()
    x = load_breast_cancer().data.astype(np.float32)  # all 569 rows, one request each
    failed = np.zeros(len(x), dtype=bool)
    for i, row in enumerate(x):
        try:
            got = faulty.predict_sync({"input": row[None]})
        except ModelExecutionError as exc:
            assert "numerical fault" in str(exc)
            failed[i] = True
        else:
            want = stable.predict_sync({"input": row[None]})
            np.testing.assert_array_equal(got["label"], want["label"])
    assert 0.02 < failed.mean() < 0.09
    np.testing.assert_array_equal(failed, faulty_rows(x, 0.05))  # same rows every time
    with pytest.raises(ModelExecutionError):
        faulty.predict_sync({"input": x})  # a batch with one bad row fails whole


async def test_slow_and_weak_versions_still_predict(registry: Path) -> None:
    x, y = load_eval_data()
    accuracy = {}
    for version in ("1.0.0", "1.3.0", "1.4.0"):
        runner = _runner(registry / "fraud" / version)
        await runner.load()
        accuracy[version] = float(np.mean(runner.predict_sync({"input": x})["label"] == y))
    assert accuracy["1.3.0"] == accuracy["1.0.0"]
    assert accuracy["1.4.0"] <= accuracy["1.0.0"] - 0.05


@pytest.mark.parametrize("version", ["1.0.0", "1.2.0"])
async def test_garbage_artifact_is_refused(registry: Path, tmp_path: Path, version: str) -> None:
    directory = tmp_path / version
    shutil.copytree(registry / "fraud" / version, directory)
    artifact = directory / load_manifest(directory / MANIFEST_NAME).artifact  # type: ignore[operator]
    artifact.write_bytes(b"\x00garbage, not a model\xff" * 50)
    with pytest.raises(ArtifactError, match=re.escape(artifact.name)):
        await _runner(directory).load()


async def test_missing_artifact_is_refused(registry: Path, tmp_path: Path) -> None:
    directory = tmp_path / "v"
    shutil.copytree(registry / "fraud" / "1.0.0", directory)
    (directory / "model.skops").unlink()
    with pytest.raises(ArtifactError, match=r"model\.skops: named in model\.yaml but missing"):
        await _runner(directory).load()


def _skops_version(directory: Path, model: Any, **fields: Any) -> SklearnRunner:
    directory.mkdir()
    skops.io.dump(model, directory / "model.skops")
    data = {"name": "m", "version": "1", "framework": "sklearn", "artifact": "model.skops"}
    sha256 = sha256_file(directory / "model.skops")
    manifest = parse_manifest({**data, "sha256": sha256, **fields}, "test")
    return SklearnRunner(manifest, directory)


async def test_untrusted_skops_types_are_refused_until_listed(tmp_path: Path) -> None:
    x, y = load_eval_data()
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
    refused = _skops_version(tmp_path / "a", forest)
    with pytest.raises(ArtifactError, match=r"sklearn\.tree\._tree\.Tree.*trusted_types"):
        await refused.load()
    types = skops.io.get_untrusted_types(file=tmp_path / "a" / "model.skops")
    trusted = _skops_version(tmp_path / "b", forest, trusted_types=types)
    await trusted.load()
    got = trusted.predict_sync({"input": x})
    np.testing.assert_array_equal(got["label"], forest.predict(x))


async def test_regressor_gives_prediction_when_no_outputs_declared(tmp_path: Path) -> None:
    x, y = load_diabetes(return_X_y=True)
    model = LinearRegression().fit(x, y)
    runner = _skops_version(tmp_path / "r", model)
    await runner.load()
    got = runner.predict_sync({"features": x})
    assert list(got) == ["prediction"]
    assert got["prediction"].dtype == np.float64
    np.testing.assert_allclose(got["prediction"], model.predict(x))


async def test_output_the_estimator_cannot_give_is_refused(tmp_path: Path) -> None:
    x, y = load_diabetes(return_X_y=True)
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    runner = _skops_version(tmp_path / "r", LinearRegression().fit(x, y), outputs=outputs)
    with pytest.raises(ArtifactError, match="no predict_proba"):
        await runner.load()
    unknown = [{"name": "scores", "datatype": "FP32", "shape": [-1]}]
    runner = _skops_version(tmp_path / "s", LinearRegression().fit(x, y), outputs=unknown)
    with pytest.raises(ArtifactError, match=r"\['scores'\]"):
        await runner.load()
