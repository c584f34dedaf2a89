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
    json_document,
    output_item,
    parse_json,
    response_outputs,
    tensor_from_item,
    tensors_from_outputs,
)
from rollguard.serving.errors import InvalidInput
from rollguard.serving.jsontensors import deferred_meta
from rollguard.serving.prediction import DEFAULT_RULE, Predicted, Rule, read_arrays, read_items
from rollguard.serving.tensors import Shaped, Tensors

_NONE: frozenset[str] = frozenset()


class InferRequest:
    """One V2 inference request: id, requested outputs, and its inputs in three views."""

    __slots__ = (
        "_arrays",
        "_body",
        "_doc",
        "_header_length",
        "_items",
        "_meta",
        "_rows",
        "binary_outputs",
        "forward",
        "id",
        "outputs",
        "queue_ns",
        "shared_wait_s",
    )

    def __init__(
        self,
        *,
        arrays: Tensors | None = None,
        items: Sequence[dict[str, Any]] | None = None,
        meta: Mapping[str, Shaped] | None = None,
        body: bytes | None = None,
        doc: dict[str, Any] | None = None,
        header_length: int | None = None,
        id: str | None = None,
        outputs: list[str] | None = None,
        binary_outputs: frozenset[str] = frozenset(),
    ) -> None:
        """Use `decode` or `of_arrays`. `body` is the client's own bytes (its JSON part
        `header_length` long when binary tensors follow) and `doc` their JSON document."""
        self._arrays = arrays
        self._items = items
        self._meta: Mapping[str, Shaped] = meta if meta is not None else (arrays or {})
        self._rows = -1  # rows(), once asked
        self._body = body
        self._doc = doc
        self._header_length = header_length
        self.id = id
        self.outputs = outputs
        self.binary_outputs = binary_outputs
        self.queue_ns = 0  # waited for its version's slot and batch (bulkhead.py, batching.py)
        # Of that, waited for the shared call of its turn of the loop (scheduling.py): the
        # loop's time for the turn's other requests, left out of the rollout's latency.
        self.shared_wait_s = 0.0
        # Client headers an upstream gets (the gateway's allow-list), as (name, value);
        # a shared empty tuple until the gateway sets some (most requests forward none).
        self.forward: Sequence[tuple[str, str]] = ()

    @classmethod
    def decode(cls, body: bytes, binary_header: str | None = None) -> InferRequest:
        """A V2 infer body (JSON, or JSON and binary tensors); InvalidInput when malformed."""
        binary: memoryview | None = None
        n: int | None = None
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
        raw_outputs = doc.get("outputs")
        if raw_outputs is None and not params:  # the usual request: every output, as JSON
            outputs, binary_outputs = None, _NONE
        else:
            outputs, binary_outputs = _requested_outputs(raw_outputs, params)
        if binary is None:
            meta = deferred_meta(raw_inputs)  # checked without numpy when it surely converts
            if meta is not None:
                return cls(
                    items=raw_inputs,
                    meta=meta,
                    body=body,
                    doc=doc,
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
        return cls(
            arrays=arrays,
            body=body,
            doc=doc,
            header_length=n,
            id=request_id,
            outputs=outputs,
            binary_outputs=binary_outputs,
        )

    @classmethod
    def of_arrays(cls, arrays: Tensors, *, id: str | None = None) -> InferRequest:
        """A request made here (the `/predict` format, a merged batch)."""
        return cls(arrays=arrays, id=id)

    @property
    def document(self) -> dict[str, Any] | None:
        """The client's V2 JSON document as parsed; None for a request made here."""
        return self._doc

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

    def upstream_body(self, binary: bool = True) -> tuple[bytes, int | None]:
        """The body an upstream gets, and its JSON part's length when binary tensors
        follow: the client's own bytes as they came (id, parameters, requested outputs
        and all), unless they carry binary tensors and the upstream takes none
        (`binary` False): then the same document with those tensors as JSON `data`.
        A request made here (`of_arrays`) is encoded as V2 JSON."""
        body, doc = self._body, self._doc
        if body is None or doc is None:
            return encode_infer_request(self.arrays(), request_id=self.id), None
        if self._header_length is None or binary:
            return body, self._header_length
        return json_document(doc, self.arrays()), None

    def rows(self) -> int:
        """The batch size: the first input's first dimension (1 for a scalar input)."""
        rows = self._rows
        if rows < 0:  # asked several times a request: worked out once
            rows = 0
            for meta in self._meta.values():
                rows = int(meta.shape[0]) if meta.shape else 1
                break
            self._rows = rows
        return rows

    def first_row(self, width: int) -> np.ndarray | None:
        """The first input's first row as floats when it is 2-D and `width` wide (drift)."""
        for name, meta in self._meta.items():
            if len(meta.shape) == 2 and meta.shape[1] == width and meta.shape[0]:
                row: np.ndarray = self.arrays()[name][0]
                return row
            return None
        return None


class InferResponse:
    """One version's answer: V2 output objects or arrays, each made from the other lazily.

    An upstream's answer also keeps what came with its outputs (`upstream`: its other
    fields, e.g. `parameters`, and the binary tensors that followed its JSON), so that
    the gateway can relay it as it came.
    """

    __slots__ = ("_arrays", "_items", "_prediction", "binary", "upstream")

    def __init__(
        self,
        *,
        arrays: Tensors | None = None,
        items: list[dict[str, Any]] | None = None,
        upstream: dict[str, Any] | None = None,
        binary: memoryview | None = None,
    ) -> None:
        assert arrays is not None or items is not None
        self._arrays = arrays
        self._items = items
        self._prediction: Predicted | None = None
        self.upstream = upstream
        self.binary = binary

    @classmethod
    def of_arrays(cls, arrays: Tensors) -> InferResponse:
        return cls(arrays=arrays)

    @classmethod
    def of_upstream(cls, body: bytes, binary_header: str | None = None) -> InferResponse:
        """An upstream's V2 answer (JSON, or JSON and binary tensors when it sent
        `binary_header`), checked for structure; UpstreamError otherwise."""
        items, rest = response_outputs(body, binary_header)
        binary = memoryview(body)[int(binary_header) :] if binary_header is not None else None
        return cls(items=items, upstream=rest, binary=binary)

    def arrays(self) -> Tensors:
        """Every output as a numpy array; UpstreamError when an upstream's does not hold."""
        if self._arrays is None:
            assert self._items is not None
            self._arrays = tensors_from_outputs(self._items, self.binary)
        return self._arrays

    def items(self) -> list[dict[str, Any]]:
        """Every output as a V2 object: a local model's as JSON (numpy data until
        serialised), an upstream's as they came (binary ones sized, without `data`)."""
        if self._items is None:
            assert self._arrays is not None
            self._items = [output_item(name, array) for name, array in self._arrays.items()]
        return self._items

    def prediction(self, rule: Rule = DEFAULT_RULE) -> Predicted:
        """Row 0's prediction read by `rule` (serving/prediction.py): a number or a class
        name, NaN when the answer holds none. Read once; a response is read by one rule."""
        if self._prediction is None:
            if self._arrays is not None:
                self._prediction = read_arrays(rule, self._arrays)
            else:
                assert self._items is not None
                self._prediction = read_items(rule, self._items, self.binary)
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
