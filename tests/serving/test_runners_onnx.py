"""OnnxRunner against the demo registry's real ONNX versions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.errors import ArtifactError, ModelExecutionError
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, TensorField, load_manifest
from rollguard.serving.runners.onnx import OnnxRunner
from tests.serving.support import predict_arrays


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    build_demo_registry(root, frameworks=("onnx",))
    return root


def _runner(directory: Path, **update: Any) -> OnnxRunner:
    manifest = load_manifest(directory / MANIFEST_NAME)
    return OnnxRunner(manifest.model_copy(update=update), directory)


def _direct(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
async def test_fraud_matches_onnxruntime(registry: Path, version: str) -> None:
    directory = registry / "fraud-onnx" / version
    runner = _runner(directory)
    await runner.load()
    x, y = load_eval_data()
    got = await predict_arrays(runner, {"input": x})
    want = _direct(directory / "model.onnx", x)
    assert sorted(got) == ["label", "probabilities"]
    assert got["label"].dtype == np.int64 and got["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
    assert np.mean(got["label"] == y) > 0.9


async def test_digits_is_a_ten_class_model(registry: Path) -> None:
    directory = registry / "digits" / "1.0.0"
    runner = _runner(directory, runtime={"intra_op_threads": 2})
    await runner.load()
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    got = runner.predict_sync({"input": x})
    want = _direct(directory / "model.onnx", x)
    assert got["probabilities"].shape == (len(x), 10)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(got["label"] == y) > 0.9


async def test_garbage_artifact_is_refused(registry: Path, tmp_path: Path) -> None:
    directory = tmp_path / "v"
    shutil.copytree(registry / "fraud-onnx" / "1.0.0", directory)
    (directory / "model.onnx").write_bytes(b"\x08\x07not an onnx graph" * 40)
    repinned = sha256_file(directory / "model.onnx")  # pinned: only the loader can object
    with pytest.raises(ArtifactError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        await _runner(directory, sha256=repinned).load()


async def test_manifest_that_disagrees_with_the_graph_is_refused(registry: Path) -> None:
    directory = registry / "fraud-onnx" / "1.0.0"
    extra = TensorField(name="scores", datatype="FP32", shape=[-1])
    manifest = load_manifest(directory / MANIFEST_NAME)
    with pytest.raises(ArtifactError, match=r"no output\(s\) \['scores'\]"):
        await _runner(directory, outputs=[*manifest.outputs, extra]).load()
    renamed = TensorField(name="features", datatype="FP32", shape=[-1, 30])
    with pytest.raises(ArtifactError, match="takes inputs"):
        await _runner(directory, inputs=[renamed]).load()


async def test_model_error_becomes_model_execution_error(registry: Path) -> None:
    runner = _runner(registry / "fraud-onnx" / "1.0.0")
    await runner.load()
    x, _ = load_eval_data()
    with pytest.raises(ModelExecutionError, match=r"tensor\(double\)") as info:
        runner.predict_sync({"input": x.astype(np.float64)})
    assert "\n" not in str(info.value)
