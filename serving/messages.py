"""The one request type and the one result type of an inference, each with lazy views.

An `InferRequest` is what a client asked: its V2 body as it came (when plain JSON), its
input tensors as JSON items checked without numpy, and the same inputs as numpy arrays,
made on first use. A remote runner forwards the body; a local runner reads the arrays;
whoever needs neither pays for neither.

An `InferResponse` is what a version answered: the upstream's V2 output objects as they
came, or a local model's arrays, each view made from the other when first asked for.
The prediction the windows keep is read once per backing (`prediction()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollguard.serving.codec import (
    BINARY_HEADER,
    encode_infer_request,
    output_item,
    parse_json,
    response_outputs,
    tensor_from_item,
    tensors_from_outputs,
)
from rollguard.serving.errors import InvalidInput
from rollguard.serving.jsontensors import deferred_meta, flat_count, numeric_data_fits
from rollguard.serving.tensors import V2_TO_NUMPY, Shaped, Tensors

_NAN = float("nan")


class InferRequest:
    """One V2 inference request: id, requested outputs, and its inputs in three views."""

    __slots__ = ("_arrays", "_body", "_items", "_meta", "binary_outputs", "id", "outputs")

    def __init__(
        self,
        *,
        arrays: Tensors | None = None,
        items: Sequence[dict[str, Any]] | None = None,
        meta: Mapping[str, Shaped] | None = None,
        body: bytes | None = None,
        id: str | None = None,
        outputs: list[str] | None = None,
        binary_outputs: frozenset[str] = frozenset(),
    ) -> None:
        """Use `decode` or `of_arrays`; `body` only when it is plain JSON that asks for
        every output in JSON, so that forwarding it is the same as re-encoding it."""
        self._arrays = arrays
        self._items = items
        self._meta: Mapping[str, Shaped] = meta if meta is not None else (arrays or {})
        self._body = body
        self.id = id
        self.outputs = outputs
        self.binary_outputs = binary_outputs

    @classmethod
    def decode(cls, body: bytes, binary_header: str | None = None) -> InferRequest:
        """A V2 infer body (JSON, or JSON and binary tensors); InvalidInput when malformed."""
        binary: memoryview | None = None
        if binary_header is not None:
            try:
                n = int(binary_header)
            except ValueError:
                raise InvalidInput(f"{BINARY_HEADER} {binary_header!r} is not an integer") from None
            if not 0 < n <= len(body):
                raise InvalidInput(f"{BINARY_HEADER} {n} is outside the body of {len(body)} bytes")
            view = memoryview(body)
            doc, binary = parse_json(view[:n]), view[n:]
        else:
            doc = parse_json(body)
        if type(doc) is not dict:
            raise InvalidInput("request body must be a JSON object")
        raw_inputs = doc.get("inputs")
        if type(raw_inputs) is not list or not raw_inputs:
            raise InvalidInput("'inputs' must be a non-empty list of tensors")
        request_id = doc.get("id")
        if request_id is not None and type(request_id) is not str:
            raise InvalidInput("'id' must be a string")
        params = doc.get("parameters") or {}
        if type(params) is not dict:
            raise InvalidInput("'parameters' must be an object")
        outputs, binary_outputs = _requested_outputs(doc.get("outputs"), params)
        if binary is None:
            meta = deferred_meta(raw_inputs)  # checked without numpy when it surely converts
            if meta is not None:
                plain = outputs is None and not binary_outputs
                return cls(
                    items=raw_inputs,
                    meta=meta,
                    body=body if plain else None,
                    id=request_id,
                    outputs=outputs,
                    binary_outputs=binary_outputs,
                )
        arrays: Tensors = {}
        offset = 0
        for i, item in enumerate(raw_inputs):
            name, array, offset = tensor_from_item(item, f"inputs[{i}]", binary, offset)
            if name in arrays:
                raise InvalidInput(f"input '{name}' given twice")
            arrays[name] = array
        return cls(arrays=arrays, id=request_id, outputs=outputs, binary_outputs=binary_outputs)

    @classmethod
    def of_arrays(cls, arrays: Tensors, *, id: str | None = None) -> InferRequest:
        """A request made here (the `/predict` format, a merged batch)."""
        return cls(arrays=arrays, id=id)

    @property
    def meta(self) -> Mapping[str, Shaped]:
        """Each input's shape and dtype, known without converting anything."""
        return self._meta

    def arrays(self) -> Tensors:
        """The inputs as numpy arrays, converted once."""
        if self._arrays is None:
            assert self._items is not None
            # `meta` was filled in the items' order, one entry per item.
            self._arrays = {
                name: np.asarray(item["data"], dtype=meta.dtype).reshape(meta.shape)
                for item, (name, meta) in zip(self._items, self._meta.items(), strict=True)
            }
        return self._arrays

    def upstream_body(self) -> bytes:
        """The V2 JSON body an upstream gets: the client's own bytes when they ask for
        every output as JSON, else the inputs encoded again (every output asked for; the
        gateway picks the requested ones from the answer)."""
        if self._body is not None:
            return self._body
        return encode_infer_request(self.arrays(), request_id=self.id)

    def rows(self) -> int:
        """The batch size: the first input's first dimension (1 for a scalar input)."""
        for meta in self._meta.values():
            return int(meta.shape[0]) if meta.shape else 1
        return 0

    def first_row(self, width: int) -> np.ndarray | None:
        """The first input's first row as floats when it is 2-D and `width` wide (drift)."""
        for name, meta in self._meta.items():
            if len(meta.shape) == 2 and meta.shape[1] == width and meta.shape[0]:
                row: np.ndarray = self.arrays()[name][0]
                return row
            return None
        return None


class InferResponse:
    """One version's answer: V2 output objects or arrays, each made from the other lazily."""

    __slots__ = ("_arrays", "_items", "_prediction")

    def __init__(
        self, *, arrays: Tensors | None = None, items: list[dict[str, Any]] | None = None
    ) -> None:
        assert arrays is not None or items is not None
        self._arrays = arrays
        self._items = items
        self._prediction: float | None = None

    @classmethod
    def of_arrays(cls, arrays: Tensors) -> InferResponse:
        return cls(arrays=arrays)

    @classmethod
    def of_upstream(cls, body: bytes) -> InferResponse:
        """An upstream's V2 JSON answer, checked for structure; UpstreamError otherwise."""
        items, _ = response_outputs(body)
        return cls(items=items)

    def arrays(self) -> Tensors:
        """Every output as a numpy array; UpstreamError when an upstream's does not hold."""
        if self._arrays is None:
            assert self._items is not None
            self._arrays = tensors_from_outputs(self._items)
        return self._arrays

    def items(self) -> list[dict[str, Any]]:
        """Every output as a V2 JSON object (numpy data until serialised)."""
        if self._items is None:
            assert self._arrays is not None
            self._items = [output_item(name, array) for name, array in self._arrays.items()]
        return self._items

    def prediction(self) -> float:
        """Row 0's prediction as one number: the `label` output, else `prediction`, else
        the first output (its argmax when 2-D or more); NaN when there is no number."""
        if self._prediction is None:
            if self._arrays is not None:
                self._prediction = _prediction_of_arrays(self._arrays)
            else:
                assert self._items is not None
                self._prediction = _prediction_of_items(self._items)
        return self._prediction


def _requested_outputs(raw: Any, params: dict[str, Any]) -> tuple[list[str] | None, frozenset[str]]:
    """The requested output names (None: all) and those wanted as binary ("*": all)."""
    if raw is None:
        return None, frozenset({"*"}) if params.get("binary_data_output") is True else frozenset()
    if type(raw) is not list:
        raise InvalidInput("'outputs' must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for item in raw:
        if type(item) is not dict or type(item.get("name")) is not str:
            raise InvalidInput("each requested output needs a string 'name'")
        names.append(item["name"])
        oparams = item.get("parameters") or {}
        if type(oparams) is dict and oparams.get("binary_data") is True:
            binary.add(item["name"])
    return names, frozenset(binary)


# -- the prediction, once per backing ---------------------------------------------------


def _prediction_of_arrays(outputs: Mapping[str, np.ndarray]) -> float:
    array = outputs.get("label")
    if array is None:
        array = outputs.get("prediction")
    if array is None:
        if not outputs:
            return _NAN
        array = next(iter(outputs.values()))
        if array.size == 0 or array.dtype.kind in "OUS":
            return _NAN  # no number to read (strings, or no rows)
        if array.ndim >= 2:
            return float(np.argmax(array[0]))
    if array.size == 0 or array.dtype.kind in "OUS":
        return _NAN
    return float(array.item(0))


def _deciding_item(items: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    for wanted in ("label", "prediction"):
        for item in items:
            if item["name"] == wanted:
                return item
    return items[0] if items else None


def _prediction_of_items(items: Sequence[dict[str, Any]]) -> float:
    """As `_prediction_of_arrays` reads it, off the JSON: a flat numeric first value is
    read as numpy would have converted it; anything else converts the one output."""
    item = _deciding_item(items)
    if item is None:
        return _NAN
    datatype, shape = item["datatype"], item["shape"]
    data: Any = item.get("data")
    count = flat_count(shape, data)
    if count and numeric_data_fits(datatype, data):
        if item["name"] in ("label", "prediction") or len(shape) < 2:
            value = data[0]
            return float(np.float32(value)) if datatype == "FP32" else float(value)
        row = np.asarray(data[: count // shape[0]], dtype=V2_TO_NUMPY[datatype])
        return float(np.argmax(row))
    try:
        return _prediction_of_arrays(tensors_from_outputs([item]))
    except Exception:  # an output that does not hold has no prediction to keep
        return _NAN
