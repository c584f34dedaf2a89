"""V2 gRPC messages <-> the one request and response types (serving/messages.py).

The gRPC twin of serving/codec.py. A `ModelInferRequest` becomes a `GrpcInferRequest`:
its inputs as numpy arrays (raw contents viewed in place, typed contents converted),
and the message itself, kept so that a gRPC upstream gets it as it came and an HTTP
upstream gets the V2 REST body that says the same (id, parameters, requested outputs,
each tensor's parameters, binary tensors when the upstream takes them). A gRPC
upstream's `ModelInferResponse` becomes a `GrpcInferResponse` that REST clients read as
any upstream's answer and gRPC clients get back as it came.

Raw contents are laid out as the binary tensor extension lays out its parts: elements
flattened row-major, little-endian, BYTES elements each a 4-byte length then the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from google.protobuf.message import DecodeError

from rollguard.serving.codec import (
    _binary_bytes,
    _bytes_from_binary,
    binary_size,
    select_items,
    select_outputs,
    tensor_from_item,
)
from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.tensors import V2_TO_NUMPY, Tensors, TensorSpec, v2_datatype
from rollguard.serving.v2grpc import pb

# The typed-contents field of each datatype; FP16 has none (raw contents only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_NARROW = frozenset({"INT8", "INT16", "UINT8", "UINT16"})  # carried in 32-bit fields
_INT64 = (-(2**63), 2**63 - 1)
# REST-only parameters of the binary tensor extension: they say how a REST body is laid
# out, which a gRPC message has no use for (and a REST body gets anew).
_REST_ONLY = frozenset({"binary_data", "binary_data_size", "binary_data_output"})


class GrpcInferRequest(InferRequest):
    """A request that came as a `ModelInferRequest`; `message` is that message."""

    __slots__ = ("message",)

    def __init__(self, message: pb.ModelInferRequest, arrays: Tensors) -> None:
        outputs = [o.name for o in message.outputs] or None
        super().__init__(arrays=arrays, id=message.id or None, outputs=outputs)
        self.message = message

    def upstream_body(self, binary: bool = True) -> tuple[bytes, int | None]:
        """The V2 REST body saying what the message says, for an HTTP upstream: binary
        tensors (the raw contents as they came) when it takes them, else JSON data."""
        message = self.message
        doc: dict[str, Any] = {}
        if message.id:
            doc["id"] = message.id
        if message.parameters:
            doc["parameters"] = parameters_json(message.parameters)
        arrays = self.arrays()
        raws = message.raw_input_contents
        chunks: list[bytes] = []
        inputs = []
        for i, tensor in enumerate(message.inputs):
            item: dict[str, Any] = {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
            }
            params = parameters_json(tensor.parameters)
            array = arrays[tensor.name]
            if binary:
                raw = raws[i] if raws else _binary_bytes(array)
                params["binary_data_size"] = len(raw)
                chunks.append(raw)
            else:
                item["data"] = _json_data(array, tensor.name)
            if params:
                item["parameters"] = params
            inputs.append(item)
        doc["inputs"] = inputs
        if message.outputs:
            doc["outputs"] = [_requested_json(o) for o in message.outputs]
        head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        if not chunks:
            return head, None
        return b"".join([head, *chunks]), len(head)


class GrpcInferResponse(InferResponse):
    """A gRPC upstream's answer; `message` is its `ModelInferResponse`."""

    __slots__ = ("message",)

    def __init__(
        self,
        message: pb.ModelInferResponse,
        items: list[dict[str, Any]],
        rest: dict[str, Any],
        binary: memoryview | None,
    ) -> None:
        super().__init__(items=items, upstream=rest, binary=binary)
        self.message = message


# --- requests ----------------------------------------------------------------------------


def decode_request(message: pb.ModelInferRequest) -> GrpcInferRequest:
    """A client's request, its inputs checked and viewed as arrays; InvalidInput naming
    the problem as the REST codec names it."""
    inputs = message.inputs
    if not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    raws = message.raw_input_contents
    if raws and len(raws) != len(inputs):
        raise InvalidInput(f"raw_input_contents has {len(raws)} entries for {len(inputs)} inputs")
    arrays: Tensors = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        array = _input_array(tensor, raws[i] if raws else None, f"inputs[{i}]")
        if name in arrays:
            raise InvalidInput(f"input '{name}' given twice")
        arrays[name] = array
    for requested in message.outputs:
        if not requested.name:
            raise InvalidInput("each requested output needs a non-empty 'name'")
    return GrpcInferRequest(message, arrays)


def _input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str
) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input '{name}': both raw_input_contents and contents given")
        if datatype == "BYTES":
            return _bytes_from_binary(memoryview(raw), count, name).reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input '{name}': {len(raw)} raw bytes do not hold shape {shape} of {datatype}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must come as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} needs {count} values, contents has {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)  # filled, not np.array(list): that may nest
        array[:] = list(values)
        return array.reshape(shape)
    if datatype in _NARROW:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input '{name}': {datatype} contents hold values beyond its range")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_request(request: InferRequest, model_name: str, model_version: str) -> bytes:
    """The serialised `ModelInferRequest` a gRPC upstream gets for `request`, naming the
    upstream's own model and version: a gRPC client's message as it came, or a REST
    request's document (id, parameters, requested outputs, tensor parameters) with its
    inputs as raw contents. InvalidInput for a parameter gRPC cannot carry."""
    if isinstance(request, GrpcInferRequest):
        message = request.message
        saved = message.model_name, message.model_version
        message.model_name, message.model_version = model_name, model_version
        try:  # no await in here: nothing else sees the message renamed
            return message.SerializeToString()
        finally:
            message.model_name, message.model_version = saved
    out = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if request.id:
        out.id = request.id
    arrays = request.arrays()
    doc = request.document or {}
    _set_parameters(out.parameters, doc.get("parameters"))
    items = doc.get("inputs") or [{"name": name} for name in arrays]
    for item in items:
        name = item["name"]
        array = arrays[name]
        tensor = out.inputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        _set_parameters(tensor.parameters, item.get("parameters"))
        out.raw_input_contents.append(_binary_bytes(array))
    for requested in doc.get("outputs") or ():
        wanted = out.outputs.add(name=requested["name"])
        _set_parameters(wanted.parameters, requested.get("parameters"))
    return out.SerializeToString()


# --- responses ---------------------------------------------------------------------------


def decode_response(body: bytes) -> GrpcInferResponse:
    """A gRPC upstream's serialised answer, checked for structure; UpstreamError otherwise."""
    try:
        message = pb.ModelInferResponse.FromString(body)
    except DecodeError as exc:
        raise UpstreamError(f"upstream answered a message that does not parse: {exc}") from None
    return response_of_message(message)


def response_of_message(message: pb.ModelInferResponse) -> GrpcInferResponse:
    """A gRPC upstream's answer as output objects (raw contents sized, as binary tensors
    are) and the bytes that follow them; UpstreamError when it does not hold."""
    outputs = message.outputs
    raws = message.raw_output_contents
    if raws and len(raws) != len(outputs):
        raise UpstreamError(
            f"upstream response: raw_output_contents has {len(raws)} entries for "
            f"{len(outputs)} outputs"
        )
    items: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for i, tensor in enumerate(outputs):
        datatype = tensor.datatype
        if not tensor.name or datatype not in V2_TO_NUMPY or any(d < 0 for d in tensor.shape):
            raise UpstreamError(
                f"upstream response: outputs[{i}] needs a name, a V2 datatype and a shape"
            )
        item: dict[str, Any] = {"name": tensor.name, "datatype": datatype,
                                "shape": list(tensor.shape)}  # fmt: skip
        params = parameters_json(tensor.parameters)
        if raws:
            params["binary_data_size"] = len(raws[i])
            chunks.append(raws[i])
        else:
            field = CONTENTS.get(datatype)
            if field is None:
                raise UpstreamError(f"upstream response: outputs[{i}] {datatype} has no contents")
            values = getattr(tensor.contents, field)
            if datatype == "BYTES":
                item["data"] = [v.decode(errors="replace") for v in values]
            else:
                item["data"] = list(values)
        if params:
            item["parameters"] = params
        items.append(item)
    rest: dict[str, Any] = {}
    if message.parameters:
        rest["parameters"] = parameters_json(message.parameters)
    binary = memoryview(b"".join(chunks)) if chunks else None
    return GrpcInferResponse(message, items, rest, binary)


def encode_response(
    response: InferResponse,
    *,
    requested: Sequence[str] | None,
    declared: Sequence[TensorSpec],
    model_name: str,
    model_version: str,
    request_id: str | None,
) -> pb.ModelInferResponse:
    """A version's answer as the `ModelInferResponse` a gRPC client gets: the requested
    outputs (all, in declared order, when none were named) as raw contents, under this
    gateway's model name, the version that answered and the client's request id. A gRPC
    upstream's answer goes as it came; an HTTP upstream's keeps its parameters, and its
    binary outputs are passed on unread."""
    if isinstance(response, GrpcInferResponse):
        out = response.message
    else:
        out = pb.ModelInferResponse()
        if response.upstream is not None:
            _items_into(out, response, requested, declared)
        else:
            for name, array in select_outputs(response.arrays(), requested, declared).items():
                out.outputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
                out.raw_output_contents.append(_binary_bytes(array))
    out.model_name = model_name
    out.model_version = model_version
    out.id = request_id or ""
    return out


def _items_into(
    out: pb.ModelInferResponse,
    response: InferResponse,
    requested: Sequence[str] | None,
    declared: Sequence[TensorSpec],
) -> None:
    items = response.items()
    binary = response.binary
    offsets: dict[str, int] = {}
    offset = 0
    for item in items:
        size = binary_size(item)
        if size is not None:
            offsets[item["name"]] = offset
            offset += size
    try:
        for item in select_items(items, requested, declared):
            name = item["name"]
            size = binary_size(item)
            if size is not None:
                assert binary is not None  # response_outputs checked the sizes against it
                raw = bytes(binary[offsets[name] : offsets[name] + size])
            else:
                raw = _binary_bytes(tensor_from_item(item, name, None, 0)[1])
            tensor = out.outputs.add(name=name, datatype=item["datatype"], shape=item["shape"])
            params = item.get("parameters")
            if isinstance(params, dict):
                _set_parameters(tensor.parameters, params)
            out.raw_output_contents.append(raw)
    except InvalidInput as exc:
        raise UpstreamError(f"upstream response: {exc}") from None
    rest = response.upstream or {}
    _set_parameters(out.parameters, rest.get("parameters"))


# --- parameters --------------------------------------------------------------------------


def parameters_json(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameter map as V2 JSON `parameters` (an unset value is left out)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def _set_parameters(target: Any, params: Any) -> None:
    """Fill a message's parameter map from V2 JSON `parameters`, leaving out the binary
    extension's own; InvalidInput for a value gRPC cannot carry."""
    if not isinstance(params, dict):
        return
    for key, value in params.items():
        if key in _REST_ONLY:
            continue
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            slot.int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            slot.uint64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            del target[key]
            raise InvalidInput(
                f"parameter {key!r}: a {type(value).__name__} cannot go to a gRPC upstream "
                "(a boolean, integer, number or string can)"
            )


def _requested_json(requested: pb.ModelInferRequest.InferRequestedOutputTensor) -> dict[str, Any]:
    item: dict[str, Any] = {"name": requested.name}
    params = parameters_json(requested.parameters)
    if params:
        item["parameters"] = params
    return item


def _json_data(array: np.ndarray, name: str) -> Any:
    """An input's elements as JSON `data`: BYTES as text, which JSON needs to be UTF-8."""
    if array.dtype.kind != "O":
        return array.ravel()
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"input '{name}': BYTES that are not UTF-8 text cannot go to an upstream that "
            "takes JSON only"
        ) from None
