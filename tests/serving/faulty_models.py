"""Real models that misbehave, built locally, for the process-isolation tests.

- `hanging_onnx`: an ONNX graph whose `Loop` runs as many times as the largest input
  value says. `y = x` for every input; with x = 1 it answers in microseconds, with
  x = 1e9 it computes for hours (nothing but SIGKILL stops it).
- `CrashingEstimator`: a scikit-learn-style estimator (a joblib pickle) whose process
  dies on a row whose first feature is `CRASH_ON`: by `os._exit` or by a segfault.

The estimator class lives here, a module with nothing heavy in it, because a worker
process that unpickles the artifact imports it by name.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import numpy as np

CRASH_ON = -666.0
HANG_VALUE = 1e9  # loop trips: hours of work in ONNX Runtime


def hanging_onnx() -> bytes:
    """An ONNX model, input x FP32 [-1, 2], output y FP32 [-1, 2] = x, after a Loop of
    max(x) trips (at least 0)."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "count",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
            helper.make_node("Relu", ["largest"], ["trips_f"]),
            helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "go", "zero"], ["count"], body=body),
            helper.make_node("Mul", ["count", "zero"], ["nothing"]),
            helper.make_node("Add", ["x", "nothing"], ["y"]),
        ],
        "hanging",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor("go", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


class CrashingEstimator:
    """Label 1 where the first feature is positive; the process dies on a row whose
    first feature is CRASH_ON (`how`: "exit" calls os._exit(3), "segfault" reads
    address 0; "always" calls os._exit(3) on every call)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.how == "always" or bool((features[:, 0] == CRASH_ON).any()):
            if self.how == "segfault":
                ctypes.string_at(0)
            os._exit(3)
        return (features[:, 0] > 0).astype(np.int64)


def crashing_joblib(how: str) -> bytes:
    import io

    import joblib

    buffer = io.BytesIO()
    joblib.dump(CrashingEstimator(how), buffer)
    return buffer.getvalue()


def write_version(
    registry: Path,
    model: str,
    version: str,
    artifact: bytes,
    *,
    framework: str = "onnx",
    isolation: str = "process",
    workers: int | None = None,
    stage: str = "production",
) -> Path:
    """registry/model/version with `artifact` and its model.yaml (x FP32 [-1, 2] in;
    y FP32 [-1, 2] out for onnx, label INT64 [-1] for sklearn)."""
    directory = registry / model / version
    directory.mkdir(parents=True, exist_ok=True)
    name = "model.onnx" if framework == "onnx" else "model.joblib"
    (directory / name).write_bytes(artifact)
    output = (
        "{name: y, datatype: FP32, shape: [-1, 2]}"
        if framework == "onnx"
        else "{name: label, datatype: INT64, shape: [-1]}"
    )
    runtime = f"isolation: {isolation}" + (f", workers: {workers}" if workers else "")
    (directory / "model.yaml").write_text(
        f"name: {model}\nversion: '{version}'\nframework: {framework}\nartifact: {name}\n"
        f"sha256: {hashlib.sha256(artifact).hexdigest()}\nstage: {stage}\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n"
        f"outputs: [{output}]\nruntime: {{{runtime}}}\n"
    )
    return directory
