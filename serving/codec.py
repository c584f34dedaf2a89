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
from rollguard.serving.tensors import NUMPY_TO_V2, V2_TO_NUMPY, Tensors, TensorSpec, v2_datatype

BINARY_HEADER = "Inference-Header-Content-Length"
# Without object: v2_datatype decides strings and objects (BYTES) by their dtype's kind.
_NUMPY_TO_V2 = {dtype: name for dtype, name in NUMPY_TO_V2.items() if dtype.kind not in "OUS"}


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
            array = _bytes_from_binary(chunk, count, name).reshape(shape)
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
            wrong = next((v for v in flat if not isinstance(v, str)), _NONE_WRONG)
            if wrong is not _NONE_WRONG:  # null, a number, a boolean, an object
                raise InvalidInput(
                    f"input '{name}': BYTES elements are strings, the data holds "
                    f"{type(wrong).__name__ if wrong is not None else 'null'}"
                )
            array = np.array([v.encode() for v in flat], dtype=object)
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


_NONE_WRONG = object()  # no element of the wrong type was found


def _bytes_from_binary(chunk: memoryview, count: int, name: str) -> np.ndarray:
    # BYTES elements are each a 4-byte little-endian length then the bytes.
    out: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input '{name}': truncated BYTES element")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        if pos + 4 + n > len(chunk):
            raise InvalidInput(
                f"input '{name}': a BYTES element of {n} bytes runs past its tensor's "
                f"{len(chunk)} binary bytes"
            )
        out.append(bytes(chunk[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if len(out) != count:
        raise InvalidInput(f"input '{name}': {len(out)} BYTES elements, shape needs {count}")
    array = np.empty(count, dtype=object)  # filled, not np.array(out): that may nest
    array[:] = out
    return array


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
    # v2_datatype's table first, inline: every output of every answer comes here.
    datatype = _NUMPY_TO_V2.get(array.dtype) or v2_datatype(array)
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


def json_document(doc: Mapping[str, Any], arrays: Tensors) -> bytes:
    """A V2 request document with its binary tensors written as JSON `data` (for an
    upstream that takes no binary extension): everything else as it was, each tensor's
    other parameters included. InvalidInput for BYTES that are not UTF-8 text, which
    JSON cannot carry."""
    inputs = []
    for item in doc["inputs"]:
        params = item.get("parameters")
        if isinstance(params, dict) and "binary_data_size" in params:
            item = {k: v for k, v in item.items() if k != "parameters"}
            rest = {k: v for k, v in params.items() if k != "binary_data_size"}
            if rest:
                item["parameters"] = rest
            array = arrays[item["name"]]
            if array.dtype.kind == "O":
                try:
                    item["data"] = [
                        v.decode("utf-8") if isinstance(v, bytes) else v for v in array.ravel()
                    ]
                except UnicodeDecodeError:
                    raise InvalidInput(
                        f"input '{item['name']}': BYTES that are not UTF-8 text cannot go "
                        "to an upstream that takes JSON only"
                    ) from None
            else:
                item["data"] = array.ravel()
        inputs.append(item)
    return orjson.dumps({**doc, "inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)


def response_outputs(
    body: bytes, binary_header: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An upstream's V2 response as its output tensors (JSON objects) and other fields.

    Checks the structure only (names, datatypes, shapes, data or a binary size present);
    the values stay as they came until `tensors_from_outputs` converts the ones a caller
    needs. With `binary_header` (the answer's Inference-Header-Content-Length), the JSON
    is that long and binary tensors follow it, `binary_data_size` bytes each in order.
    """
    head: bytes | memoryview = body
    tail_size = 0
    if binary_header is not None:
        try:
            n = int(binary_header)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise UpstreamError(
                f"upstream answered {BINARY_HEADER} {binary_header!r} for {len(body)} bytes"
            )
        head, tail_size = memoryview(body)[:n], len(body) - n
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"upstream answered with invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UpstreamError("upstream response has no 'outputs' list")
    items = doc.pop("outputs", None)
    if not isinstance(items, list):
        raise UpstreamError("upstream response has no 'outputs' list")
    binary = 0
    for i, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item.get("datatype") in V2_TO_NUMPY
            and isinstance(item.get("shape"), list)
        ):
            raise UpstreamError(
                f"upstream response: outputs[{i}] needs a name, a V2 datatype, a shape and data"
            )
        size = binary_size(item)
        if size is None:
            if "data" not in item:
                raise UpstreamError(
                    f"upstream response: outputs[{i}] needs a name, a V2 datatype, a shape and data"
                )
        elif type(size) is not int or size < 0:
            raise UpstreamError(f"upstream response: outputs[{i}] has a bad binary_data_size")
        else:
            binary += size
    if binary > tail_size:
        raise UpstreamError(
            f"upstream response: binary outputs of {binary} bytes, {tail_size} bytes follow"
        )
    return items, doc


def binary_size(item: Mapping[str, Any]) -> Any:
    """An output or input object's `binary_data_size` parameter (None: its data is JSON)."""
    params = item.get("parameters")
    return params.get("binary_data_size") if type(params) is dict else None


def tensors_from_outputs(
    items: Sequence[dict[str, Any]], binary: memoryview | None = None
) -> Tensors:
    """Numpy arrays for V2 output tensors (JSON, or sized parts of `binary` in order);
    UpstreamError when one does not hold."""
    tensors: Tensors = {}
    offset = 0
    try:
        for i, item in enumerate(items):
            name, array, offset = tensor_from_item(item, f"outputs[{i}]", binary, offset)
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


def relay_response(
    items: Sequence[dict[str, Any]],
    rest: Mapping[str, Any],
    binary: memoryview | None,
    *,
    requested: Sequence[str] | None,
    binary_outputs: frozenset[str],
    model_name: str,
    model_version: str,
    request_id: str | None,
) -> tuple[bytes, int | None]:
    """An upstream's answer relayed to the client as it came: its other fields (e.g.
    `parameters`) and each output's parameters kept, each output's binary part passed on
    unread, under this gateway's model name, version and the client's request id. An
    output goes as binary when the client asked for it so, as JSON otherwise, converted
    only when the upstream answered it the other way (one that takes no binary
    requests answers JSON). The second value is the JSON length when binary follows."""
    offsets: dict[str, int] = {}
    offset = 0
    for item in items:
        size = binary_size(item)
        if size is not None:
            offsets[item["name"]] = offset
            offset += size
    out: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    try:
        for item in select_items(items, requested):
            name = item["name"]
            wanted = bool(binary_outputs) and ("*" in binary_outputs or name in binary_outputs)
            size = binary_size(item)
            if size is not None and wanted:
                assert binary is not None  # response_outputs checked the sizes against it
                out.append(item)
                chunks.append(binary[offsets[name] : offsets[name] + size])
            elif size is not None:
                _, array, _ = tensor_from_item(item, name, binary, offsets[name])
                params = {k: v for k, v in item["parameters"].items() if k != "binary_data_size"}
                json_item = {**item, "data": output_item(name, array)["data"]}
                json_item.pop("parameters")
                if params:
                    json_item["parameters"] = params
                out.append(json_item)
            elif wanted:
                _, array, _ = tensor_from_item(item, name, None, 0)
                raw = _binary_bytes(array)
                params = {**(item.get("parameters") or {}), "binary_data_size": len(raw)}
                out.append({k: v for k, v in item.items() if k != "data"} | {"parameters": params})
                chunks.append(raw)
            else:
                out.append(item)
    except InvalidInput as exc:
        raise UpstreamError(f"upstream response: {exc}") from None
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    doc.update((k, v) for k, v in rest.items() if k not in ("model_name", "model_version", "id"))
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = out
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
