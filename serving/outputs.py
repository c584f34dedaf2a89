"""Output checks: an answer must be what the version's manifest declares, or it is none.

A model that answers with the wrong outputs has failed as surely as one that raised:
five labels for a two-row request, probabilities of shape [5, 3] where [-1, 2] is
declared, or a NaN label cast to -9223372036854775808 would otherwise reach the client
as a 200 and count as a success. `CheckedOutputs` wraps a runner and checks every
answer against the declared outputs:

- every declared output is there (outputs the manifest does not declare pass through);
- its datatype is the declared one;
- its shape fits the declared one: as many dimensions, each fixed size equal (-1 is
  free), and a batch dimension (-1 first, on the output and the first declared input)
  as long as the request has rows.

A mismatch raises `ModelExecutionError` for a local model and `UpstreamError` for an
`http` one, naming the model, the version and what was wrong: the caller counts it as
that version's failure (500 / 502). An upstream's JSON answer is checked by its
metadata (name, datatype, shape) without converting its values.

- no float output (declared or not) holds NaN or infinity. JSON has neither and the V2
  schema's `data` is numbers only (orjson would write them as `null`, which no V2
  client reads as a number), and a model answering NaN has failed to compute (an
  overflow, a division by zero, a log of a negative): its answer is that version's
  failure, counted against it so that a rollout sees it, whatever encoding the client
  asked for. An upstream's JSON answer holding `null` in a float output is refused the
  same way.

An integer or boolean output cannot carry NaN either; a runner that converts its
framework's floats to the declared integer datatype does it through `cast_output`, which
refuses NaN, infinity, fractions and values out of the datatype's range instead of
letting numpy turn them into arbitrary integers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollguard.serving.errors import ModelExecutionError, ServingError, UpstreamError
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Now, Runner, Wrapper
from rollguard.serving.tensors import NUMPY_TO_V2, TensorSpec


class DeclaredOutput:
    """One declared output, prepared for a check per answer."""

    __slots__ = ("batched", "datatype", "dtype", "fixed", "name", "ndim", "shape")

    def __init__(self, spec: TensorSpec, batched_inputs: bool) -> None:
        self.name = spec.name
        self.datatype = spec.datatype
        self.dtype = None if spec.datatype == "BYTES" else spec.dtype
        self.shape = list(spec.shape)
        self.ndim = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if d != -1)
        self.batched = batched_inputs and self.ndim > 0 and spec.shape[0] == -1


def declared_outputs(manifest: Manifest) -> tuple[DeclaredOutput, ...]:
    inputs = manifest.input_specs
    batched = bool(inputs) and bool(inputs[0].shape) and inputs[0].shape[0] == -1
    return tuple(DeclaredOutput(spec, batched) for spec in manifest.output_specs)


def _shape_problem(declared: DeclaredOutput, shape: Sequence[int], rows: int) -> str | None:
    if len(shape) != declared.ndim:
        return f"shape {list(shape)} does not match declared {declared.shape}"
    for i, size in declared.fixed:
        if shape[i] != size:
            return f"shape {list(shape)} does not match declared {declared.shape}"
    if declared.batched and shape[0] != rows:
        return f"{shape[0]} rows for a request of {rows}"
    return None


def _datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OUS":
        return "BYTES"
    return NUMPY_TO_V2.get(array.dtype, str(array.dtype))


def arrays_fit(
    declared: Sequence[DeclaredOutput], outputs: Mapping[str, np.ndarray], rows: int
) -> bool:
    """True when a local model's outputs are what is declared (the per-answer fast path;
    `array_problems` says what is wrong when not)."""
    for d in declared:
        array = outputs.get(d.name)
        if array is None:
            return False
        dtype = array.dtype
        if d.dtype is None:
            if dtype.kind not in "OUS":
                return False
        elif dtype is not d.dtype and dtype != d.dtype:
            return False
        shape = array.shape
        if len(shape) != d.ndim or (d.batched and shape[0] != rows):
            return False
        for i, size in d.fixed:
            if shape[i] != size:
                return False
    return True


def array_problems(
    declared: Sequence[DeclaredOutput], outputs: Mapping[str, np.ndarray], rows: int
) -> list[str]:
    """What is wrong with a local model's outputs, one phrase per output."""
    problems: list[str] = []
    for d in declared:
        array = outputs.get(d.name)
        if array is None:
            problems.append(f"output '{d.name}' is missing (it gives {sorted(outputs)})")
            continue
        if d.dtype is None:
            if array.dtype.kind not in "OUS":
                problems.append(
                    f"output '{d.name}': datatype {_datatype_of(array)}, declared BYTES"
                )
        elif array.dtype != d.dtype:
            problems.append(
                f"output '{d.name}': datatype {_datatype_of(array)}, declared {d.datatype}"
            )
        shape_problem = _shape_problem(d, array.shape, rows)
        if shape_problem is not None:
            problems.append(f"output '{d.name}': {shape_problem}")
    return problems


_isfinite = np.isfinite
_all = np.logical_and.reduce  # ndarray.all() without numpy's Python-level wrapper


_SUMMED = 64  # float outputs up to this size are checked by one Python sum (all_finite)


def all_finite(array: np.ndarray) -> bool:
    """Whether a float array holds no NaN and no infinity.

    A small one is summed as Python floats, with no numpy call beyond `tolist` (the
    usual answer, a class's probabilities, costs a quarter of numpy's isfinite-and-reduce
    this way): a sum of finite numbers that comes out finite says every number was, and a
    NaN or an infinity anywhere makes the sum NaN or infinite. Only a sum that is not
    finite needs the exact test: finite float64 values can add up past the largest
    double (float32 ones cannot, 64 of them)."""
    if array.size <= _SUMMED and math.isfinite(sum(array.ravel().tolist())):
        return True
    return bool(_all(_isfinite(array), None))


def non_finite(outputs: Mapping[str, np.ndarray]) -> list[str]:
    """The float outputs holding NaN or infinity, one phrase each (none: an empty list)."""
    problems: list[str] = []
    for name, array in outputs.items():
        if array.dtype.kind == "f" and not all_finite(array):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            problems.append(
                f"output '{name}': {bad} of {array.size} values are NaN or infinite, which "
                "a V2 answer cannot carry"
            )
    return problems


def item_problems(
    declared: Sequence[DeclaredOutput], items: Sequence[dict[str, Any]], rows: int
) -> list[str]:
    """What is wrong with an upstream's V2 output objects (structure already checked by
    the codec: a name, a known datatype, a list shape), one phrase per output."""
    by_name = {item["name"]: item for item in items}
    problems: list[str] = []
    for d in declared:
        item = by_name.get(d.name)
        if item is None:
            problems.append(f"output '{d.name}' is missing (it gives {sorted(by_name)})")
            continue
        if item["datatype"] != d.datatype:
            problems.append(
                f"output '{d.name}': datatype {item['datatype']}, declared {d.datatype}"
            )
        shape = item["shape"]
        if not all(type(s) is int for s in shape):
            problems.append(f"output '{d.name}': shape {shape} is not a list of integers")
            continue
        shape_problem = _shape_problem(d, shape, rows)
        if shape_problem is not None:
            problems.append(f"output '{d.name}': {shape_problem}")
        data = item.get("data")
        if d.datatype in _FLOATS and type(data) is list and None in data:
            problems.append(f"output '{d.name}': null in its data, where numbers belong")
    return problems


_FLOATS = frozenset({"FP16", "FP32", "FP64"})


def _answered_outside(manifest: Manifest) -> str:
    return f"{manifest.name} {manifest.version} answered outside its manifest: "


class CheckedOutputs(Wrapper):
    """A runner whose every answer is checked against the manifest's declared outputs;
    a mismatch is the version's failure, never an answer."""

    def __init__(self, inner: Runner, *, local: bool) -> None:
        """`local`: the answers are arrays (a model computed here), else an upstream's
        JSON output objects."""
        super().__init__(inner)
        self.local = local
        self._declared = declared_outputs(inner.manifest)
        manifest = inner.manifest
        self._what = _answered_outside(manifest)

    async def predict(self, request: InferRequest) -> InferResponse:
        return self._checked(request, await self.inner.predict(request))

    def predict_now(self, request: InferRequest) -> InferResponse | None:
        response = self.inner.predict_now(request)
        return None if response is None else self._checked(request, response)

    @property
    def batches_now(self) -> bool:
        return self.inner.batches_now

    def predict_now_many(self, requests: Sequence[InferRequest]) -> list[Now]:
        answers = self.inner.predict_now_many(requests)
        for i, (request, (answer, seconds)) in enumerate(zip(requests, answers, strict=True)):
            if isinstance(answer, InferResponse):
                start = time.perf_counter()
                try:
                    self._checked(request, answer)
                except ServingError as exc:
                    answers[i] = (exc, seconds + time.perf_counter() - start)
                else:
                    answers[i] = (answer, seconds + time.perf_counter() - start)
        return answers

    def _checked(self, request: InferRequest, response: InferResponse) -> InferResponse:
        """`response`, or the version's failure naming what is outside its manifest."""
        if self.local:
            outputs = response.arrays()
            rows = request.rows()
            if not self._declared or arrays_fit(self._declared, outputs, rows):
                problems = non_finite(outputs)
                if not problems:
                    return response
            else:
                problems = array_problems(self._declared, outputs, rows) + non_finite(outputs)
            raise self._failure(self._what + "; ".join(problems))
        if self._declared:
            # An upstream answers the outputs asked for (those it gives by default when
            # none are): a declared one it left out is missing only when named.
            items = response.items()
            named = set(request.outputs or ()) | {item["name"] for item in items}
            declared = [d for d in self._declared if d.name in named]
            problems = item_problems(declared, items, request.rows())
            if problems:
                raise self._failure(self._what + "; ".join(problems))
        return response

    def _failure(self, message: str) -> ServingError:
        return ModelExecutionError(message) if self.local else UpstreamError(message)


def cast_output(value: np.ndarray, dtype: np.dtype, manifest: Manifest, output: str) -> np.ndarray:
    """`value` as `dtype` (output `output`'s declared datatype), refusing a conversion
    that would change what it says: NaN, infinity, fractions or out-of-range values into
    an integer, anything but 0 and 1 into a boolean (ModelExecutionError)."""
    if value.dtype == dtype:
        return value
    if dtype.kind in "iub" and value.dtype.kind in "fc":
        what = f"{_answered_outside(manifest)}output '{output}'"
        datatype = NUMPY_TO_V2.get(dtype, str(dtype))
        finite = np.isfinite(value)
        if not finite.all():
            bad = int(value.size - np.count_nonzero(finite))
            raise ModelExecutionError(
                f"{what}: {bad} of {value.size} values are NaN or infinite, which its declared "
                f"datatype {datatype} cannot carry"
            )
        if value.dtype.kind == "c" or np.any(value != np.trunc(value)):
            raise ModelExecutionError(
                f"{what}: fractional values, which its declared datatype {datatype} cannot carry"
            )
        if value.size:
            low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
            # As Python numbers: float64(2**63) > int64's max compares exactly there.
            least, most = float(value.min()), float(value.max())
            if least < low or most > high:
                raise ModelExecutionError(
                    f"{what}: values from {least:g} to {most:g} do not fit its declared "
                    f"datatype {datatype}"
                )
    return value.astype(dtype, copy=False)
