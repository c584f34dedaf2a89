"""TorchRunner against the demo registry's TorchScript and torch.export versions."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollguard.serving.demo import build_demo_registry, load_eval_data
from rollguard.serving.errors import ArtifactError, FrameworkUnavailable, ModelExecutionError
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, load_manifest
from rollguard.serving.runners.torch import TorchRunner
from tests.serving.support import predict_arrays

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    build_demo_registry(root, frameworks=("torch",))
    return root


def _runner(directory: Path, **update: Any) -> TorchRunner:
    manifest = load_manifest(directory / MANIFEST_NAME)
    return TorchRunner(manifest.model_copy(update=update), directory)


def _direct(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
    else:
        module = torch.jit.load(str(path))
    with torch.inference_mode():
        label, probabilities = module(torch.from_numpy(x))
    return label.numpy(), probabilities.numpy()


@pytest.mark.parametrize(("version", "artifact"), [("1.0.0", "model.pt"), ("1.1.0", "model.pt2")])
async def test_matches_the_torch_module(registry: Path, version: str, artifact: str) -> None:
    directory = registry / "fraud-torch" / version
    runner = _runner(directory)
    await runner.load()
    x, y = load_eval_data()
    got = await predict_arrays(runner, {"input": x})
    label, probabilities = _direct(directory / artifact, x)
    assert got["label"].dtype == np.int64 and got["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(got["label"], label)
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-6)
    assert np.mean(got["label"] == y) > 0.9


async def test_both_formats_agree_and_serve_concurrent_batches(registry: Path) -> None:
    scripted = _runner(registry / "fraud-torch" / "1.0.0")
    exported = _runner(registry / "fraud-torch" / "1.1.0")
    await asyncio.gather(scripted.load(), exported.load())
    x, _ = load_eval_data()
    batches = [x[i : i + 7] for i in range(0, len(x), 7)]  # uneven sizes: the batch dim is free
    results = await asyncio.gather(
        *(predict_arrays(r, {"input": b}) for r in (scripted, exported) for b in batches)
    )
    half = len(batches)
    for a, b in zip(results[:half], results[half:], strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5)


async def test_extra_outputs_get_positional_names(registry: Path) -> None:
    directory = registry / "fraud-torch" / "1.0.0"
    manifest = load_manifest(directory / MANIFEST_NAME)
    runner = _runner(directory, outputs=manifest.outputs[:1])
    await runner.load()
    x, _ = load_eval_data()
    assert sorted(runner.predict_sync({"input": x[:3]})) == ["label", "output_1"]


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
async def test_wrong_width_is_a_one_line_model_error(registry: Path, version: str) -> None:
    runner = _runner(registry / "fraud-torch" / version)
    await runner.load()
    with pytest.raises(ModelExecutionError) as info:
        runner.predict_sync({"input": np.zeros((2, 31), np.float32)})
    assert "30" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
async def test_garbage_artifact_is_refused(registry: Path, tmp_path: Path, version: str) -> None:
    directory = tmp_path / version
    shutil.copytree(registry / "fraud-torch" / version, directory)
    artifact = next(directory.glob("model.pt*"))
    artifact.write_bytes(b"PK\x03\x04 truncated, not a torch archive" * 20)
    repinned = sha256_file(artifact)  # pinned: only the loader can object
    with pytest.raises(ArtifactError, match=re.escape(f"{artifact.name}: torch cannot load it")):
        await _runner(directory, sha256=repinned).load()


async def test_missing_torch_is_framework_unavailable(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(FrameworkUnavailable, match=r"model\.pt: .*PyTorch.*not installed"):
        await _runner(registry / "fraud-torch" / "1.0.0").load()
