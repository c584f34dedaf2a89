"""The demo-registry builder: what it writes, that it is idempotent, that the models are real."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, Manifest, load_manifest
from rollguard.serving.runners import create_runner
from tests.serving.support import predict_arrays

EXPECTED = {
    ("fraud", "1.0.0"): ("sklearn", "model.skops", "production"),
    ("fraud", "1.1.0"): ("sklearn", "model.skops", "staging"),
    ("fraud", "1.2.0"): ("sklearn", "model.joblib", "staging"),
    ("fraud", "1.3.0"): ("sklearn", "model.joblib", "staging"),
    ("fraud", "1.4.0"): ("sklearn", "model.skops", "staging"),
    ("fraud-onnx", "1.0.0"): ("onnx", "model.onnx", "production"),
    ("fraud-onnx", "1.1.0"): ("onnx", "model.onnx", "staging"),
    ("fraud-torch", "1.0.0"): ("torch", "model.pt", "production"),
    ("fraud-torch", "1.1.0"): ("torch", "model.pt2", "staging"),
    ("digits", "1.0.0"): ("onnx", "model.onnx", "production"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("registry")
    return root, build_demo_registry(root)


def _manifest(root: Path, model: str, version: str) -> Manifest:
    return load_manifest(root / model / version / MANIFEST_NAME)


async def _predict(root: Path, model: str, version: str, x: np.ndarray) -> dict[str, np.ndarray]:
    directory = root / model / version
    runner = create_runner(_manifest(root, model, version), directory)
    await runner.load()
    try:
        return await predict_arrays(runner, {"input": x})
    finally:
        await runner.unload()


def test_writes_every_version_with_a_valid_manifest(built: tuple[Path, list[Path]]) -> None:
    root, written = built
    assert sorted(written) == sorted(root / m / v for m, v in EXPECTED)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no scratch left
    for (model, version), (framework, artifact, stage) in EXPECTED.items():
        manifest = _manifest(root, model, version)
        directory = root / model / version
        assert (manifest.name, manifest.version) == (model, version)
        assert (manifest.framework, manifest.artifact, manifest.stage) == (
            framework,
            artifact,
            stage,
        )
        assert manifest.sha256 == sha256_file(directory / artifact)
        assert manifest.parent == (None if version == "1.0.0" else "1.0.0")
        assert manifest.created_by and manifest.created_at
        features = 64 if model == "digits" else 30
        classes = 10 if model == "digits" else 2
        assert [t.model_dump(exclude_none=True) for t in manifest.inputs] == [
            {"name": "input", "datatype": "FP32", "shape": [-1, features]}
        ]
        assert [t.model_dump(exclude_none=True) for t in manifest.outputs] == [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        ]
        assert manifest.reference == "reference.npy"
        assert [(f.path, f.sha256) for f in manifest.files] == [
            ("reference.npy", sha256_file(directory / "reference.npy"))
        ]
        reference = np.load(directory / "reference.npy")
        assert reference.dtype == np.float32 and reference.shape == (200, features)
        assert 0.7 < manifest.metrics["accuracy"] <= 1.0


def test_second_build_keeps_valid_versions_and_repairs_broken_ones(
    built: tuple[Path, list[Path]],
) -> None:
    root, _ = built
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*/model.yaml")}
    assert build_demo_registry(root) == []
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*/*/model.yaml")}
    (root / "fraud" / "1.1.0" / "model.skops").write_bytes(b"tampered")
    assert build_demo_registry(root, frameworks=["sklearn"]) == [root / "fraud" / "1.1.0"]
    manifest = _manifest(root, "fraud", "1.1.0")
    assert manifest.sha256 == sha256_file(root / "fraud" / "1.1.0" / "model.skops")
    # A changed reference is a broken version too: every pinned file is checked.
    np.save(root / "fraud" / "1.0.0" / "reference.npy", np.zeros((3, 30), np.float32))
    assert build_demo_registry(root, frameworks=["sklearn"]) == [root / "fraud" / "1.0.0"]


def test_metrics_order_the_candidates(built: tuple[Path, list[Path]]) -> None:
    root, _ = built
    accuracy = {
        v: _manifest(root, "fraud", v).metrics["accuracy"] for m, v in EXPECTED if m == "fraud"
    }
    assert accuracy["1.1.0"] >= accuracy["1.0.0"]
    assert accuracy["1.2.0"] == accuracy["1.3.0"] == accuracy["1.0.0"]
    assert accuracy["1.4.0"] <= accuracy["1.0.0"] - 0.05


async def test_served_accuracy_matches_the_recorded_metric(built: tuple[Path, list[Path]]) -> None:
    root, _ = built
    x, y = load_eval_data()
    for model, version in [("fraud", "1.1.0"), ("fraud-onnx", "1.0.0"), ("fraud-torch", "1.1.0")]:
        got = await _predict(root, model, version, x)
        recorded = _manifest(root, model, version).metrics["accuracy"]
        assert float(np.mean(got["label"] == y)) == pytest.approx(recorded, abs=1e-4)


async def test_onnx_conversion_agrees_with_scikit_learn(built: tuple[Path, list[Path]]) -> None:
    root, _ = built
    x, _ = load_eval_data()
    for version in ("1.0.0", "1.1.0"):
        onnx = await _predict(root, "fraud-onnx", version, x)
        sklearn = await _predict(root, "fraud", version, x)
        np.testing.assert_array_equal(onnx["label"], sklearn["label"])
        np.testing.assert_allclose(onnx["probabilities"], sklearn["probabilities"], atol=1e-5)


def test_eval_data_is_the_fixed_test_split() -> None:
    x, y = load_eval_data()
    assert x.dtype == np.float32 and x.shape == (143, 30)
    assert y.dtype == np.int64 and set(np.unique(y)) == {0, 1}
    x2, y2 = load_eval_data()
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_unknown_framework_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown framework"):
        build_demo_registry(tmp_path, frameworks=["tensorflow"])


def test_torch_missing_skips_fraud_torch_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with caplog.at_level(logging.WARNING, logger="rollguard.serving.demo.build"):
        assert build_demo_registry(tmp_path, frameworks=["torch"]) == []
    assert "skipping fraud-torch" in caplog.text
    assert not (tmp_path / "fraud-torch").exists()
