"""Helpers shared by the serving tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from rollguard.serving.messages import InferRequest
from rollguard.serving.runners import Runner, Wrapper
from rollguard.serving.tensors import Tensors


async def predict_arrays(runner: Runner, inputs: Tensors) -> Tensors:
    """`runner`'s answer to a request made of `inputs`, as arrays."""
    answer = await runner.predict(InferRequest.of_arrays(inputs))
    return answer.arrays()


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait until `condition()` holds, re-checking every 10 ms; TimeoutError after
    `timeout_s` (for state with nothing to wait on but polling, e.g. a watcher's scans)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the registry has no change event to await
            await asyncio.sleep(0.01)


def layers(runner: Runner) -> list[Runner]:
    """`runner` and every runner it wraps, outermost first."""
    found = [runner]
    while isinstance(runner, Wrapper):
        runner = runner.inner
        found.append(runner)
    return found


_DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES"]
_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)


@st.composite
def tensor_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON input tensor, mostly well formed, sometimes not in one way or another."""
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    count = int(np.prod(shape)) if shape else 1
    data = draw(st.lists(_VALUES, min_size=count, max_size=count))
    if draw(st.booleans()):  # plausible numbers more often than not
        data = draw(
            st.lists(
                st.one_of(st.integers(-300, 300), st.floats(-1e6, 1e6)),
                min_size=count,
                max_size=count,
            )
        )
    doc: dict[str, Any] = {"name": "x", "datatype": draw(st.sampled_from(_DATATYPES))}
    doc["shape"] = draw(st.sampled_from([shape, [*shape, 2], "bad"]))
    doc["data"] = draw(st.sampled_from([data, data[:-1], [data]]))
    if draw(st.integers(0, 9)) == 0:
        doc["parameters"] = {}
    return doc
