"""Helpers shared by the serving tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
