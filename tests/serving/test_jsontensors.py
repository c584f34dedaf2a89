"""JSON tensors checked without numpy: never accepting what numpy refuses, never differing
from what numpy would have made of the same request."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.proxy.answers import deciding_outputs, passthrough_prediction, prediction_of
from rollguard.serving.codec import _tensor_from_json, decode_infer_request, response_outputs
from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.jsontensors import (
    JsonInputs,
    as_tensors,
    deferred_inputs,
    numeric_data_fits,
)
from rollguard.serving.tensors import TensorSpec, check_inputs

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
def test_deferred_inputs_accept_only_what_numpy_converts_and_convert_alike(
    doc: dict[str, Any],
) -> None:
    deferred = deferred_inputs([doc])
    with np.errstate(over="ignore"):  # FP32 beyond its range: inf on both paths
        try:
            _, reference, _ = _tensor_from_json(doc, "inputs[0]", None, 0)
        except InvalidInput:
            assert deferred is None  # numpy refuses it, so it is left to numpy's error
            return
        if deferred is None:
            return  # left to numpy, which also takes it
        array = deferred["x"]
    assert array.dtype == reference.dtype
    assert array.shape == reference.shape == deferred.meta["x"].shape
    assert deferred.meta["x"].dtype == reference.dtype
    np.testing.assert_array_equal(array, reference)


def test_plain_requests_are_deferred_and_converted_once() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2.5, 3, 4]}]}
    )
    inputs = decode_infer_request(body).inputs
    assert isinstance(inputs, JsonInputs)
    assert list(inputs) == ["x"] and len(inputs) == 1
    first = as_tensors(inputs)
    assert first is as_tensors(inputs)  # converted once
    np.testing.assert_array_equal(first["x"], np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    # Nested data, binary tensors and extra fields take the numpy path as before.
    nested = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[1, 2]]}]}
    )
    assert isinstance(decode_infer_request(nested).inputs, dict)


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
    "doc",
    [
        {"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]},  # wrong dtype
        {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]},  # wrong rank
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},  # unknown name
    ],
)
def test_checking_deferred_inputs_gives_numpys_errors(doc: dict[str, Any]) -> None:
    specs = [TensorSpec("x", "FP32", (-1, 2))]
    deferred = deferred_inputs([doc])
    assert deferred is not None
    _, array, _ = _tensor_from_json(doc, "inputs[0]", None, 0)
    with pytest.raises(InvalidInput) as reference:
        check_inputs({doc["name"]: array}, specs)
    with pytest.raises(InvalidInput) as deferred_error:
        check_inputs(deferred.meta, specs)
    assert str(deferred_error.value) == str(reference.value)


_OUTPUT_NAMES = st.sampled_from(["label", "prediction", "probabilities", "score"])


@st.composite
def output_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    outputs = []
    for name in draw(st.lists(_OUTPUT_NAMES, max_size=3, unique=True)):
        shape = draw(st.sampled_from([[1], [2], [1, 3], [2, 2], [0], [0, 2], []]))
        count = int(np.prod(shape)) if shape else 1
        datatype = draw(st.sampled_from(["INT64", "FP32", "FP64", "BYTES", "BOOL"]))
        values = st.one_of(
            st.integers(-5, 5),
            st.floats(-1e3, 1e3, width=32),
            st.floats(-1.0, 1.0),
            st.text(max_size=2),
        )
        data = draw(st.lists(values, min_size=count, max_size=count))
        outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    return outputs


@settings(max_examples=400, deadline=None)
@given(output_lists())
def test_passthrough_prediction_is_what_numpy_reads(items: list[dict[str, Any]]) -> None:
    items, _ = response_outputs(orjson.dumps({"outputs": items}))
    read = passthrough_prediction(items)
    try:
        reference = prediction_of(deciding_outputs(items))
    except UpstreamError:
        assert read is None  # numpy's path gives (or meets) the error
        return
    if read is not None:
        assert read == reference or (np.isnan(read) and np.isnan(reference))


def test_passthrough_prediction_reads_label_then_prediction_then_argmax() -> None:
    label = {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 1]}
    score = {"name": "prediction", "datatype": "FP32", "shape": [1], "data": [0.1]}
    probs = {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 0.7,
             0.2, 0.9, 0.05, 0.05]}  # fmt: skip
    assert passthrough_prediction([probs, score, label]) == 3.0
    assert passthrough_prediction([probs, score]) == float(np.float32(0.1))
    assert passthrough_prediction([probs]) == 1.0  # row 0's argmax
    nothing = passthrough_prediction([])  # no outputs: no prediction, as prediction_of({})
    assert nothing is not None and np.isnan(nothing)
