"""What batching (serving/batching.py) and coalescing (serving/scheduling.py) share: a
caller waiting for a call shared with others, which requests can share one, and putting
their rows together and apart again."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rollguard.serving.messages import InferRequest
from rollguard.serving.tensors import Tensors

# Input names, dtypes and trailing dimensions: requests with equal keys concatenate.
Key = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True, eq=False)
class Waiting:
    """One caller's request waiting for a shared call."""

    inputs: Tensors
    rows: int
    key: Key | None  # None: cannot be concatenated with anything (0-d inputs)
    arrived: float  # when it began to wait (its waiter's clock)
    future: asyncio.Future[Tensors] = field(repr=False)
    caller: InferRequest | None = field(default=None, repr=False)  # a client's: its queue_ns


def key(inputs: Tensors) -> Key | None:
    if any(a.ndim == 0 for a in inputs.values()):
        return None
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def merged(inputs: Sequence[Tensors]) -> Tensors:
    """The requests' inputs, one array per name, rows in their order."""
    return {name: np.concatenate([each[name] for each in inputs]) for name in inputs[0]}


def unsplittable(outputs: Tensors, rows: int) -> str | None:
    """None when every output holds a row per input row, else the first that does not."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            return name
    return None


def split(outputs: Tensors, rows: Sequence[int]) -> list[Tensors]:
    """Each request's own rows of `outputs` (checked with `unsplittable`), in order."""
    parts = []
    offset = 0
    for count in rows:
        end = offset + count
        parts.append({n: a[offset:end] for n, a in outputs.items()})
        offset = end
    return parts


def hand_back(group: Sequence[Waiting], outputs: Tensors) -> None:
    """Each caller its own rows of `outputs` (checked with `unsplittable`)."""
    for waiting, part in zip(group, split(outputs, [w.rows for w in group]), strict=True):
        resolve(waiting.future, part)


def resolve(future: asyncio.Future[Tensors], outputs: Tensors) -> None:
    if not future.done():
        future.set_result(outputs)
