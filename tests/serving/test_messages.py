"""InferRequest and InferResponse: V2 bodies in, lazy views out, each view made once and
agreeing with the others (the numpy path stays the reference)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.codec import (
    encode_infer_request,
    encode_infer_response,
    tensor_from_item,
    tensors_from_outputs,
)
from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.prediction import Predicted, is_missing
from rollguard.serving.tensors import TensorSpec, check_inputs
from tests.serving.support import tensor_docs


def _body(**doc: object) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _tensor(name: str, x: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel()}


# --- InferRequest: decoding ---------------------------------------------------------------


def test_decodes_nested_and_flat_data() -> None:
    flat = InferRequest.decode(
        _body(inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}])
    )
    nested = InferRequest.decode(
        _body(
            id="r1",
            inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
            outputs=[{"name": "label"}],
        )
    )
    assert flat.arrays()["x"].dtype == np.float32
    np.testing.assert_array_equal(flat.arrays()["x"], nested.arrays()["x"])
    assert nested.id == "r1"
    assert nested.outputs == ["label"]
    assert flat.outputs is None and flat.id is None
    assert flat.binary_outputs == nested.binary_outputs == frozenset()


_X = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"inputs": []}, "non-empty list"),
        ({"inputs": {"x": 1}}, "non-empty list"),
        ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, "needs 3"),
        ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}, "non-int"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, "fit FP32"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}]}, "shape"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "name"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "missing 'data'"),
        ({"inputs": [_X, _X]}, "given twice"),
        ({"inputs": [_X], "id": 3}, "'id'"),
        ({"inputs": [_X], "parameters": [1]}, "'parameters'"),
        ({"inputs": [_X], "outputs": {"name": "y"}}, "'outputs' must be a list"),
        ({"inputs": [_X], "outputs": [{"parameters": {}}]}, "string 'name'"),
    ],
)
def test_malformed_requests_name_the_problem(doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        InferRequest.decode(orjson.dumps(doc))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"{nope", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "not valid JSON")],
)
def test_not_a_json_object(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        InferRequest.decode(body)


def _binary_request(x: np.ndarray, **extra: Any) -> tuple[bytes, str]:
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            **extra,
        }
    )
    return head + x.tobytes(), str(len(head))


def test_binary_request_is_forwarded_as_it_came_or_as_the_same_json() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, header = _binary_request(
        x, id="b", outputs=[{"name": "y", "parameters": {"binary_data": True}}]
    )
    request = InferRequest.decode(body, header)
    np.testing.assert_array_equal(request.arrays()["x"], x)
    assert request.outputs == ["y"] and request.binary_outputs == {"y"}
    assert request.rows() == 2
    assert request.upstream_body() == (body, int(header))  # to an upstream taking binary
    sent, length = request.upstream_body(binary=False)  # to one taking JSON only
    assert length is None
    forwarded = InferRequest.decode(sent)
    assert (forwarded.id, forwarded.outputs) == ("b", ["y"])
    assert forwarded.binary_outputs == frozenset({"y"})
    np.testing.assert_array_equal(forwarded.arrays()["x"], x)
    assert "binary_data_size" not in sent.decode()


@pytest.mark.parametrize(
    ("header", "fragment"),
    [("twelve", "not an integer"), ("0", "outside the body"), ("100000", "outside the body")],
)
def test_bad_binary_header_names_the_problem(header: str, fragment: str) -> None:
    body, _ = _binary_request(np.zeros((1, 2), np.float32))
    with pytest.raises(InvalidInput, match=fragment):
        InferRequest.decode(body, header)


def test_binary_data_shorter_than_declared_is_refused() -> None:
    body, header = _binary_request(np.zeros((2, 2), np.float32))
    with pytest.raises(InvalidInput, match="binary_data_size exceeds"):
        InferRequest.decode(body[:-4], header)


def test_binary_data_output_asks_for_every_output_in_binary() -> None:
    body = _body(inputs=[_X], parameters={"binary_data_output": True})
    request = InferRequest.decode(body)
    assert request.outputs is None and request.binary_outputs == {"*"}
    assert request.upstream_body() == (body, None)  # forwarded as it came


def test_request_encoding_is_decodable() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    req = InferRequest.decode(encode_infer_request({"input": x}, request_id="a", outputs=["l"]))
    np.testing.assert_array_equal(req.arrays()["input"], x)
    assert (req.id, req.outputs) == ("a", ["l"])


# --- InferRequest: the lazy views ---------------------------------------------------------


def test_a_plain_request_keeps_its_bytes_and_converts_once() -> None:
    body = _body(
        id="p", inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2.5, 3, 4]}]
    )
    request = InferRequest.decode(body)
    assert request.upstream_body()[0] is body  # forwarded byte for byte
    assert dict(request.meta.items()).keys() == {"x"}
    assert request.meta["x"].shape == (2, 2) and request.meta["x"].dtype == np.float32
    assert request.rows() == 2
    first = request.arrays()
    assert request.arrays() is first  # converted once
    np.testing.assert_array_equal(first["x"], np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    assert request.upstream_body()[0] is body  # converting does not change what is sent


@pytest.mark.parametrize(
    "extra",
    [
        {"outputs": [{"name": "label"}]},
        {"outputs": [{"name": "label", "parameters": {"binary_data": True}}]},
        {"parameters": {"binary_data_output": True}},
    ],
)
def test_a_request_choosing_outputs_is_forwarded_as_it_came(extra: dict[str, Any]) -> None:
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    body = _body(id="c", inputs=[_tensor("x", x)], **extra)
    request = InferRequest.decode(body)
    for binary in (True, False):  # JSON bodies are the same to either kind of upstream
        assert request.upstream_body(binary) == (body, None)


def test_nested_data_is_converted_at_once_and_forwarded_flat() -> None:
    body = _body(inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[1, 2]]}])
    request = InferRequest.decode(body)
    assert request.meta["x"] is request.arrays()["x"]  # the numpy path: arrays are the meta
    assert request.upstream_body()[0] is body


def test_rows_and_first_row() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    request = InferRequest.of_arrays({"x": x, "y": np.zeros((3, 5), np.float32)}, id="a")
    assert request.id == "a" and request.outputs is None
    assert request.rows() == 3
    first = request.first_row(2)
    assert first is not None
    np.testing.assert_array_equal(first, [0, 1])
    assert request.first_row(5) is None  # only the first input is watched for drift
    assert InferRequest.of_arrays({"x": np.zeros(4, np.float32)}).first_row(4) is None  # 1-D
    assert InferRequest.of_arrays({"x": np.zeros((0, 2), np.float32)}).first_row(2) is None
    assert InferRequest.of_arrays({"x": np.array(3, np.float32)}).rows() == 1  # 0-d
    deferred = InferRequest.decode(_body(inputs=[_tensor("x", x)]))
    assert deferred.rows() == 3
    row = deferred.first_row(2)
    assert row is not None and row.dtype == np.float32
    np.testing.assert_array_equal(row, [0, 1])


@settings(max_examples=400, deadline=None)
@given(tensor_docs())
def test_decoding_agrees_with_the_numpy_path(doc: dict[str, Any]) -> None:
    body = json.dumps({"inputs": [doc]}).encode()  # stdlib: integers beyond 64 bits too
    doc = orjson.loads(body)["inputs"][0]  # the reference reads what the decoder reads
    with np.errstate(over="ignore"):  # FP32 beyond its range: inf on both paths
        try:
            _, reference, _ = tensor_from_item(doc, "inputs[0]", None, 0)
        except InvalidInput as exc:
            with pytest.raises(InvalidInput) as refused:
                InferRequest.decode(body)
            assert str(refused.value) == str(exc)  # numpy's error, word for word
            return
        request = InferRequest.decode(body)
        array = request.arrays()["x"]
    assert array.dtype == reference.dtype
    assert array.shape == reference.shape == request.meta["x"].shape
    assert request.meta["x"].dtype == reference.dtype
    np.testing.assert_array_equal(array, reference)
    assert request.rows() == (reference.shape[0] if reference.ndim else 1)
    if reference.dtype.kind == "O":  # BYTES: forwarded as text, so numbers become text
        forwardable = all(isinstance(v, bytes) for v in reference.flat)
    else:  # JSON has no inf
        forwardable = reference.dtype.kind != "f" or bool(np.isfinite(reference).all())
    if forwardable:
        with np.errstate(over="ignore"):
            again = InferRequest.decode(request.upstream_body()[0]).arrays()["x"]
        assert again.dtype == reference.dtype
        np.testing.assert_array_equal(again, reference)


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]},  # wrong dtype
        {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]},  # wrong rank
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},  # unknown name
    ],
)
def test_checking_meta_gives_numpys_errors(doc: dict[str, Any]) -> None:
    specs = [TensorSpec("x", "FP32", (-1, 2))]
    request = InferRequest.decode(_body(inputs=[doc]))
    assert request.upstream_body() is not None
    _, array, _ = tensor_from_item(doc, "inputs[0]", None, 0)
    with pytest.raises(InvalidInput) as reference:
        check_inputs({doc["name"]: array}, specs)
    with pytest.raises(InvalidInput) as from_meta:
        check_inputs(request.meta, specs)
    assert str(from_meta.value) == str(reference.value)


# --- InferResponse ------------------------------------------------------------------------


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.bool_]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        # JSON has no inf/NaN: orjson writes null, which decodes back as NaN.
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_response_round_trips_through_json(array: np.ndarray) -> None:
    body, header = encode_infer_response(
        {"out": array}, model_name="m", model_version="2", request_id="i"
    )
    assert header is None
    answer = InferResponse.of_upstream(body)
    assert [item["name"] for item in answer.items()] == ["out"]
    assert answer.arrays()["out"].dtype == array.dtype
    np.testing.assert_array_equal(answer.arrays()["out"], array)
    local = InferResponse.of_arrays({"out": array})
    assert local.items()[0]["datatype"] == answer.items()[0]["datatype"]
    assert local.items()[0]["shape"] == answer.items()[0]["shape"] == list(array.shape)
    assert _same(answer.prediction(), local.prediction())


def test_upstream_answer_is_kept_as_it_came_until_arrays_are_asked_for() -> None:
    items = [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 1, 0]},
    ]
    answer = InferResponse.of_upstream(orjson.dumps({"model_name": "m", "outputs": items}))
    assert answer.items() == items
    assert answer.prediction() == 1.0
    arrays = answer.arrays()
    assert answer.arrays() is arrays  # converted once
    assert arrays["label"].dtype == np.int64 and arrays["probabilities"].dtype == np.float32


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{nope", "invalid JSON"),
        (b"[]", "no 'outputs' list"),
        (b'{"outputs": 3}', "no 'outputs' list"),
        (b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}', r"outputs\[0\]"),
        (b'{"outputs": [{"name": "y", "datatype": "FP99", "shape": [1], "data": [1]}]}', "V2"),
    ],
)
def test_malformed_upstream_answers_are_upstream_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(UpstreamError, match=fragment):
        InferResponse.of_upstream(body)


def test_an_output_that_does_not_hold_fails_arrays_but_not_the_prediction() -> None:
    bad = {"name": "label", "datatype": "INT64", "shape": [3], "data": [1, 2]}
    answer = InferResponse.of_upstream(orjson.dumps({"outputs": [bad]}))
    assert is_missing(answer.prediction())  # nothing to keep, and no error for the windows
    with pytest.raises(UpstreamError, match="needs 3 values"):
        answer.arrays()


def test_prediction_reads_label_then_prediction_then_argmax() -> None:
    label = {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 1]}
    score = {"name": "prediction", "datatype": "FP32", "shape": [1], "data": [0.1]}
    probs = {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 0.7,
             0.2, 0.9, 0.05, 0.05]}  # fmt: skip

    def read(*items: dict[str, Any]) -> tuple[Predicted, Predicted]:
        answer = InferResponse.of_upstream(orjson.dumps({"outputs": list(items)}))
        return answer.prediction(), InferResponse.of_arrays(answer.arrays()).prediction()

    assert read(probs, score, label) == (3.0, 3.0)
    assert read(probs, score) == (float(np.float32(0.1)),) * 2
    assert read(probs) == (1.0, 1.0)  # row 0's argmax
    assert all(is_missing(p) for p in read())  # no outputs: no prediction
    text = {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]}
    assert read(text) == ("cat", "cat")  # a class name
    column = {"name": "predict", "datatype": "INT64", "shape": [2, 1], "data": [1, 0]}
    assert read(column) == (1.0, 1.0)  # an [N, 1] column is its value, not argmax 0


_OUTPUT_NAMES = st.sampled_from(["label", "prediction", "probabilities", "score"])


@st.composite
def output_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    """V2 output objects with label / prediction / probabilities-like names, mostly
    holding, sometimes not (strings in numbers, BYTES, empty, out of range)."""
    outputs = []
    for name in draw(st.lists(_OUTPUT_NAMES, max_size=3, unique=True)):
        shape = draw(st.sampled_from([[1], [2], [1, 3], [2, 2], [0], [0, 2], [], [2, 1, 2]]))
        count = int(np.prod(shape)) if shape else 1
        datatype = draw(
            st.sampled_from(["INT64", "INT8", "UINT8", "FP32", "FP64", "FP16", "BYTES", "BOOL"])
        )
        values = st.one_of(
            st.integers(-5, 5),
            st.integers(-(2**70), 2**70),
            st.booleans(),
            st.floats(-1e3, 1e3, width=32),
            st.floats(-1.0, 1.0),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=2),
        )
        data = draw(st.lists(values, min_size=count, max_size=count))
        outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    return outputs


def _converts(item: dict[str, Any]) -> bool:
    try:
        tensors_from_outputs([item])
    except UpstreamError:
        return False
    return True


def _deciding(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    for wanted in ("label", "prediction"):
        for item in items:
            if item["name"] == wanted:
                return item
    return items[0] if items else None


def _same(a: Predicted, b: Predicted) -> bool:
    return a == b or (is_missing(a) and is_missing(b))


@settings(max_examples=500, deadline=None)
@given(output_lists())
def test_prediction_from_items_is_the_prediction_from_arrays(
    items: list[dict[str, Any]],
) -> None:
    body = json.dumps({"outputs": items}).encode()  # stdlib: integers beyond 64 bits too
    items = orjson.loads(body)["outputs"]  # the reference reads what the decoder reads
    with np.errstate(over="ignore"):  # numbers beyond FP32/FP16: inf on both paths
        kept = [item for item in items if _converts(item)]
        kept_body = json.dumps({"outputs": kept}).encode()
        from_items = InferResponse.of_upstream(kept_body).prediction()
        from_arrays = InferResponse.of_arrays(tensors_from_outputs(kept)).prediction()
        assert _same(from_items, from_arrays), (from_items, from_arrays)
        # With outputs that do not hold: the deciding one's prediction, NaN if it does not.
        whole = InferResponse.of_upstream(body).prediction()
        deciding = _deciding(items)
        if deciding is None or not _converts(deciding):
            assert is_missing(whole)
        else:
            reference = InferResponse.of_arrays(tensors_from_outputs([deciding])).prediction()
            assert _same(whole, reference), (whole, reference)
