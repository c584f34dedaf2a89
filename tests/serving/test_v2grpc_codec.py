"""serving/v2grpc/codec.py: gRPC messages <-> requests and responses, round trips."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.codec import tensors_from_outputs
from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.tensors import V2_TO_NUMPY, v2_datatype
from rollguard.serving.v2grpc import pb
from rollguard.serving.v2grpc.codec import (
    CONTENTS,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

NUMERIC = [d for d in V2_TO_NUMPY if d != "BYTES"]


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        values = draw(st.lists(st.binary(max_size=6), min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))  # fmt: skip
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    elements = None
    if dtype.kind == "f":
        width: Literal[16, 32, 64] = (
            16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64
        )
        elements = st.floats(width=width, allow_nan=False)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _message(arrays: dict[str, np.ndarray], *, typed: bool) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", id="r")
    for name, array in arrays.items():
        tensor = message.inputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        if typed:
            getattr(tensor.contents, CONTENTS[v2_datatype(array)]).extend(array.ravel().tolist())
        elif array.dtype.kind == "O":
            message.raw_input_contents.append(
                b"".join(len(v).to_bytes(4, "little") + v for v in array.ravel())
            )
        else:
            message.raw_input_contents.append(array.tobytes())
    return message


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.booleans())
def test_a_request_decodes_to_its_arrays_raw_or_typed(
    arrays: list[np.ndarray], typed: bool
) -> None:
    named = {f"t{i}": a for i, a in enumerate(arrays)}
    typed = typed and all(v2_datatype(a) != "FP16" for a in arrays)
    decoded = decode_request(pb.ModelInferRequest.FromString(_message(named, typed=typed)
                                                              .SerializeToString()))  # fmt: skip
    got = decoded.arrays()
    assert list(got) == list(named)
    for name, array in named.items():
        assert got[name].shape == array.shape and got[name].dtype == array.dtype
        assert got[name].tolist() == array.tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3))
def test_a_rest_request_goes_to_a_grpc_upstream_and_back_to_rest(arrays: list[np.ndarray]) -> None:
    """REST -> ModelInferRequest -> (a gRPC client's request) -> REST body: the same
    tensors, id, parameters and requested outputs all the way."""
    named = {f"t{i}": a for i, a in enumerate(arrays)}
    doc: dict[str, Any] = {
        "id": "abc",
        "parameters": {"content_type": "np", "n": 3, "flag": True, "x": 0.5},
        "inputs": [
            {
                "name": n,
                "datatype": v2_datatype(a),
                "shape": list(a.shape),
                "parameters": {"binary_data_size": 0},
            }
            for n, a in named.items()
        ],
        "outputs": [{"name": "out", "parameters": {"binary_data": True, "classification": 2}}],
    }
    chunks = []
    for item, array in zip(doc["inputs"], named.values(), strict=True):
        raw = (
            b"".join(len(v).to_bytes(4, "little") + v for v in array.ravel())
            if array.dtype.kind == "O"
            else array.tobytes()
        )
        item["parameters"]["binary_data_size"] = len(raw)
        chunks.append(raw)
    head = orjson.dumps(doc)
    rest = InferRequest.decode(head + b"".join(chunks), str(len(head)))
    sent = pb.ModelInferRequest.FromString(encode_request(rest, "up", "7"))
    assert (sent.model_name, sent.model_version, sent.id) == ("up", "7", "abc")
    assert dict(sent.parameters)["n"].int64_param == 3
    assert dict(sent.parameters)["x"].double_param == 0.5
    assert [o.name for o in sent.outputs] == ["out"]
    assert set(sent.outputs[0].parameters) == {"classification"}  # the REST-only one dropped

    relayed = decode_request(sent)
    body, length = relayed.upstream_body(binary=True)
    again = InferRequest.decode(body, str(length))
    assert again.id == "abc" and again.outputs == ["out"]
    assert again.document is not None
    assert again.document["parameters"] == doc["parameters"]
    for name, array in named.items():
        assert again.arrays()[name].tolist() == array.tolist()


def test_json_upstream_body_and_bytes_text() -> None:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="s", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"ok", "\u00e9".encode()])
    body, length = decode_request(message).upstream_body(binary=False)
    assert length is None
    assert orjson.loads(body)["inputs"][0]["data"] == ["ok", "\u00e9"]
    tensor.contents.bytes_contents[1] = b"\xff"
    with pytest.raises(InvalidInput, match="not UTF-8"):
        decode_request(message).upstream_body(binary=False)


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda m: None, "non-empty list of tensors"),
        (lambda m: m.inputs.add(name="x", datatype="FP32", shape=[2]), "needs 2 values"),
        (lambda m: m.inputs.add(name="x", datatype="NOPE", shape=[1]), "unknown datatype"),
        (lambda m: m.inputs.add(name="x", datatype="FP32", shape=[-1]), "non-negative"),
        (lambda m: m.inputs.add(name="x", datatype="FP16", shape=[1]), "raw_input_contents"),
    ],
)
def test_bad_requests_say_what_is_wrong(build: Any, says: str) -> None:
    message = pb.ModelInferRequest(model_name="m")
    build(message)
    with pytest.raises(InvalidInput, match=says):
        decode_request(message)


def test_raw_contents_must_fit_and_narrow_ints_must_fit() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    message.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(InvalidInput, match="8 raw bytes do not hold shape"):
        decode_request(message)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(InvalidInput, match="beyond its range"):
        decode_request(message)


def test_responses_from_arrays_upstream_items_and_grpc() -> None:
    arrays: dict[str, np.ndarray] = {
        "label": np.array([1, 0], dtype=np.int64),
        "p": np.eye(2, dtype=np.float32),
    }
    out = encode_response(
        InferResponse.of_arrays(arrays),
        requested=["p"],
        declared=(),
        model_name="m",
        model_version="2",
        request_id="q",
    )
    assert [o.name for o in out.outputs] == ["p"] and out.model_version == "2" and out.id == "q"
    assert np.frombuffer(out.raw_output_contents[0], np.float32).tolist() == [1, 0, 0, 1]

    # An HTTP upstream's JSON answer, with its parameters: raw contents, parameters kept.
    upstream = orjson.dumps({"parameters": {"note": "x"}, "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}]})  # fmt: skip
    out = encode_response(
        InferResponse.of_upstream(upstream),
        requested=None,
        declared=(),
        model_name="m",
        model_version="2",
        request_id=None,
    )
    assert out.parameters["note"].string_param == "x"
    assert np.frombuffer(out.raw_output_contents[0], np.int64).tolist() == [1, 0]

    # A gRPC upstream's answer reads as arrays for the windows and goes back as it came.
    grpc_answer = decode_response(out.SerializeToString())
    assert tensors_from_outputs(grpc_answer.items(), grpc_answer.binary)["label"].tolist() == [1, 0]
    again = encode_response(
        grpc_answer, requested=None, declared=(), model_name="n", model_version="3",
        request_id="z",
    )  # fmt: skip
    assert (again.model_name, again.model_version, again.id) == ("n", "3", "z")
    assert list(again.raw_output_contents) == list(out.raw_output_contents)


def test_an_upstream_answer_that_does_not_hold_is_its_error() -> None:
    with pytest.raises(UpstreamError):
        decode_response(b"\xff\xff not a message")
    bad = pb.ModelInferResponse()
    bad.outputs.add(name="y", datatype="FP32", shape=[1])
    bad.outputs.add(name="z", datatype="FP32", shape=[1])
    bad.raw_output_contents.append(b"\0" * 4)
    with pytest.raises(UpstreamError, match="raw_output_contents has 1 entries for 2"):
        decode_response(bad.SerializeToString())
