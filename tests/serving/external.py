"""A small ONNX model whose weights live in an external data file, built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES = 30
WEIGHTS_FILE = "weights.bin"


def linear_onnx(directory: Path, weights: np.ndarray, *, name: str = "lr.onnx") -> Path:
    """directory/name computing `probabilities = softmax(input @ weights)` and
    `label = argmax`, with `weights` ([30, 2] float32) kept in directory/weights.bin."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / name
    onnx.save_model(
        model, path, save_as_external_data=True, location=WEIGHTS_FILE, size_threshold=0
    )
    return path


def expected(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The probabilities `linear_onnx` computes."""
    logits = features.astype(np.float64) @ weights.astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities
