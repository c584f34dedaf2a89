"""A lane's threads: stuck calls are counted until they return, refused once all are
stuck, and a call given up before a thread took it is never computed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rollguard.serving.bulkhead import Threads
from rollguard.serving.errors import Overloaded
from tests.serving.support import eventually


class _Gate:
    """A blocking function a test opens: what a hung model looks like to its thread."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered: list[int] = []

    def call(self, n: int) -> int:
        self.entered.append(n)
        self.opened.wait(10.0)  # the model under test blocking, not synchronisation
        return n


async def _abandon(threads: Threads, gate: _Gate, n: int) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await threads.run(gate.call, n)


async def test_calls_whose_callers_gave_up_are_stuck_until_they_return() -> None:
    threads, gate = Threads("m/1", 1), _Gate()
    await _abandon(threads, gate, 1)
    assert threads.stuck == 1
    with pytest.raises(Overloaded, match="all 1 of its threads are stuck"):
        await threads.run(gate.call, 2)  # refused at once: not queued behind a hung call
    gate.opened.set()
    await eventually(lambda: threads.stuck == 0)
    assert await threads.run(gate.call, 3) == 3
    threads.close()


async def test_a_call_given_up_before_a_thread_took_it_is_never_computed() -> None:
    threads, gate = Threads("m/1", 2), _Gate()
    # Both threads (size 2, up to 4 spawned) block; the fifth call waits for one.
    running = [asyncio.create_task(threads.run(gate.call, n)) for n in range(4)]
    await eventually(lambda: len(gate.entered) == 4)
    await _abandon(threads, gate, 99)
    gate.opened.set()
    assert await asyncio.gather(*running) == [0, 1, 2, 3]
    await eventually(lambda: threads.stuck == 0)
    assert sorted(gate.entered) == [0, 1, 2, 3]  # 99 was skipped, not computed late
    threads.close()
