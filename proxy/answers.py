"""What the windows read from an answer: its prediction, the drift row, shadow agreement.

Row 0 decides: a multi-row request is recorded by its first row's prediction and input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollguard.proxy.windows import VariantWindow
from rollguard.serving.codec import tensors_from_outputs
from rollguard.serving.jsontensors import flat_count, numeric_data_fits
from rollguard.serving.tensors import V2_TO_NUMPY, Tensors


def prediction_of(outputs: Mapping[str, np.ndarray]) -> float:
    """The first row's prediction as one number: its label, else argmax, else value."""
    array = outputs.get("label")
    if array is None:
        array = outputs.get("prediction")
    if array is None:
        if not outputs:
            return float("nan")
        array = next(iter(outputs.values()))
        if array.size == 0 or array.dtype.kind in "OUS":
            return float("nan")  # no number to read (strings, or no rows)
        if array.ndim >= 2:
            return float(np.argmax(array[0]))
    if array.size == 0 or array.dtype.kind in "OUS":
        return float("nan")
    return float(array.item(0))


def deciding_outputs(items: Sequence[dict[str, Any]]) -> Tensors:
    """The one output `prediction_of` reads, as numpy: label, else prediction, else first."""
    item = _deciding_item(items)
    return tensors_from_outputs([item]) if item is not None else {}


def drift_row(window: VariantWindow, inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The first input row, when a drift check watches this version's inputs."""
    if window.input_width is None:
        return None
    first = next(iter(inputs.values()))
    if first.ndim == 2 and first.shape[1] == window.input_width and len(first):
        row: np.ndarray = first[0]
        return row
    return None


def answers_agree(primary: Tensors, shadow: Tensors, tol: float) -> bool:
    """Classifiers agree on every row's label; regressors within `tol`."""
    for name in ("label", "prediction"):
        if name in primary and name in shadow:
            a, b = primary[name], shadow[name]
            if a.shape != b.shape:
                return False
            if name == "label" or a.dtype.kind in "iub":
                return bool(np.array_equal(a, b))
            return bool(np.allclose(a, b, atol=tol, rtol=0))
    common = [n for n in primary if n in shadow]
    if not common:
        return False
    a, b = primary[common[0]], shadow[common[0]]
    if a.shape != b.shape:
        return False
    if a.ndim >= 2 and a.dtype.kind == "f":
        return bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)))
    return (
        bool(np.allclose(a, b, atol=tol, rtol=0))
        if a.dtype.kind == "f"
        else bool(np.array_equal(a, b))
    )


def _deciding_item(items: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The output the windows read: named label, else prediction, else the first."""
    for wanted in ("label", "prediction"):
        for item in items:
            if item["name"] == wanted:
                return item
    return items[0] if items else None


def passthrough_prediction(items: Sequence[dict[str, Any]]) -> float | None:
    """`prediction_of` the upstream's outputs read off their JSON: the label, else the
    prediction, else the first output (its first row's argmax when 2-D or more).

    None when the deciding output is not flat numeric data that converts (the caller then
    takes the numpy path, which also gives the error for data that does not hold).
    """
    item = _deciding_item(items)
    if item is None:
        return float("nan")
    datatype = item["datatype"]
    data: Any = item.get("data")
    shape = item["shape"]
    count = flat_count(shape, data)
    if not count or not numeric_data_fits(datatype, data):
        return None
    if item["name"] not in ("label", "prediction") and len(shape) >= 2:
        row = np.asarray(data[: count // shape[0]], dtype=V2_TO_NUMPY[datatype])
        return float(np.argmax(row))  # the first row's, compared as numpy would
    value = data[0]
    if datatype == "FP32":
        return float(np.float32(value))  # the windows keep what numpy would have read
    return float(value)
