"""JSON tensors checked without numpy: never accepting what numpy refuses, never differing
from what numpy would have made of the same tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

from rollguard.serving.codec import tensor_from_item
from rollguard.serving.errors import InvalidInput
from rollguard.serving.jsontensors import deferred_meta, flat_count, numeric_data_fits
from tests.serving.support import tensor_docs


@settings(max_examples=400, deadline=None)
@given(tensor_docs())
def test_deferred_meta_accepts_only_what_numpy_converts_and_agrees_with_it(
    doc: dict[str, Any],
) -> None:
    meta = deferred_meta([doc])
    with np.errstate(over="ignore"):  # FP32 beyond its range: inf on both paths
        try:
            _, reference, _ = tensor_from_item(doc, "inputs[0]", None, 0)
        except InvalidInput:
            assert meta is None  # numpy refuses it, so it is left to numpy's error
            return
    if meta is None:
        return  # left to numpy, which also takes it
    assert list(meta) == ["x"]
    assert meta["x"].shape == reference.shape
    assert meta["x"].dtype == reference.dtype


def test_deferred_meta_leaves_anything_unusual_to_numpy() -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    assert deferred_meta([x]) is not None
    assert deferred_meta([x, {**x, "name": "y"}]) is not None
    assert deferred_meta([x, x]) is None  # the same name twice: numpy's path names it
    assert deferred_meta([{**x, "data": [[1, 2]]}]) is None  # nested
    assert deferred_meta([{**x, "parameters": {}}]) is None  # extra fields
    assert deferred_meta([{**x, "name": ""}]) is None
    assert deferred_meta(["x"]) is None


@pytest.mark.parametrize(
    ("datatype", "data", "fits"),
    [
        ("FP32", [1, 2.5, True], True),  # numpy takes bools as numbers
        ("FP64", [1, "2"], False),
        ("FP32", [10**400], False),  # beyond floats: numpy's OverflowError
        ("INT8", [127, -128], True),
        ("INT8", [128], False),
        ("UINT64", [2**64 - 1], True),
        ("UINT64", [-1], False),
        ("INT64", [1.0], False),  # numpy's path refuses floats for integer types
        ("INT64", [True], False),  # left to numpy
        ("FP16", [1.0], False),  # may overflow: left to numpy
        ("BYTES", ["a"], False),
    ],
)
def test_numeric_data_fits(datatype: str, data: list[Any], fits: bool) -> None:
    assert numeric_data_fits(datatype, data) is fits


@pytest.mark.parametrize(
    ("shape", "data", "count"),
    [
        ([2, 3], [0] * 6, 6),
        ([], [7], 1),
        ([0, 2], [], 0),
        ([2, 3], [0] * 5, None),  # too short
        ([2], [[1], [2]], 2),  # flat_count counts; the values are numeric_data_fits' job
        ([2, -1], [0, 0], None),
        ([True], [0], None),
        ("2", [0, 0], None),
        ([2], "ab", None),
    ],
)
def test_flat_count(shape: Any, data: Any, count: int | None) -> None:
    assert flat_count(shape, data) == count
