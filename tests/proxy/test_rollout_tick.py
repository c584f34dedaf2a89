"""The rollout shell's tick in parts (Rollouts.tick_steps) and its bookkeeping saves
written in the background: decided from the evidence it began with, flushed at stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rollguard.policy.store import StateStore
from tests.proxy.conftest import MakeRegistry
from tests.proxy.test_rollout_shell import Shell

DEADLINE_S = 10.0


@pytest.fixture
async def shell(tmp_path: Path, make_registry: MakeRegistry) -> AsyncIterator[Shell]:
    shell = Shell(tmp_path, make_registry("fraud/1.0.0", "fraud/1.1.0"))
    shell.write()
    await shell.start()
    yield shell
    await shell.stop()
    shell.executor.shutdown()


def _saved(shell: Shell) -> dict[str, object] | None:
    """The state file as another process would read it now."""
    return StateStore(shell.settings.state / "rollouts").load("fraud")


async def test_a_tick_in_parts_decides_as_a_tick_at_once(shell: Shell) -> None:
    shell.serve_candidate()
    steps = shell.rollouts.tick_steps("fraud")
    parts = 1
    for _ in steps:
        parts += 1
        await asyncio.sleep(0)
    assert parts >= 4  # paused between the evidence, each check, the decision, the effects
    status = shell.rollouts.describe("fraud")
    assert status["last_decision"]["action"] == "advance" and status["step"] == 1
    assert shell.kinds()[-1] == "decision"


async def test_a_state_changed_during_a_tick_drops_the_ticks_decision(shell: Shell) -> None:
    shell.serve_candidate()  # enough for the tick to advance
    steps = shell.rollouts.tick_steps("fraud")
    next(steps)  # the evidence is taken
    await shell.rollouts.act("fraud", "pause", "alice", "looking into it")
    for _ in steps:
        pass
    status = shell.rollouts.describe("fraud")
    assert (status["phase"], status["step"]) == ("paused", 0)
    assert shell.kinds()[-1] == "admin"
    table = shell.table()
    assert table is not None and table.weight == 10


async def test_stop_writes_the_bookkeeping_save_still_waiting(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    held = threading.Event()
    release = threading.Event()

    def fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("rollguard-state"):
            held.set()
            assert release.wait(DEADLINE_S)

    shell = Shell(tmp_path, make_registry("fraud/1.0.0", "fraud/1.1.0"))
    shell.write()
    await shell.start()
    try:
        shell.rollouts.store = StateStore(shell.settings.state / "rollouts", fsync=fsync)
        shell.serve_candidate(10)  # counted, too few to decide: a bookkeeping save
        assert shell.rollouts.tick("fraud")["action"] == "none"
        seen = shell.rollouts.describe("fraud")["state"]["seen"]
        assert seen is not None
        assert await asyncio.to_thread(held.wait, DEADLINE_S)
        before = _saved(shell)
        assert before is not None and before["seen"] != seen  # held in the writer thread
        stopping = asyncio.ensure_future(shell.rollouts.stop())
        release.set()
        await stopping
        after = _saved(shell)
        assert after is not None and after["seen"] == seen
    finally:
        release.set()
        await shell.plane.registry.stop()
        shell.executor.shutdown()
