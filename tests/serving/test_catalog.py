"""Catalog: `registry add` infers signatures from real artifacts; list/show/verify report status."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression

from rollguard.serving.catalog import add, list_versions, show, verify, version_key
from rollguard.serving.errors import ArtifactError, ModelNotFound, VersionNotFound
from rollguard.serving.manifest import MANIFEST_NAME, load_manifest
from rollguard.serving.runners import create_runner
from rollguard.serving.signatures import tensor_from_flag
from tests.serving.external import FEATURES, WEIGHTS_FILE, expected, linear_onnx
from tests.serving.support import predict_arrays

CANCER_SIGNATURE = (
    [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
    [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
)


def signature(directory: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    manifest = load_manifest(directory / MANIFEST_NAME)
    return (
        [t.model_dump(exclude_none=True) for t in manifest.inputs],
        [t.model_dump(exclude_none=True) for t in manifest.outputs],
    )


def hidden_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "source"
    directory.mkdir()
    return directory


async def test_add_onnx_infers_the_session_signature(
    registry_root: Path, source: Path, onnx_bytes: bytes, cancer_features: np.ndarray
) -> None:
    (source / "lr.onnx").write_bytes(onnx_bytes)
    directory = add(
        registry_root, source / "lr.onnx", model="fraud", version="1.0.0", created_by="ci"
    )
    assert directory == registry_root / "fraud" / "1.0.0"
    manifest = load_manifest(directory / MANIFEST_NAME)
    assert (manifest.framework, manifest.artifact, manifest.stage) == (
        "onnx",
        "model.onnx",
        "development",
    )
    assert manifest.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert manifest.created_by == "ci"
    assert manifest.created_at is not None
    assert signature(directory) == CANCER_SIGNATURE
    assert [(v.model, v.version, v.status) for v in verify(registry_root)] == [
        ("fraud", "1.0.0", "ok")
    ]
    assert hidden_leftovers(registry_root) == []
    # The written version is servable as it stands.
    runner = create_runner(manifest, directory)
    await runner.load()
    outputs = await predict_arrays(runner, {"input": cancer_features[:4]})
    await runner.unload()
    assert outputs["probabilities"].shape == (4, 2)


def test_add_joblib_classifier_and_regressor_when_trusted(
    registry_root: Path, source: Path, joblib_bytes: bytes
) -> None:
    (source / "clf.joblib").write_bytes(joblib_bytes)
    clf = add(
        registry_root,
        source / "clf.joblib",
        model="fraud",
        version="2",
        parent="1.0.0",
        trust_pickle=True,
    )
    assert load_manifest(clf / MANIFEST_NAME).framework == "sklearn"
    assert load_manifest(clf / MANIFEST_NAME).parent == "1.0.0"
    assert signature(clf) == CANCER_SIGNATURE

    x, y = load_diabetes(return_X_y=True)
    joblib.dump(LinearRegression().fit(x, y), source / "reg.joblib")
    reg = add(
        registry_root, source / "reg.joblib", model="diabetes", version="1", trust_pickle=True
    )
    assert signature(reg) == (
        [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}],
        [{"name": "prediction", "datatype": "FP64", "shape": [-1]}],
    )


async def test_add_skops_refuses_to_guess_untrusted_types(
    registry_root: Path, source: Path
) -> None:
    import skops.io

    x, y = load_breast_cancer(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(x, y)
    skops.io.dump(forest, source / "forest.skops")
    with pytest.raises(ArtifactError, match=r"sklearn\.tree\._tree\.Tree"):
        add(registry_root, source / "forest.skops", model="forest", version="1")
    assert not (registry_root / "forest").exists()
    assert hidden_leftovers(registry_root) == []

    trusted = skops.io.get_untrusted_types(file=source / "forest.skops")
    directory = add(
        registry_root, source / "forest.skops", model="forest", version="1", trusted_types=trusted
    )
    manifest = load_manifest(directory / MANIFEST_NAME)
    assert manifest.trusted_types == trusted
    assert signature(directory) == CANCER_SIGNATURE
    runner = create_runner(manifest, directory)
    await runner.load()
    outputs = await predict_arrays(runner, {"input": x[:5].astype(np.float32)})
    await runner.unload()
    np.testing.assert_array_equal(outputs["label"], forest.predict(x[:5].astype(np.float32)))


def test_add_torch_export_reads_the_exported_program(registry_root: Path, source: Path) -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        module, (torch.zeros(2, 4),), dynamic_shapes={"input": {0: batch}}
    )
    torch.export.save(program, source / "mlp.pt2")
    directory = add(registry_root, source / "mlp.pt2", model="mlp", version="1", trust_pickle=True)
    assert load_manifest(directory / MANIFEST_NAME).framework == "torch"
    assert signature(directory) == (
        [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}],
    )


def test_add_http_and_refusals(registry_root: Path, source: Path, onnx_bytes: bytes) -> None:
    endpoint = "http://10.0.0.5:8080/v2/models/fraud/versions/2"
    declared = [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    remote = add(  # signatures given: the upstream is not asked
        registry_root, None, model="fraud", version="2", endpoint=endpoint,
        inputs=declared, outputs=[],
    )  # fmt: skip
    assert load_manifest(remote / MANIFEST_NAME).endpoint == endpoint
    (source / "lr.onnx").write_bytes(onnx_bytes)
    with pytest.raises(FileExistsError, match="never overwritten"):
        add(registry_root, source / "lr.onnx", model="fraud", version="2")
    (source / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="cannot tell the framework"):
        add(registry_root, source / "notes.txt", model="fraud", version="3")
    with pytest.raises(ArtifactError, match="no such file"):
        add(registry_root, source / "missing.onnx", model="fraud", version="3")
    assert hidden_leftovers(registry_root) == []


def test_verify_reports_a_tampered_artifact(
    registry_root: Path, source: Path, onnx_bytes: bytes
) -> None:
    (source / "lr.onnx").write_bytes(onnx_bytes)
    for version in ("1.2.0", "1.10.0", "1.9.0"):
        add(registry_root, source / "lr.onnx", model="fraud", version=version)
    artifact = registry_root / "fraud" / "1.9.0" / "model.onnx"
    artifact.write_bytes(onnx_bytes + b"\0")
    report = {v.version: v for v in verify(registry_root)}
    assert [v.version for v in list_versions(registry_root)] == ["1.2.0", "1.9.0", "1.10.0"]
    assert report["1.2.0"].status == "ok"
    bad = report["1.9.0"]
    assert bad.status == "refused"
    assert bad.reason is not None
    assert str(artifact) in bad.reason
    assert "sha256" in bad.reason
    assert (bad.framework, bad.stage) == ("onnx", "development")  # still read from model.yaml


def test_list_reports_invalid_manifests(registry_root: Path) -> None:
    broken = registry_root / "fraud" / "1.0.0"
    broken.mkdir(parents=True)
    (broken / MANIFEST_NAME).write_text("name: fraud\nversion: 1.0.0\nframework: tensorflow\n")
    (registry_root / "fraud" / "2.0.0").mkdir()
    (info, empty) = list_versions(registry_root)
    assert info.status == "refused"
    assert info.reason is not None and "framework" in info.reason
    assert info.framework is None
    assert empty.reason == f"{registry_root / 'fraud' / '2.0.0' / MANIFEST_NAME}: missing"


def test_show_gives_the_manifest_and_the_verification(
    registry_root: Path, source: Path, joblib_bytes: bytes
) -> None:
    (source / "clf.joblib").write_bytes(joblib_bytes)
    add(registry_root, source / "clf.joblib", model="fraud", version="1", stage="production")
    shown = show(registry_root, "fraud", "1")
    assert shown["status"] == "ok"
    assert shown["manifest"]["stage"] == "production"
    assert shown["manifest"]["sha256"] == hashlib.sha256(joblib_bytes).hexdigest()
    with pytest.raises(VersionNotFound):
        show(registry_root, "fraud", "2")
    with pytest.raises(ModelNotFound):
        show(registry_root, "churn", "1")


def test_version_key_sorts_naturally() -> None:
    versions = ["1.10.0", "1.2.0", "1.2.0-rc1", "2", "1.9.9", "10.0"]
    assert sorted(versions, key=version_key) == [
        "1.2.0",
        "1.2.0-rc1",
        "1.9.9",
        "1.10.0",
        "2",
        "10.0",
    ]


def test_add_pickle_without_trust_takes_the_signature_from_flags(
    registry_root: Path, source: Path, joblib_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (source / "clf.joblib").write_bytes(joblib_bytes)
    blank = add(registry_root, source / "clf.joblib", model="fraud", version="1")
    assert signature(blank) == ([], [])
    assert "--trust-pickle" in caplog.text
    inputs = [tensor_from_flag("input:fp32:-1,30")]
    outputs = [tensor_from_flag("label:INT64:-1"), tensor_from_flag("probabilities:FP32:-1,2")]
    flagged = add(
        registry_root,
        source / "clf.joblib",
        model="fraud",
        version="2",
        inputs=inputs,
        outputs=outputs,
    )
    assert signature(flagged) == CANCER_SIGNATURE


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("input", "expected NAME:DATATYPE:SHAPE"),
        ("input:FP32:a,b", "not comma-separated integers"),
        ("input:FLOAT:-1", "unknown datatype"),
        ("input:FP32:0", "positive or -1"),
    ],
)
def test_tensor_flags_name_what_is_wrong(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensor_from_flag(flag)


async def test_add_onnx_pins_its_external_data_and_a_reference(
    registry_root: Path, source: Path, cancer_features: np.ndarray
) -> None:
    weights = np.random.default_rng(0).normal(size=(FEATURES, 2)).astype(np.float32) / 100
    path = linear_onnx(source, weights)
    np.save(source / "sample.npy", cancer_features[:50])
    directory = add(
        registry_root, path, model="fraud", version="1", reference=source / "sample.npy"
    )
    manifest = load_manifest(directory / MANIFEST_NAME)
    assert manifest.reference == "reference.npy"
    assert {f.path: f.sha256 for f in manifest.files} == {
        WEIGHTS_FILE: hashlib.sha256((source / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "reference.npy": hashlib.sha256((source / "sample.npy").read_bytes()).hexdigest(),
    }
    assert signature(directory) == CANCER_SIGNATURE
    assert [v.status for v in verify(registry_root)] == ["ok"]
    runner = create_runner(manifest, directory)
    await runner.load()
    outputs = await predict_arrays(runner, {"input": cancer_features[:4]})
    await runner.unload()
    np.testing.assert_allclose(
        outputs["probabilities"], expected(cancer_features[:4], weights), rtol=1e-4
    )

    (directory / WEIGHTS_FILE).write_bytes((weights * 1000).tobytes())  # same size
    (report,) = verify(registry_root)
    assert report.status == "refused"
    assert report.reason is not None and f"{WEIGHTS_FILE}: sha256" in report.reason
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS_FILE}: sha256"):
        await create_runner(manifest, directory).load()


def test_add_refuses_a_reference_of_another_kind(registry_root: Path, source: Path) -> None:
    (source / "lr.onnx").write_bytes(b"x")
    (source / "sample.csv").write_text("1,2\n")
    with pytest.raises(ArtifactError, match=r"\.npy or \.npz"):
        add(
            registry_root,
            source / "lr.onnx",
            model="m",
            version="1",
            reference=source / "sample.csv",
        )
