"""V2 JSON tensors checked in plain Python, converted to numpy only when someone asks.

A request passed byte for byte to a remote upstream must still be checked (bad input is
refused before routing counts it against a version), but its arrays are needed only
when a drift check keeps a row or a local runner runs them. `deferred_meta` accepts the
common case, flat numeric `data` that numpy is sure to convert, and leaves the
conversion for later; anything else returns None and takes serving/codec.py's numpy
path, whose errors stay the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rollguard.serving.tensors import V2_TO_NUMPY

# Integer datatypes and the values numpy converts without an OverflowError.
_INT_RANGE: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
# Float datatypes every JSON number converts to (FP16 is left to numpy: it overflows).
_FLOATS = frozenset({"FP32", "FP64"})
_FP32_MAX = float(np.finfo(np.float32).max)


@dataclass(slots=True)  # not frozen: a frozen dataclass pays object.__setattr__ per field
class TensorMeta:
    """What `check_inputs` reads of an array, known before the array exists."""

    shape: tuple[int, ...]
    dtype: np.dtype


def numeric_data_fits(datatype: str, data: list[Any]) -> bool:
    """Whether numpy converts this flat list to `datatype` without an error.

    True only for numbers it surely takes: any JSON number for FP32/FP64 (bools too, as
    numpy does), in-range integers for the integer types. False means "ask numpy".
    """
    if datatype in _FLOATS:
        try:
            sum(data, 0.0)  # a C loop refusing all but int, float, bool (and huge ints)
        except (TypeError, OverflowError):  # a string, a list, null; an int beyond floats
            return False
        # JSON numbers are finite doubles; FP32 holds less (1e308 would become inf).
        return datatype != "FP32" or not data or -_FP32_MAX <= min(data) <= max(data) <= _FP32_MAX
    bounds = _INT_RANGE.get(datatype)
    if bounds is None:
        return False
    low, high = bounds
    for value in data:  # noqa: SIM110 - all(<generator>) costs twice as much per request
        if type(value) is not int or not low <= value <= high:  # bools: left to numpy
            return False
    return True


def flat_count(shape: Any, data: Any) -> int | None:
    """prod(shape) when `shape` is a list of non-negative ints and `data` a flat list that
    long; else None."""
    if type(shape) is not list or type(data) is not list:
        return None
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        count *= d
    return count if len(data) == count else None


def deferred_meta(items: Sequence[Any]) -> dict[str, TensorMeta] | None:
    """Each input's shape and dtype, unconverted, when each is exactly {name, datatype,
    shape, data} with a flat numeric `data` that numpy is sure to take; None sends the
    request to numpy (serving/codec.py), whose errors stay the reference."""
    meta: dict[str, TensorMeta] = {}
    for item in items:
        if type(item) is not dict or len(item) != 4:  # parameters etc.: numpy's path
            return None
        name = item.get("name")
        datatype = item.get("datatype")
        data: Any = item.get("data")
        if type(name) is not str or not name or name in meta or type(datatype) is not str:
            return None
        shape: Any = item.get("shape")
        if flat_count(shape, data) is None or not numeric_data_fits(datatype, data):
            return None
        meta[name] = TensorMeta(tuple(shape), V2_TO_NUMPY[datatype])
    return meta
