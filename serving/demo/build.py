"""Builds the demo registry: real models trained on scikit-learn's bundled datasets.

fraud        sklearn  1.0.0 production, 1.1.0 better candidate, 1.2.0 fails on ~5% of rows,
                      1.3.0 ~50 ms slower, 1.4.0 trained on two weak features (less accurate)
fraud-onnx   onnx     1.0.0 production, 1.1.0 candidate (skl2onnx conversions of fraud's)
fraud-torch  torch    1.0.0 TorchScript production, 1.1.0 torch.export candidate
digits       onnx     1.0.0 production (64 features, 10 classes)
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rollguard.serving.catalog import verify_directory
from rollguard.serving.demo.faulty import FaultyClassifier, SlowClassifier
from rollguard.serving.errors import ServingError
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, dump_manifest, parse_manifest

log = logging.getLogger(__name__)
_E = TypeVar("_E", bound=Any)  # an estimator

FRAMEWORKS = ("onnx", "torch", "sklearn")
REFERENCE_NAME = "reference.npy"
_REFERENCE_ROWS = 200
_FRAMEWORK_OF = {".skops": "sklearn", ".joblib": "sklearn", ".onnx": "onnx"}
_WEAK_FEATURES = [1, 4]  # mean texture, mean smoothness: about 20 points below all 30


@dataclass(frozen=True, slots=True)
class Split:
    """A stratified train/test split: float32 features, int64 labels."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def _split(loader: Callable[..., Any], seed: int) -> Split:
    x, y = loader(return_X_y=True)
    parts = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=seed, stratify=y
    )
    return Split(*parts)  # train_test_split orders them x_train, x_test, y_train, y_test


def load_eval_data(*, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The breast_cancer test split (float32 X, int64 y) the fraud models never trained on."""
    split = _split(load_breast_cancer, seed)
    return split.x_test, split.y_test


def _logistic(c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))


@dataclass
class _Models:
    """Trains each model at most once per build, and only when a missing version needs it."""

    seed: int

    @cached_property
    def fraud_data(self) -> Split:
        return _split(load_breast_cancer, self.seed)

    @cached_property
    def digits_data(self) -> Split:
        return _split(load_digits, self.seed)

    def fit(self, estimator: _E, data: Split | None = None) -> _E:
        data = data or self.fraud_data
        estimator.fit(data.x_train, data.y_train)
        return estimator

    @cached_property
    def fraud_v1(self) -> Pipeline:
        return self.fit(_logistic(0.01))  # strongly regularised: a slightly weaker baseline

    @cached_property
    def fraud_v11(self) -> Pipeline:
        return self.fit(_logistic(0.3))

    def fraud_faulty(self) -> FaultyClassifier:
        return self.fit(FaultyClassifier(_logistic(0.01), fault_rate=0.05))

    def fraud_slow(self) -> SlowClassifier:
        # The runner calls predict and predict_proba: ~50 ms per request in all.
        return self.fit(SlowClassifier(_logistic(0.01), delay_s=0.025))

    def fraud_weak(self) -> Pipeline:
        pick = ColumnTransformer([("weak", "passthrough", _WEAK_FEATURES)])
        return self.fit(Pipeline([("pick", pick), *_logistic(1.0).steps]))

    def digits(self) -> Pipeline:
        return self.fit(_logistic(1.0), self.digits_data)

    @cached_property
    def fraud_torch(self) -> Any:
        return _train_torch(self.fraud_data, self.seed)


def _train_torch(data: Split, seed: int) -> Any:
    """A 30-16-2 MLP with standardisation built in; returns (label int64, probabilities)."""
    import torch
    from torch import nn

    class FraudNet(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
            self.net = nn.Sequential(nn.Linear(mean.numel(), 16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net((x - self.mean) / self.std)
            return logits.argmax(dim=1), torch.softmax(logits, dim=1)

    torch.manual_seed(seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = FraudNet(x.mean(dim=0), x.std(dim=0))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    # Tiny ops: a second thread only adds sync cost, 10x so on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):  # full batch: 426 rows
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model.net((x - model.mean) / model.std), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


def _save(model: Any, path: Path, data: Split) -> None:
    """Write `model` in the format its file name asks for."""
    if path.suffix == ".skops":
        import skops.io

        skops.io.dump(model, path)
    elif path.suffix == ".joblib":
        import joblib

        joblib.dump(model, path)
    elif path.suffix == ".onnx":
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType

        features = FloatTensorType([None, data.x_train.shape[1]])
        proto = convert_sklearn(
            model, initial_types=[("input", features)], options={id(model): {"zipmap": False}}
        )
        # Older skl2onnx releases call them output_label / output_probability.
        for output, new in zip(proto.graph.output, ["label", "probabilities"], strict=True):
            old, output.name = output.name, new
            for node in proto.graph.node:
                node.output[:] = [new if o == old else o for o in node.output]
        path.write_bytes(proto.SerializeToString())
    else:
        import torch

        example = torch.from_numpy(data.x_train[:8])  # export needs a batch of 2+ to be dynamic
        if path.suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
            torch.export.save(program, str(path))
        else:
            torch.jit.trace(model, example).save(str(path))  # type: ignore[no-untyped-call]


def _accuracy(model: Any, data: Split) -> float:
    if hasattr(model, "estimator_"):  # the faulty/slow wrappers: faults are not mistakes
        model = model.estimator_
    if hasattr(model, "predict"):
        predicted = model.predict(data.x_test)
    else:
        import torch

        with torch.inference_mode():
            predicted = model(torch.from_numpy(data.x_test))[0].numpy()
    return round(float(np.mean(predicted == data.y_test)), 4)


@dataclass(frozen=True, slots=True)
class _Version:
    model: str
    version: str
    artifact: str
    stage: str
    make: Callable[[_Models], Any]
    digits: bool = False

    @property
    def framework(self) -> str:
        return _FRAMEWORK_OF.get(Path(self.artifact).suffix, "torch")


_PLAN = (
    _Version("fraud", "1.0.0", "model.skops", "production", lambda m: m.fraud_v1),
    _Version("fraud", "1.1.0", "model.skops", "staging", lambda m: m.fraud_v11),
    _Version("fraud", "1.2.0", "model.joblib", "staging", _Models.fraud_faulty),
    _Version("fraud", "1.3.0", "model.joblib", "staging", _Models.fraud_slow),
    _Version("fraud", "1.4.0", "model.skops", "staging", _Models.fraud_weak),
    _Version("fraud-onnx", "1.0.0", "model.onnx", "production", lambda m: m.fraud_v1),
    _Version("fraud-onnx", "1.1.0", "model.onnx", "staging", lambda m: m.fraud_v11),
    _Version("fraud-torch", "1.0.0", "model.pt", "production", lambda m: m.fraud_torch),
    _Version("fraud-torch", "1.1.0", "model.pt2", "staging", lambda m: m.fraud_torch),
    _Version("digits", "1.0.0", "model.onnx", "production", _Models.digits, digits=True),
)


def _is_valid(directory: Path, spec: _Version) -> bool:
    """True when a version directory verifies as the registry would load it (manifest,
    artifact and every pinned file, `reference` included)."""
    try:
        manifest = verify_directory(directory, spec.model, spec.version)
    except (ServingError, OSError):
        return False
    return manifest.reference is not None


def _write_version(spec: _Version, models: _Models, staging: Path) -> None:
    data = models.digits_data if spec.digits else models.fraud_data
    model = spec.make(models)
    _save(model, staging / spec.artifact, data)
    np.save(staging / REFERENCE_NAME, data.x_train[:_REFERENCE_ROWS])
    features, classes = data.x_train.shape[1], len(np.unique(data.y_train))
    manifest = parse_manifest(
        {
            "name": spec.model,
            "version": spec.version,
            "framework": spec.framework,
            "artifact": spec.artifact,
            "sha256": sha256_file(staging / spec.artifact),
            "stage": spec.stage,
            "parent": None if spec.version == "1.0.0" else "1.0.0",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            ],
            "metrics": {"accuracy": _accuracy(model, data)},
            "created_by": "rollguard demo builder",
            "created_at": datetime.now(UTC),
            "reference": REFERENCE_NAME,
            "files": [{"path": REFERENCE_NAME, "sha256": sha256_file(staging / REFERENCE_NAME)}],
            "runtime": {"threads": 1} if spec.framework == "torch" else {},
        },
        f"{spec.model}/{spec.version}",
    )
    dump_manifest(manifest, staging / MANIFEST_NAME)


def build_demo_registry(
    root: Path, *, frameworks: Sequence[str] = FRAMEWORKS, seed: int = 0
) -> list[Path]:
    """Write the demo models under `root`; return the version directories written.

    Versions already present and valid are kept. Each version is written in a scratch
    directory inside `root` and renamed into place, so a registry watching `root` never
    sees a half-written version.
    """
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        raise ValueError(f"unknown framework(s) {unknown}; choose from {list(FRAMEWORKS)}")
    wanted = set(frameworks)
    if "torch" in wanted and importlib.util.find_spec("torch") is None:
        log.warning(
            "PyTorch is not installed: skipping fraud-torch (pip install 'rollguard[torch]')"
        )
        wanted.discard("torch")
    root.mkdir(parents=True, exist_ok=True)
    models = _Models(seed)
    written: list[Path] = []
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export but still what many users ship.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        for spec in _PLAN:
            target = root / spec.model / spec.version
            if spec.framework not in wanted or _is_valid(target, spec):
                continue
            staging = Path(tempfile.mkdtemp(prefix=f".build-{spec.model}-", dir=root))
            try:
                _write_version(spec, models, staging)
                target.parent.mkdir(exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("built %s %s", spec.model, spec.version)
            written.append(target)
    return written
