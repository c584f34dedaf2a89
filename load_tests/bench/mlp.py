"""A model where compute dominates, for the micro-batching benchmarks: a wide MLP in ONNX.

A 4x2048 MLPClassifier trained (one epoch, accuracy beside the point) on scikit-learn's
load_digits and exported with skl2onnx. Its weights, about 51 MB of FP32, exceed the
32 MB L3 cache, so one row costs a matrix-vector pass over all of them: about 2.9 ms with
ONNX Runtime on one thread on the 2-core benchmark machine, 64 rows about 24 ms (over
7x the rows per second). Two runner threads on single rows reach only about 550 rows/s
together: memory bandwidth, not cores, is the limit, which batching lifts.

`load_tests/bench_batching.py` (the runner-level benchmark) and the peer benchmark's
`rollguard-mlp` / `rollguard-mlp-batched` targets build it here, so both measure the
same model.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import orjson

from rollguard.serving.manifest import MANIFEST_NAME, Batching, Manifest, dump_manifest

MODEL = "wide-mlp"
VERSION = "1.0.0"
HIDDEN, LAYERS = 2048, 4
CLASSES = 10
# The batched target's model.yaml. 64 rows: every one of the 64 connections fits
# in one batch. 2 ms: below one single-row call (about 2.9 ms), so a lone request waits
# less than the compute it shares; under load the delay hardly applies, because it counts
# from the oldest request's arrival and requests queued while both batch slots were busy
# are already past it.
BATCHING = Batching(max_batch_size=64, max_delay_ms=2.0)


def digits() -> np.ndarray:
    """load_digits' 1,797 rows of 64 pixels, scaled to [0, 1], as FP32."""
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return np.asarray(x / 16.0, dtype=np.float32)


def train_onnx(hidden: int = HIDDEN, layers: int = LAYERS) -> bytes:
    """The serialized ONNX model of a `layers`x`hidden` MLP on load_digits."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    if hidden < 1 or layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer of 1 unit, got {layers}x{hidden}")
    x, y = load_digits(return_X_y=True)
    x = np.asarray(x / 16.0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-epoch fit does not converge; it need not
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,) * layers, max_iter=1, random_state=0)
        mlp.fit(x[:400], y[:400])  # accuracy is beside the point; build time is not
        onnx_model = convert_sklearn(
            mlp,
            initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
            options={MLPClassifier: {"zipmap": False}},
        )
    return bytes(onnx_model.SerializeToString())


def write_version(
    directory: Path,
    onnx_bytes: bytes,
    *,
    name: str = MODEL,
    version: str = VERSION,
    batching: Batching | None = None,
) -> Manifest:
    """A registry version directory: model.onnx and its model.yaml (production stage)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(onnx_bytes)
    manifest = Manifest.model_validate(
        {
            "name": name,
            "version": version,
            "framework": "onnx",
            "artifact": "model.onnx",
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "stage": "production",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]},
            ],
            "batching": batching.model_dump() if batching is not None else None,
        }
    )
    dump_manifest(manifest, directory / MANIFEST_NAME)
    return manifest


def registries(root: Path, hidden: int = HIDDEN, layers: int = LAYERS) -> tuple[Path, Path]:
    """Two registries serving the same trained MLP: without batching, and with BATCHING."""
    onnx_bytes = train_onnx(hidden, layers)
    plain, batched = root / "registry-mlp", root / "registry-mlp-batched"
    write_version(plain / MODEL / VERSION, onnx_bytes)
    write_version(batched / MODEL / VERSION, onnx_bytes, batching=BATCHING)
    return plain, batched


def request_body(index: int = 0) -> bytes:
    """load_digits row `index` as a V2 JSON infer request; row 0 is the MLP targets' body."""
    row = [float(v) for v in digits()[index]]
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(row)], "data": row}]}
    return orjson.dumps(doc)
