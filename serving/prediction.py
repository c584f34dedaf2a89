"""The prediction a version's answer holds, read the way its manifest says, and compared
with a ground-truth label.

A manifest's `prediction:` block names the output and how to read it:

    prediction: {output: predict, read: label}                # a class or value per row
    prediction: {output: predict_proba, read: argmax, classes: [malignant, benign]}
    prediction: {output: score, read: threshold, threshold: 0.7}
    prediction: {output: price, read: value}                  # regression

`label` and `value` take the one value of a row (shape [N] or [N, 1], MLServer's
scikit-learn `predict` answers [N, 1]); `argmax` the index of a row's largest value;
`threshold` 1 when a row's score (its one value, or the second of two: the positive
class's probability) is at least the threshold, else 0. `classes` names the indexes.
Without a block: the output named `label`, else `prediction`, else the first output,
its row's argmax when the row holds more than one value.

A prediction is a float or a string (a class name); NaN when the answer holds none.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from rollguard.serving.codec import binary_size, tensor_from_item, tensors_from_outputs
from rollguard.serving.jsontensors import flat_count, numeric_data_fits
from rollguard.serving.tensors import V2_TO_NUMPY

Predicted = float | str
Read = Literal["label", "argmax", "threshold", "value"]
NAN = float("nan")
_DEFAULT_NAMES = ("label", "prediction")


class Rule:
    """Which output holds the prediction and how a row of it is read (None: the default)."""

    __slots__ = ("classes", "output", "read", "threshold")

    def __init__(
        self,
        output: str | None = None,
        read: Read | None = None,
        threshold: float | None = None,
        classes: Sequence[str | int] | None = None,
    ) -> None:
        self.output = output
        self.read = read
        self.threshold = threshold
        self.classes = tuple(str(c) for c in classes) if classes is not None else None


DEFAULT_RULE = Rule()


def is_missing(prediction: Predicted) -> bool:
    return isinstance(prediction, float) and math.isnan(prediction)


# --- reading arrays (the reference) -------------------------------------------------------


def _chosen(rule: Rule, names: Collection[str]) -> tuple[str | None, Read | None]:
    """The output to read and how (None: decide from the row's width); `names` in the
    answer's order."""
    if rule.output is not None:
        return rule.output, rule.read or "label"
    for wanted in _DEFAULT_NAMES:
        if wanted in names:
            return wanted, "label"
    return (next(iter(names)), None) if names else (None, None)


def _scalar(value: Any) -> Predicted:
    """One element as a prediction: numbers as floats, text as str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | np.number | np.bool_):
        return float(value)
    return NAN


def _classed(rule: Rule, index: int) -> Predicted:
    if rule.classes is None:
        return float(index)
    return rule.classes[index] if 0 <= index < len(rule.classes) else NAN


def _read_row(rule: Rule, read: Read | None, row: np.ndarray, whole_first: bool) -> Predicted:
    """One row (a numpy array, maybe 0-d) read as `read` says."""
    flat = row.reshape(-1)
    if flat.size == 0:
        return NAN
    numeric = flat.dtype.kind not in "OUS"
    if read is None:  # the default's first output: a wide row's argmax
        read = "argmax" if flat.size > 1 and numeric else "label"
    if read == "label":
        if flat.size != 1 and not whole_first:
            return NAN
        return _scalar(flat[0])
    if not numeric:
        return NAN  # text has no argmax, score or value
    if read == "value":
        return float(flat[0]) if flat.size == 1 else NAN
    if read == "argmax":
        return _classed(rule, int(np.argmax(flat)))
    # threshold: a score, or the positive class's probability of two
    if flat.size > 2:
        return NAN
    score = float(flat[-1])
    assert rule.threshold is not None  # the manifest requires it for read: threshold
    return _classed(rule, int(score >= rule.threshold))


def read_arrays(rule: Rule, outputs: Mapping[str, np.ndarray], row: int = 0) -> Predicted:
    """Row `row`'s prediction; NaN when the answer holds none there."""
    name, read = _chosen(rule, outputs)
    array = outputs.get(name) if name is not None else None
    if array is None or array.size == 0:
        return NAN
    if array.ndim == 0:
        return _read_row(rule, read, array, rule.output is None) if row == 0 else NAN
    if row >= array.shape[0]:
        return NAN
    if read == "label" and array.size == array.shape[0] and array.dtype.kind in "biuf":
        return float(array.item(row))  # one number a row: what _read_row reads
    row_array = array[row : row + 1]  # a slice keeps an array (and its dtype) for any ndim
    return _read_row(rule, read, row_array, rule.output is None and read == "label")


def rows_of(rule: Rule, outputs: Mapping[str, np.ndarray]) -> list[Predicted]:
    """Every row's prediction, as `read_arrays` reads each row, in whole-array steps (a
    batch's rows are remembered for feedback on the request path, and compared for
    agreement)."""
    name, read = _chosen(rule, outputs)
    array = outputs.get(name) if name is not None else None
    if array is None or array.size == 0:
        return []
    if array.ndim == 0:
        return [read_arrays(rule, outputs, 0)]
    n = array.shape[0]
    if read == "label" and array.size == n and array.dtype.kind in "biuf":
        return [float(v) for v in array.ravel().tolist()]  # one number a row, as below
    flat = array.reshape(n, -1)
    width = flat.shape[1]
    numeric = flat.dtype.kind not in "OUS"
    how = read if read is not None else ("argmax" if width > 1 and numeric else "label")
    if how == "label":
        if width != 1 and not (rule.output is None and read == "label"):
            return [NAN] * n
        first = flat[:, 0]
        if numeric:
            return list(first.astype(np.float64).tolist())
        return [_scalar(v) for v in first.tolist()]
    if not numeric:
        return [NAN] * n
    if how == "value":
        return list(flat[:, 0].astype(np.float64).tolist()) if width == 1 else [NAN] * n
    if how == "argmax":
        return [_classed(rule, i) for i in np.argmax(flat, axis=1).tolist()]
    if width > 2:  # threshold: a score, or the positive class's probability of two
        return [NAN] * n
    assert rule.threshold is not None  # the manifest requires it for read: threshold
    scores = flat[:, -1].astype(np.float64)
    return [_classed(rule, int(hit)) for hit in (scores >= rule.threshold).tolist()]


# --- reading V2 JSON output objects, as the arrays would read ----------------------------


def read_items(
    rule: Rule, items: Sequence[dict[str, Any]], binary: memoryview | None = None
) -> Predicted:
    """Row 0's prediction straight off an upstream's outputs: a flat numeric JSON `data`
    is read without numpy; anything else converts the one output it needs (a binary one
    from its part of `binary`)."""
    name, read = _chosen(rule, [item["name"] for item in items])
    offset = 0
    for item in items:
        if item["name"] == name:
            break
        size = binary_size(item)
        offset += size if type(size) is int else 0
    else:
        return NAN
    if binary_size(item) is not None:
        try:
            _, array, _ = tensor_from_item(item, name or "", binary, offset)
        except Exception:  # an output that does not hold has no prediction to keep
            return NAN
        return read_arrays(rule, {item["name"]: array})
    datatype, shape = item["datatype"], item["shape"]
    data: Any = item.get("data")
    count = flat_count(shape, data)
    if count and shape and numeric_data_fits(datatype, data):
        width = count // shape[0]
        if read is None:
            read = "argmax" if width > 1 else "label"
        if read in ("label", "value"):
            if width == 1 or (rule.output is None and read == "label"):
                value = data[0]
                return float(np.float32(value)) if datatype == "FP32" else float(value)
            return NAN
        return _read_row(rule, read, np.asarray(data[:width], dtype=V2_TO_NUMPY[datatype]), False)
    try:
        return read_arrays(rule, tensors_from_outputs([item]))
    except Exception:  # an output that does not hold has no prediction to keep
        return NAN


# --- comparing with a label --------------------------------------------------------------


def text_of(value: Predicted) -> str:
    """A prediction or label as text: integral numbers without a fraction ("1", not "1.0")."""
    if isinstance(value, str):
        return value
    if value.is_integer():
        return str(int(value))
    return repr(value)


def matches(prediction: Predicted, label: Predicted, tol: float) -> bool:
    """Whether `label` confirms `prediction`: numbers within `tol`, strings equal, a number
    against a string by its text (label 1 confirms class "1"). A missing prediction
    (NaN) matches nothing."""
    if isinstance(prediction, float):
        if math.isnan(prediction):
            return False
        if isinstance(label, float):
            return abs(label - prediction) <= tol
    elif isinstance(label, str):
        return label == prediction
    return text_of(label) == text_of(prediction)


def agreeing(a: Sequence[Predicted], b: Sequence[Predicted], tol: float) -> int:
    """How many rows two answers agree on: each row's predictions matching (numbers
    within `tol`, classes equal); none when they differ in rows, and a missing prediction
    agrees with nothing."""
    if len(a) != len(b):
        return 0
    return sum(matches(x, y, tol) for x, y in zip(a, b, strict=True))
