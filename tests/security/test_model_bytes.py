"""Model bytes: what is hashed is what is loaded, every loaded file is pinned and stays in
its version directory, and `registry add` runs nothing in a pickle it is given."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rollguard.serving.availability import Availability
from tests.proxy.support import serve
from tests.serving.external import FEATURES, WEIGHTS_FILE, expected, linear_onnx
from tests.serving.support import eventually

SWAP_SECONDS = 10.0


class _Evil:
    """Unpickled, it creates `marker` (a directory): proof that its code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


def cancer() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    return x.astype(np.float32), y


def trained() -> Pipeline:
    x, y = cancer()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)


def joblib_bytes(estimator: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


OUT = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]


def manifest(version: str, framework: str, artifact: str, digest: str, **extra: Any) -> str:
    fields = {
        "name": "fraud",
        "version": version,
        "framework": framework,
        "artifact": artifact,
        "sha256": digest,
        "stage": "production",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
        **extra,
    }
    return yaml.safe_dump(fields)


def replace(path: Path, data: bytes) -> None:
    """Write `data` over `path` atomically (a new inode), as deploy tools and attackers do."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def infer_body(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }


async def probabilities(url: str, rows: np.ndarray, version: str = "1") -> np.ndarray:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v2/models/fraud/versions/{version}/infer", json=infer_body(rows)
        ) as response,
    ):
        doc = await response.json()
        assert response.status == 200, doc
    outputs = {o["name"]: o for o in doc["outputs"]}
    return np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])


def load_count(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        r.getMessage().startswith(("loaded fraud/1 ", "reloaded fraud/1 "))
        for r in caplog.records
        if r.name == "rollguard.serving.registry"
    )


@pytest.mark.slow
async def test_swapping_a_pickle_while_it_is_verified_never_loads_the_other_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The attack of the issue: model.joblib swapped with an evil pickle (atomic renames)
    # between the hash and the load. model.yaml flips between two equivalent texts so
    # that every scan that verifies the good file also loads it: the race window opens
    # on every scan, hundreds of times.
    caplog.set_level(logging.INFO, logger="rollguard.serving.registry")
    marker = tmp_path / "evil-ran"
    good, evil = joblib_bytes(trained()), evil_pickle(marker)
    version = tmp_path / "registry" / "fraud" / "1"
    version.mkdir(parents=True)
    texts = [
        manifest("1", "sklearn", "model.joblib", sha(good), created_by=who).encode()
        for who in ("a", "b")
    ]
    (version / "model.joblib").write_bytes(good)
    (version / "model.yaml").write_bytes(texts[0])
    stop = threading.Event()

    def attacker() -> int:
        swaps = 0
        while not stop.is_set():
            replace(version / "model.joblib", evil)
            replace(version / "model.yaml", texts[swaps % 2])
            replace(version / "model.joblib", good)
            swaps += 1
        return swaps

    async with serve(tmp_path, tmp_path / "registry", registry_poll_s=0.005) as server:
        swapping = asyncio.create_task(asyncio.to_thread(attacker))
        deadline = time.monotonic() + SWAP_SECONDS
        while time.monotonic() < deadline and not marker.exists():  # noqa: ASYNC110 (a file)
            await asyncio.sleep(0.05)
        stop.set()
        swaps = await swapping
        assert not marker.exists(), "the unpinned pickle was unpickled"
        loads = load_count(caplog)
        assert loads >= 10, f"only {loads} loads in {swaps} swaps: the race was not exercised"
        replace(version / "model.yaml", texts[0])
        registry = server.running.registry
        await eventually(lambda: registry.availability("fraud", "1") is Availability.READY)
        x, _ = cancer()
        got = await probabilities(server.url, x[:8])
        np.testing.assert_allclose(got, trained().predict_proba(x[:8]), rtol=1e-5)
    assert not marker.exists()


@pytest.mark.slow
async def test_swapping_a_torchscript_file_never_serves_the_other_module(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch = pytest.importorskip("torch")
    caplog.set_level(logging.INFO, logger="rollguard.serving.registry")

    def scripted(scale: float) -> bytes:
        linear = torch.nn.Linear(FEATURES, 2, bias=False)
        with torch.no_grad():
            linear.weight.fill_(scale)
        module = torch.jit.trace(
            torch.nn.Sequential(linear, torch.nn.Softmax(1)), torch.zeros(1, FEATURES)
        )
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return buffer.getvalue()

    good, evil = scripted(0.0), scripted(1.0)  # good answers 0.5/0.5 for every row
    version = tmp_path / "registry" / "fraud" / "1"
    version.mkdir(parents=True)
    texts = [
        manifest("1", "torch", "model.pt", sha(good), created_by=who, outputs=OUT).encode()
        for who in ("a", "b")
    ]
    (version / "model.pt").write_bytes(good)
    (version / "model.yaml").write_bytes(texts[0])
    stop = threading.Event()

    def attacker() -> None:
        flips = 0
        while not stop.is_set():
            replace(version / "model.pt", evil)
            replace(version / "model.yaml", texts[flips % 2])
            replace(version / "model.pt", good)
            flips += 1

    rows = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    async with serve(tmp_path, tmp_path / "registry", registry_poll_s=0.005) as server:
        registry = server.running.registry
        await eventually(lambda: registry.availability("fraud", "1").serves)
        swapping = asyncio.create_task(asyncio.to_thread(attacker))
        served: list[np.ndarray] = []
        try:
            deadline = time.monotonic() + SWAP_SECONDS
            while time.monotonic() < deadline:
                served.append(await probabilities(server.url, rows))
        finally:
            stop.set()
            await swapping
    assert load_count(caplog) >= 10
    wrong = [p for p in served if not np.allclose(p, 0.5)]
    assert wrong == [], f"{len(wrong)} of {len(served)} answers came from the swapped-in module"


def write_external_version(root: Path, weights: np.ndarray, *, pin_weights: bool = True) -> Path:
    version = root / "fraud" / "1"
    version.mkdir(parents=True)
    linear_onnx(version, weights, name="model.onnx")
    files = [{"path": WEIGHTS_FILE, "sha256": sha((version / WEIGHTS_FILE).read_bytes())}]
    text = manifest(
        "1",
        "onnx",
        "model.onnx",
        sha((version / "model.onnx").read_bytes()),
        files=files if pin_weights else [],
    )
    (version / "model.yaml").write_text(text)
    return version


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollguard.proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=120,
    )


async def test_tampered_external_data_weights_are_refused(tmp_path: Path) -> None:
    weights = np.random.default_rng(1).normal(size=(FEATURES, 2)).astype(np.float32) / 100
    root = tmp_path / "registry"
    version = write_external_version(root, weights)
    x, _ = cancer()
    async with serve(tmp_path, root) as server:
        got = await probabilities(server.url, x[:4])
    np.testing.assert_allclose(got, expected(x[:4], weights), rtol=1e-4)
    assert run_cli("registry", "--registry", str(root), "verify", cwd=tmp_path).returncode == 0

    # Rewritten in place, same size: the model file itself is untouched.
    (version / WEIGHTS_FILE).write_bytes((weights * 1000).tobytes())
    async with serve(tmp_path, root) as server:
        registry = server.running.registry
        assert registry.availability("fraud", "1") is Availability.REFUSED
        assert f"{WEIGHTS_FILE}: sha256" in registry.refused()[("fraud", "1")]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.url}/v2/models/fraud/versions/1/infer", json=infer_body(x[:4])
            ) as response,
        ):
            assert response.status == 503
            body = await response.text()
    assert str(tmp_path) not in body and sha(weights.tobytes()) not in body
    verified = run_cli("registry", "--registry", str(root), "verify", cwd=tmp_path)
    assert verified.returncode == 1
    assert f"{WEIGHTS_FILE}: sha256" in verified.stdout


async def test_external_data_not_listed_in_the_manifest_cannot_load(tmp_path: Path) -> None:
    weights = np.ones((FEATURES, 2), np.float32)
    root = tmp_path / "registry"
    write_external_version(root, weights, pin_weights=False)
    async with serve(tmp_path, root) as server:
        registry = server.running.registry
        assert registry.availability("fraud", "1") is Availability.REFUSED
        assert "external data" in registry.refused()[("fraud", "1")]


def test_registry_add_of_a_hostile_pickle_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "evil-ran"
    (tmp_path / "evil.joblib").write_bytes(evil_pickle(marker))
    (tmp_path / "evil.pt2").write_bytes(evil_pickle(marker))
    root = tmp_path / "registry"
    for artifact, version in (("evil.joblib", "1"), ("evil.pt2", "2")):
        added = run_cli(
            "registry",
            "--registry",
            str(root),
            "add",
            str(tmp_path / artifact),
            "--model",
            "fraud",
            "--version",
            version,
            "--input",
            "input:FP32:-1,30",
            cwd=tmp_path,
        )
        assert added.returncode == 0, added.stderr
        assert not marker.exists(), f"registry add ran the code in {artifact}"
    written = yaml.safe_load((root / "fraud" / "1" / "model.yaml").read_text())
    assert written["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert "--trust-pickle" in added.stderr  # outputs were not read, and it says why

    # Only an explicit opt-in loads it (and that is what the opt-in means).
    trusted = run_cli(
        "registry",
        "--registry",
        str(root),
        "add",
        str(tmp_path / "evil.joblib"),
        "--model",
        "fraud",
        "--version",
        "3",
        "--trust-pickle",
        cwd=tmp_path,
    )
    assert marker.exists(), trusted.stderr


@pytest.mark.parametrize(
    "reference",
    ["/etc/hostname", "../other/reference.npy", "sub/reference.npy", ".hidden.npy", "loose.npy"],
)
async def test_reference_outside_the_version_directory_or_unpinned_is_refused(
    tmp_path: Path, reference: str
) -> None:
    root = tmp_path / "registry"
    version = root / "fraud" / "1"
    version.mkdir(parents=True)
    data = joblib_bytes(trained())
    (version / "model.joblib").write_bytes(data)
    np.save(version / "loose.npy", np.zeros((3, FEATURES), np.float32))
    text = manifest("1", "sklearn", "model.joblib", sha(data), reference=reference)
    (version / "model.yaml").write_text(text)
    async with serve(tmp_path, root) as server:
        registry = server.running.registry
        assert registry.availability("fraud", "1") is Availability.REFUSED
        assert "reference" in registry.refused()[("fraud", "1")]


async def test_pinned_file_linked_from_outside_the_version_directory_is_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "registry"
    version = root / "fraud" / "1"
    version.mkdir(parents=True)
    data = joblib_bytes(trained())
    (version / "model.joblib").write_bytes(data)
    sample = tmp_path / "elsewhere.npy"
    np.save(sample, np.zeros((3, FEATURES), np.float32))
    (version / "reference.npy").symlink_to(sample)  # the hash matches; the place does not
    files = [{"path": "reference.npy", "sha256": sha(sample.read_bytes())}]
    text = manifest(
        "1", "sklearn", "model.joblib", sha(data), reference="reference.npy", files=files
    )
    (version / "model.yaml").write_text(text)
    async with serve(tmp_path, root) as server:
        registry = server.running.registry
        assert registry.availability("fraud", "1") is Availability.REFUSED
        assert "outside its version directory" in registry.refused()[("fraud", "1")]
        # A version directory that is itself a link (as test registries are) is fine.
        os.replace(version / "reference.npy", version.parent / "moved.npy")
        (version / "reference.npy").write_bytes(sample.read_bytes())
        linked = root / "fraud" / "2"
        (tmp_path / "store").mkdir()
        os.rename(version, tmp_path / "store" / "1")
        (tmp_path / "store" / "1" / "model.yaml").write_text(text.replace("'1'", "'2'"))
        linked.symlink_to(tmp_path / "store" / "1")
        await registry.refresh()
        await registry.refresh()
        assert registry.availability("fraud", "2") is Availability.READY, registry.refused()
