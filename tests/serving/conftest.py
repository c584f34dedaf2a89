"""Shared fixtures for serving tests: small real models written into a tmp registry."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rollguard.serving.manifest import MANIFEST_NAME, Manifest, dump_manifest

N_FEATURES = 30  # load_breast_cancer


def _onnx_bytes(estimator: Pipeline) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    # zipmap off: plain `label` and `probabilities` tensors instead of a list of dicts.
    model = convert_sklearn(
        estimator,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        options={LogisticRegression: {"zipmap": False}},
    )
    return bytes(model.SerializeToString())


@pytest.fixture(scope="session")
def cancer_features() -> np.ndarray:
    """load_breast_cancer's features as float32, (569, 30)."""
    features: np.ndarray = load_breast_cancer(return_X_y=True)[0].astype(np.float32)
    return features


@pytest.fixture(scope="session")
def cancer_estimator(cancer_features: np.ndarray) -> Pipeline:
    """A scaler + logistic regression trained on load_breast_cancer."""
    labels = load_breast_cancer(return_X_y=True)[1]
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        cancer_features, labels
    )


@pytest.fixture(scope="session")
def onnx_bytes(cancer_estimator: Pipeline) -> bytes:
    """cancer_estimator as ONNX: input `input` FP32 [-1, 30], outputs label, probabilities."""
    return _onnx_bytes(cancer_estimator)


@pytest.fixture(scope="session")
def joblib_bytes(cancer_estimator: Pipeline) -> bytes:
    """cancer_estimator as a joblib pickle."""
    buffer = io.BytesIO()
    joblib.dump(cancer_estimator, buffer)
    return buffer.getvalue()


_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
}

WriteVersion = Callable[..., Path]


def _write_version_files(
    directory: Path,
    artifact: bytes,
    *,
    name: str,
    version: str,
    framework: str,
    artifact_name: str,
    **fields: Any,
) -> Path:
    """Write an artifact and a matching model.yaml into `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / artifact_name).write_bytes(artifact)
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "framework": framework,
        "artifact": artifact_name,
        "sha256": hashlib.sha256(artifact).hexdigest(),
        **_SIGNATURE,
        **fields,
    }
    dump_manifest(Manifest.model_validate(data), directory / MANIFEST_NAME)
    return directory


@pytest.fixture
def write_version_files() -> WriteVersion:
    """write_version_files(directory, artifact_bytes, *, name, version, framework,
    artifact_name, **manifest fields) -> directory: files anywhere, manifest matching."""
    return _write_version_files


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    return root


@pytest.fixture
def write_version(registry_root: Path, onnx_bytes: bytes, joblib_bytes: bytes) -> WriteVersion:
    """write_version(model, version, kind="onnx"|"sklearn", **manifest fields) -> directory.

    `name=` overrides the manifest's name (to make it disagree with its directory).
    """

    def write(model: str, version: str, kind: str = "onnx", **fields: Any) -> Path:
        artifact, artifact_name = (
            (onnx_bytes, "model.onnx") if kind == "onnx" else (joblib_bytes, "model.joblib")
        )
        framework = "onnx" if kind == "onnx" else "sklearn"
        name = fields.pop("name", model)
        return _write_version_files(
            registry_root / model / version,
            artifact,
            name=name,
            version=version,
            framework=framework,
            artifact_name=artifact_name,
            **fields,
        )

    return write
