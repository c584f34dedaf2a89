"""Open Inference Protocol (V2) JSON and binary-tensor codec: bodies <-> named numpy arrays.

The one place that knows the wire format; the gateway's handlers and the HTTP upstream
runner both call it. Follows kserve/open-inference-protocol `inference_rest.md` and the
binary tensor data extension that tritonclient uses (Inference-Header-Content-Length).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from rollguard.serving.errors import InvalidInput, UpstreamError
from rollguard.serving.tensors import V2_TO_NUMPY, Tensors, TensorSpec, v2_datatype

BINARY_HEADER = "Inference-Header-Content-Length"


def parse_json(body: bytes | memoryview) -> Any:
    """A JSON document; InvalidInput naming the problem when the body is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def tensor_from_item(
    item: Any, where: str, binary: memoryview | None, offset: int
) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict):
        raise InvalidInput(f"{where}: each tensor must be a JSON object")
    name = item.get("name")
    datatype = item.get("datatype")
    shape = item.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    if datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    # `type(d) is int` also refuses bools; a plain loop is cheaper than all(<generator>).
    if type(shape) is not list:
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    for d in shape:
        if type(d) is not int or d < 0:
            raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    dtype = V2_TO_NUMPY[datatype]
    count = math.prod(shape)
    params = item.get("parameters")
    size = params.get("binary_data_size") if params and isinstance(params, dict) else None
    if size is not None:
        if binary is None or not isinstance(size, int) or offset + size > len(binary):
            raise InvalidInput(f"input '{name}': binary_data_size exceeds the binary payload")
        chunk = binary[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            array = _bytes_from_binary(chunk, count, name)
        else:
            if size != count * dtype.itemsize:
                raise InvalidInput(
                    f"input '{name}': {size} binary bytes do not hold shape {shape} of {datatype}"
                )
            array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        return name, array, offset
    if "data" not in item:
        raise InvalidInput(f"input '{name}': missing 'data'")
    data = item["data"]
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).reshape(-1)
            array = np.array([v.encode() if isinstance(v, str) else v for v in flat], dtype=object)
        else:
            with np.errstate(over="ignore"):  # refused just below, not warned about
                array = np.asarray(data, dtype=dtype)
            if array.dtype.kind in "iu" and array.size and np.asarray(data).dtype.kind == "f":
                raise InvalidInput(f"input '{name}': {datatype} data holds non-integer values")
            # JSON has no NaN or infinity: one here is a null or a number beyond the dtype.
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidInput(
                    f"input '{name}': {datatype} data holds null or a value beyond its range"
                )
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data does not fit {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} needs {count} values, data has {array.size}"
        )
    return name, array.reshape(shape), offset


def _bytes_from_binary(chunk: memoryview, count: int, name: str) -> np.ndarray:
    # BYTES elements are each a 4-byte little-endian length then the bytes.
    out: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input '{name}': truncated BYTES element")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        out.append(bytes(chunk[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if len(out) != count:
        raise InvalidInput(f"input '{name}': {len(out)} BYTES elements, shape needs {count}")
    return np.array(out, dtype=object)


def select_outputs(
    outputs: Tensors, requested: Sequence[str] | None, declared: Sequence[TensorSpec] = ()
) -> Tensors:
    """The requested outputs in request order (all, in declared order, when none requested)."""
    if requested is None:
        if len(declared) == len(outputs):  # the usual case: already in declared order
            for spec, name in zip(declared, outputs, strict=True):
                if spec.name != name:
                    break
            else:
                return outputs
        order = [s.name for s in declared if s.name in outputs]
        order += [n for n in outputs if n not in order]
        return {n: outputs[n] for n in order}
    missing = [n for n in requested if n not in outputs]
    if missing:
        raise InvalidInput(f"unknown output(s) {missing}; the model gives {sorted(outputs)}")
    return {n: outputs[n] for n in requested}


def output_item(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = v2_datatype(array)
    flat = array.ravel()  # contiguous, as orjson needs: a view when it already is
    data: Any
    if datatype == "BYTES":
        data = [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    else:
        data = flat
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def encode_infer_response(
    outputs: Tensors,
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    binary_outputs: set[str] | frozenset[str] = frozenset(),
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """A V2 response body; the second value is the JSON header length when binary follows."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        if binary_outputs and ("*" in binary_outputs or name in binary_outputs):
            raw = _binary_bytes(array)
            tensors.append(
                {
                    "name": name,
                    "datatype": v2_datatype(array),
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            chunks.append(raw)
        else:
            tensors.append(output_item(name, array))
    doc["outputs"] = tensors
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def _binary_bytes(array: np.ndarray) -> bytes:
    if v2_datatype(array) == "BYTES":
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()


def encode_infer_request(
    inputs: Tensors, *, request_id: str | None = None, outputs: list[str] | None = None
) -> bytes:
    """A V2 JSON infer request body (what the HTTP upstream runner sends)."""
    doc: dict[str, Any] = {"inputs": [output_item(n, a) for n, a in inputs.items()]}
    if request_id is not None:
        doc["id"] = request_id
    if outputs is not None:
        doc["outputs"] = [{"name": n} for n in outputs]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def response_outputs(body: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An upstream's V2 JSON response as its output tensors (JSON objects) and other fields.

    Checks the structure only (names, datatypes, shapes, data present); the values stay
    JSON until `tensors_from_outputs` converts the ones a caller needs.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"upstream answered with invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UpstreamError("upstream response has no 'outputs' list")
    items = doc.pop("outputs", None)
    if not isinstance(items, list):
        raise UpstreamError("upstream response has no 'outputs' list")
    for i, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item.get("datatype") in V2_TO_NUMPY
            and isinstance(item.get("shape"), list)
            and "data" in item
        ):
            raise UpstreamError(
                f"upstream response: outputs[{i}] needs a name, a V2 datatype, a shape and data"
            )
    return items, doc


def tensors_from_outputs(items: Sequence[dict[str, Any]]) -> Tensors:
    """Numpy arrays for V2 JSON output tensors; UpstreamError when one does not hold."""
    tensors: Tensors = {}
    try:
        for i, item in enumerate(items):
            name, array, _ = tensor_from_item(item, f"outputs[{i}]", None, 0)
            tensors[name] = array
    except InvalidInput as exc:
        raise UpstreamError(f"upstream response: {exc}") from None
    return tensors


def select_items(
    items: Sequence[dict[str, Any]],
    requested: Sequence[str] | None,
    declared: Sequence[TensorSpec] = (),
) -> Sequence[dict[str, Any]]:
    """The requested output objects in request order; all of them, in declared order, when
    none are requested (the ones the manifest does not declare last)."""
    if requested is not None:
        by_name = {item["name"]: item for item in items}
        missing = [n for n in requested if n not in by_name]
        if missing:
            raise InvalidInput(f"unknown output(s) {missing}; the model gives {sorted(by_name)}")
        return [by_name[n] for n in requested]
    if len(declared) == len(items):  # the usual case: already in declared order
        for spec, item in zip(declared, items, strict=True):
            if spec.name != item["name"]:
                break
        else:
            return items
    by_name = {item["name"]: item for item in items}
    ordered = [by_name[s.name] for s in declared if s.name in by_name]
    if len(ordered) != len(by_name):
        known = {s.name for s in declared}
        ordered += [item for item in items if item["name"] not in known]
    return ordered


def encode_items_response(
    items: Sequence[dict[str, Any]],
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
) -> bytes:
    """A V2 JSON response body from output objects (numpy `data` is serialised as is)."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = items
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
