"""Bookkeeping saves written in the background (StateStore.save_later): their order
against saves written at once, flushing, and a failed write tried again."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from rollguard.policy.errors import StateError
from rollguard.policy.store import StateStore

DEADLINE_S = 10.0


class Gate:
    """An fsync that fails every write while `failing`, and holds the writer thread's
    writes until opened; writes made on other threads are not held."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.waiting = threading.Event()  # the writer thread is held at an fsync
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        if not threading.current_thread().name.startswith("rollguard-state"):
            return
        self.waiting.set()
        assert self.open.wait(DEADLINE_S), "the test never opened the gate"


def _failing_disk(root: Path) -> tuple[Gate, StateStore]:
    """A store whose every write fails (no space left) until `gate.failing` is cleared."""
    gate = Gate()
    gate.open.set()
    gate.failing = True
    return gate, StateStore(root, fsync=gate)


def counts(n: int) -> dict[str, int]:
    return {"seen": n}


def test_a_background_save_lands_and_flush_waits_for_it(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_later("fraud", counts(1))
    store.save_later("fraud", counts(2))  # only the newest waiting one need be written
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") == counts(2)
    assert store.close(DEADLINE_S)
    store.save_later("fraud", counts(3))  # a closed store starts another writer
    assert store.close(DEADLINE_S)
    assert StateStore(tmp_path).load("fraud") == counts(3)


def test_a_waiting_bookkeeping_save_never_lands_after_a_later_save(tmp_path: Path) -> None:
    """The writer is held on another rollout while a bookkeeping save of fraud waits;
    a decision's save of fraud is written at once; the waiting one is then skipped."""
    gate = Gate()
    store = StateStore(tmp_path, fsync=gate)
    store.save_later("other", counts(0))
    assert gate.waiting.wait(DEADLINE_S)
    store.save_later("fraud", counts(1))  # waits behind "other"
    store.save("fraud", {"phase": "rolled_back"})  # the decision, at once
    gate.open.set()
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") == {"phase": "rolled_back"}
    assert store.load("other") == counts(0)


def test_a_bookkeeping_save_being_written_finishes_before_a_later_save(tmp_path: Path) -> None:
    """The writer is inside fraud's bookkeeping write (between its fsync and rename) when
    the decision's save of fraud comes: the decision waits its turn and lands last."""
    gate = Gate()
    store = StateStore(tmp_path, fsync=gate)
    store.save_later("fraud", counts(1))
    assert gate.waiting.wait(DEADLINE_S)
    errors: list[BaseException] = []

    def decide() -> None:
        try:
            store.save("fraud", {"phase": "rolled_back"})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    decision = threading.Thread(target=decide)
    decision.start()
    gate.open.set()
    decision.join(DEADLINE_S)
    assert not decision.is_alive() and errors == []
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") == {"phase": "rolled_back"}


def test_a_failed_background_write_is_logged_and_tried_again_by_the_next_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate, store = _failing_disk(tmp_path)
    with caplog.at_level(logging.ERROR, logger="rollguard.state"):
        store.save_later("fraud", counts(1))
        assert not store.flush(DEADLINE_S)
    assert "fraud.json: cannot write state: [Errno 28] No space left" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left
    gate.failing = False  # the disk recovers: the next save (of any rollout) retries
    store.save_later("other", counts(0))
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") == counts(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fraud.json", "other.json"]


def test_a_failed_background_write_is_superseded_by_a_later_one(tmp_path: Path) -> None:
    gate, store = _failing_disk(tmp_path)
    store.save_later("fraud", counts(1))
    assert not store.flush(DEADLINE_S)
    gate.failing = False
    store.save_later("fraud", counts(2))
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") == counts(2)


def test_flush_reports_a_write_that_keeps_failing(tmp_path: Path) -> None:
    gate, store = _failing_disk(tmp_path)
    store.save_later("fraud", counts(1))
    assert not store.flush(DEADLINE_S)
    assert not store.close(DEADLINE_S)
    assert store.load("fraud") is None  # read writes it first if it can: it cannot
    gate.failing = False
    assert store.load("fraud") == counts(1)  # still waiting: written by the reader


def test_reading_and_deleting_see_the_waiting_save(tmp_path: Path) -> None:
    gate = Gate()
    store = StateStore(tmp_path, fsync=gate)
    store.save_later("other", counts(0))
    assert gate.waiting.wait(DEADLINE_S)  # the writer is held: fraud's save waits
    store.save_later("fraud", counts(1))
    assert store.load("fraud") == counts(1)  # written by the reader, not lost
    store.save_later("fraud", counts(2))
    store.delete("fraud")  # the waiting save is forgotten with the state
    gate.open.set()
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") is None


def test_an_unserialisable_background_save_is_refused_at_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(StateError, match="not JSON-serialisable"):
        store.save_later("fraud", {"bad": object()})
    assert store.flush(DEADLINE_S)
    assert store.load("fraud") is None
