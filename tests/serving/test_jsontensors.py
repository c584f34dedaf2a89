"""JSON tensors checked without numpy: never accepting what numpy refuses, never differing
from what numpy would have made of the same tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.serving.codec import tensor_from_item
from rollguard.serving.errors import InvalidInput
from rollguard.serving.jsontensors import deferred_meta, flat_count, numeric_data_fits

_DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES"]
_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)


@st.composite
def tensor_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON input tensor, mostly well formed, sometimes not in one way or another."""
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    count = int(np.prod(shape)) if shape else 1
    data = draw(st.lists(_VALUES, min_size=count, max_size=count))
    if draw(st.booleans()):  # plausible numbers more often than not
        data = draw(
            st.lists(
                st.one_of(st.integers(-300, 300), st.floats(-1e6, 1e6)),
                min_size=count,
                max_size=count,
            )
        )
    doc: dict[str, Any] = {"name": "x", "datatype": draw(st.sampled_from(_DATATYPES))}
    doc["shape"] = draw(st.sampled_from([shape, [*shape, 2], "bad"]))
    doc["data"] = draw(st.sampled_from([data, data[:-1], [data]]))
    if draw(st.integers(0, 9)) == 0:
        doc["parameters"] = {}
    return doc


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
