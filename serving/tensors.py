"""V2 tensor metadata: datatypes, their numpy equivalents, and shape checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rollguard.serving.errors import InvalidInput

Tensors = dict[str, np.ndarray]

# Open Inference Protocol datatypes -> numpy dtypes (BYTES carries Python strings/bytes).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}


class Shaped(Protocol):
    """What the input checks read of an array: a numpy array, or a promise of one."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...


def v2_datatype(array: Shaped) -> str:
    """The V2 datatype name of a numpy array (strings and objects map to BYTES)."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[array.dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {array.dtype} has no V2 datatype") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output: name, V2 datatype, shape with -1 for free dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise InvalidInput unless `shape` fits this spec (-1 matches any size)."""
        declared = self.shape
        fits = len(shape) == len(declared)
        if fits:  # a plain loop: any(<generator>) costs more than the check on every request
            for want, got in zip(declared, shape, strict=True):
                if want != got and want != -1:
                    fits = False
                    break
        if not fits:
            raise InvalidInput(
                f"input '{self.name}': shape {list(shape)} does not match declared "
                f"{list(self.shape)}"
            )


def check_inputs(inputs: Mapping[str, Shaped], specs: Sequence[TensorSpec]) -> None:
    """Check named arrays against declared inputs; every declared input must be present."""
    if len(inputs) != len(specs):
        _refuse_unknown(inputs, specs)
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            _refuse_unknown(inputs, specs)  # a misnamed input is named as unknown first
            raise InvalidInput(f"missing input '{spec.name}'")
        spec.check_shape(array.shape)
        want = V2_TO_NUMPY[spec.datatype]  # the identity test settles the usual case
        if array.dtype is not want and spec.datatype != "BYTES" and array.dtype != want:
            raise InvalidInput(
                f"input '{spec.name}': datatype {v2_datatype(array)} does not match "
                f"declared {spec.datatype}"
            )


def _refuse_unknown(inputs: Mapping[str, Shaped], specs: Sequence[TensorSpec]) -> None:
    declared = {s.name for s in specs}
    for name in inputs:
        if name not in declared:
            raise InvalidInput(f"unknown input '{name}'; the model declares {sorted(declared)}")


def batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows in a batch: the first dimension, which every input must share."""
    sizes = {a.shape[0] if a.ndim else 1 for a in inputs.values()}
    if len(sizes) != 1:
        raise InvalidInput(f"inputs disagree on the batch dimension: {sorted(sizes)}")
    return sizes.pop()


def as_text(name: str, array: np.ndarray, taker: str) -> np.ndarray:
    """A BYTES input as str elements, the way `taker` (a string tensor, a text model) needs
    them: ONNX Runtime would turn a Python bytes object into its repr (b'0' into "b'0'")
    and scikit-learn's text features refuse bytes. InvalidInput when an element is not
    UTF-8."""
    if array.dtype.kind == "U":
        return array
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, value in enumerate(flat_in):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"input '{name}': element {i} is not UTF-8 text, which {taker} needs"
                ) from None
        elif not isinstance(value, str):
            value = str(value)
        flat_out[i] = value
    return out
