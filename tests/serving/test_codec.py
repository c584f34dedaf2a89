"""V2 codec: tensors to and from V2 objects, responses encoded (JSON and binary), outputs
picked; requests are decoded by InferRequest (tests/serving/test_messages.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.codec import (
    encode_infer_request,
    encode_infer_response,
    encode_items_response,
    output_item,
    response_outputs,
    select_items,
    select_outputs,
    tensor_from_item,
    tensors_from_outputs,
)
from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.tensors import TensorSpec

_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    # JSON has no inf/NaN: orjson writes null, which decodes back as NaN.
    elements={"allow_nan": False, "allow_infinity": False},
)


@given(_ARRAYS)
def test_output_item_round_trips_through_tensor_from_item(array: np.ndarray) -> None:
    item = orjson.loads(orjson.dumps(output_item("y", array), option=orjson.OPT_SERIALIZE_NUMPY))
    name, back, offset = tensor_from_item(item, "outputs[0]", None, 0)
    assert (name, offset) == ("y", 0)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_bytes_tensors_travel_as_text() -> None:
    words = np.array([b"cat", "dog"], dtype=object)
    item = output_item("w", words)
    assert item == {"name": "w", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]}
    _, back, _ = tensor_from_item(item, "inputs[0]", None, 0)
    assert list(back) == [b"cat", b"dog"]


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ([None, "b"], "null"),
        ([1, 2.5], "int"),
        ([True, False], "bool"),
        ([{"a": 1}, "b"], "dict"),
        (["a", ["b"]], "list"),
    ],
)
def test_bytes_elements_are_strings_and_nothing_else(data: list[Any], found: str) -> None:
    """Found by an adversarial probe: the model got "None", "1", "True", "{'a': 1}"."""
    item = {"name": "w", "datatype": "BYTES", "shape": [2], "data": data}
    with pytest.raises(InvalidInput) as info:
        tensor_from_item(item, "inputs[0]", None, 0)
    assert str(info.value) == f"input 'w': BYTES elements are strings, the data holds {found}"


def test_a_binary_bytes_element_longer_than_its_tensor_is_refused() -> None:
    """Its length prefix said 0xFFFFFFFF: the element was cut short and served."""
    chunk = (3).to_bytes(4, "little") + b"abc" + (0xFFFFFFFF).to_bytes(4, "little") + b"def"
    item = {"name": "w", "datatype": "BYTES", "shape": [2],
            "parameters": {"binary_data_size": len(chunk)}}  # fmt: skip
    with pytest.raises(InvalidInput, match="a BYTES element of 4294967295 bytes runs past"):
        tensor_from_item(item, "inputs[0]", memoryview(chunk), 0)
    good = (3).to_bytes(4, "little") + b"abc" + (3).to_bytes(4, "little") + b"def"
    _, back, _ = tensor_from_item(item | {"parameters": {"binary_data_size": len(good)}},
                                  "inputs[0]", memoryview(good), 0)  # fmt: skip
    assert list(back) == [b"abc", b"def"]


def test_binary_response_carries_the_requested_outputs_after_the_json() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, header_len = encode_infer_response(
        {"y": x * 2, "label": np.array([1, 0])},
        model_name="m",
        model_version="1",
        request_id="r",
        binary_outputs={"y"},
    )
    assert header_len is not None
    meta = orjson.loads(body[:header_len])
    assert (meta["model_name"], meta["model_version"], meta["id"]) == ("m", "1", "r")
    y_meta, label = meta["outputs"]
    assert "data" not in y_meta and label["data"] == [1, 0]  # not asked for as binary: JSON
    size = y_meta["parameters"]["binary_data_size"]
    y = np.frombuffer(body[header_len : header_len + size], dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(y, x * 2)
    assert len(body) == header_len + size


@given(_ARRAYS)
def test_json_response_round_trips(array: np.ndarray) -> None:
    body, header_len = encode_infer_response(
        {"out": array}, model_name="m", model_version="2", request_id="i", parameters={"p": 1}
    )
    assert header_len is None
    items, rest = response_outputs(body)
    assert rest == {"model_name": "m", "model_version": "2", "id": "i", "parameters": {"p": 1}}
    out = tensors_from_outputs(items)["out"]
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_items_response_serialises_numpy_data_as_is() -> None:
    items = [output_item("label", np.array([1, 0])), output_item("p", np.ones((2, 2), "f4"))]
    body = encode_items_response(items, model_name="m", model_version="3", request_id=None)
    doc = orjson.loads(body)
    assert "id" not in doc
    assert doc["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "p", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 1.0, 1.0, 1.0]},
    ]


def test_upstream_outputs_that_do_not_hold_are_upstream_errors() -> None:
    with pytest.raises(UpstreamError, match="upstream response: input 'y'"):
        tensors_from_outputs([{"name": "y", "datatype": "INT64", "shape": [2], "data": [1]}])


def test_request_encoding_asks_for_outputs_by_name() -> None:
    body = encode_infer_request({"x": np.zeros((1, 2), "f4")}, request_id="a", outputs=["l"])
    doc = orjson.loads(body)
    assert doc["id"] == "a" and doc["outputs"] == [{"name": "l"}]
    assert doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]


def test_select_outputs_honours_request_order_and_rejects_unknown() -> None:
    outs = {"label": np.zeros(1), "probabilities": np.zeros((1, 2))}
    assert list(select_outputs(outs, ["probabilities"])) == ["probabilities"]
    assert list(select_outputs(outs, None)) == ["label", "probabilities"]
    declared = [TensorSpec("probabilities", "FP64", (-1, 2)), TensorSpec("label", "FP64", (-1,))]
    assert list(select_outputs(outs, None, declared)) == ["probabilities", "label"]
    with pytest.raises(InvalidInput, match="unknown output"):
        select_outputs(outs, ["nope"])


def _item(name: str) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": [1], "data": [0.0]}


@pytest.mark.parametrize(
    ("names", "requested", "declared", "want"),
    [
        (["label", "probabilities"], ["probabilities"], [], ["probabilities"]),
        (["label", "probabilities"], ["probabilities", "label"], [], ["probabilities", "label"]),
        (["label", "probabilities"], None, [], ["label", "probabilities"]),
        (["label", "probabilities"], None, ["probabilities", "label"], ["probabilities", "label"]),
        (["extra", "label"], None, ["label"], ["label", "extra"]),  # undeclared ones last
        (["label", "probabilities"], None, ["label", "probabilities"], ["label", "probabilities"]),
    ],
)
def test_select_items_orders_like_select_outputs(
    names: list[str], requested: list[str] | None, declared: list[str], want: list[str]
) -> None:
    specs = [TensorSpec(n, "FP32", (-1,)) for n in declared]
    items = [_item(n) for n in names]
    assert [item["name"] for item in select_items(items, requested, specs)] == want
    arrays = {n: np.zeros(1, np.float32) for n in names}
    assert list(select_outputs(arrays, requested, specs)) == want
    with pytest.raises(InvalidInput, match=r"unknown output\(s\) \['nope'\]"):
        select_items(items, ["nope"], specs)
