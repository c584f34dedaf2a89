"""V2 codec: JSON and binary tensors in, named arrays out, and back."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.codec import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    select_outputs,
)
from rollguard.serving.errors import InvalidInput


def _body(**doc: object) -> bytes:
    return orjson.dumps(doc)


def test_decodes_nested_and_flat_data() -> None:
    flat = decode_infer_request(
        _body(inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}])
    )
    nested = decode_infer_request(
        _body(
            id="r1",
            inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
            outputs=[{"name": "label"}],
        )
    )
    assert flat.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
    assert nested.id == "r1"
    assert nested.outputs == ["label"]
    assert flat.outputs is None


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, "needs 3"),
        ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}, "non-int"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, "fit FP32"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}]}, "shape"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "name"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "missing 'data'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "id": 3}, "id"),
    ],
)
def test_malformed_requests_name_the_problem(doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        decode_infer_request(orjson.dumps(doc))


def test_not_json() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        decode_infer_request(b"{nope")


def test_binary_request_and_response_round_trip() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    req = decode_infer_request(head + x.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert req.binary_outputs == {"y"}
    body, header_len = encode_infer_response(
        {"y": x * 2}, model_name="m", model_version="1", request_id=None, binary_outputs={"y"}
    )
    assert header_len is not None
    meta = orjson.loads(body[:header_len])
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    y = np.frombuffer(body[header_len : header_len + size], dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(y, x * 2)


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.bool_]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        # JSON has no inf/NaN: orjson writes null, which decodes back as NaN.
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_response_round_trips_through_json(array: np.ndarray) -> None:
    body, _ = encode_infer_response(
        {"out": array}, model_name="m", model_version="2", request_id="i"
    )
    tensors, meta = decode_infer_response(body)
    assert meta == {"model_name": "m", "model_version": "2", "id": "i"}
    np.testing.assert_array_equal(tensors["out"], array)
    assert tensors["out"].dtype == array.dtype


def test_request_encoding_is_decodable() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    req = decode_infer_request(encode_infer_request({"input": x}, request_id="a", outputs=["l"]))
    np.testing.assert_array_equal(req.inputs["input"], x)
    assert (req.id, req.outputs) == ("a", ["l"])


def test_select_outputs_honours_request_order_and_rejects_unknown() -> None:
    outs = {"label": np.zeros(1), "probabilities": np.zeros((1, 2))}
    assert list(select_outputs(outs, ["probabilities"])) == ["probabilities"]
    assert list(select_outputs(outs, None)) == ["label", "probabilities"]
    with pytest.raises(InvalidInput, match="unknown output"):
        select_outputs(outs, ["nope"])
