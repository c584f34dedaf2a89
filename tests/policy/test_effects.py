"""Lifecycle effects run through a real StateStore and AuditLog: write-ahead order, failures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rollguard.policy import lifecycle
from rollguard.policy.audit import AuditLog, read_entries, verify
from rollguard.policy.effects import Audit, ResetWindows, Route, Save, SetLatencyThreshold
from rollguard.policy.errors import StateError
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase, RolloutState
from rollguard.policy.store import StateStore
from tests.policy.lifecycle_support import T0, TICK, Traffic, make_rollout


class Process:
    """A minimal shell over real files: effects in order, the first failure stops the rest."""

    def __init__(self, root: Path, rollout: Rollout, traffic: Traffic, **store: Any) -> None:
        self.root, self.rollout, self.traffic, self.now = root, rollout, traffic, T0
        self.store = StateStore(root / "state", **store)
        self.audit = AuditLog(root / "audit.jsonl", lambda: self.now)
        self.announced: list[dict[str, Any]] = []
        self.routed: list[tuple[float, str | None]] = []  # weight, and the phase then on disk
        saved = self.store.load(rollout.name)
        if saved is None:
            first = lifecycle.begin(rollout, self.now)
        else:
            first = lifecycle.restore(rollout, RolloutState.from_json(saved), self.now)
        self.state = first.state
        self.run(first)

    def run(self, transition: lifecycle.Transition) -> None:
        for effect in transition.effects:
            if isinstance(effect, Save):
                self.store.save(self.rollout.name, effect.state.to_json())
            elif isinstance(effect, Audit):
                record = self.audit.append(
                    effect.kind, self.rollout.name, effect.actor, effect.data
                )
                if effect.announce:
                    self.announced.append(record)
            elif isinstance(effect, Route):
                self.routed.append((effect.weight, self.saved_phase()))
                self.traffic.route(effect.weight)
            elif isinstance(effect, ResetWindows):
                self.traffic.reset_windows()
            elif isinstance(effect, SetLatencyThreshold):
                self.traffic.set_latency_threshold(effect.seconds)
        self.state = transition.state

    def tick(self) -> None:
        self.traffic.serve()
        self.now += TICK
        self.run(lifecycle.tick(self.rollout, self.state, self.traffic.evidence(), self.now))

    def run_until(self, phase: Phase, max_ticks: int = 60) -> None:
        for _ in range(max_ticks):
            self.tick()
            if self.state.phase is phase:
                return
        raise AssertionError(f"still {self.state.phase} after {max_ticks} ticks")

    def saved_phase(self) -> str | None:
        saved = self.store.load(self.rollout.name)
        return None if saved is None else str(saved["phase"])

    def kinds(self) -> list[str]:
        return [e["kind"] for e in read_entries(self.audit.path)]


def test_a_rollout_leaves_a_verifiable_audit_trail(tmp_path: Path) -> None:
    process = Process(tmp_path, make_rollout(), Traffic())
    process.run_until(Phase.PROMOTED)
    assert process.kinds() == ["start", "threshold", "decision", "decision", "decision"]
    assert [r["kind"] for r in process.announced] == ["start", "decision", "decision", "decision"]
    assert process.announced[-1] == read_entries(process.audit.path)[-1]  # the stored record
    assert verify(process.audit.path).ok
    process.audit.close()


def test_decisions_are_persisted_before_they_are_routed(tmp_path: Path) -> None:
    process = Process(tmp_path, make_rollout(), Traffic(candidate_error_rate=0.3))
    process.run_until(Phase.ROLLED_BACK)
    assert process.routed == [(10, "progressing"), (0, "rolled_back")]
    process.audit.close()


def test_a_failed_save_applies_nothing(tmp_path: Path) -> None:
    failing = {"on": False}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError("disk full")

    process = Process(tmp_path, make_rollout(), Traffic(candidate_error_rate=0.3), fsync=fsync)
    process.tick()  # freezes the latency threshold
    failing["on"] = True
    with pytest.raises(StateError, match="disk full"):
        process.run_until(Phase.ROLLED_BACK)
    assert process.state.phase is Phase.PROGRESSING and process.traffic.weights[-1] == 10
    assert process.saved_phase() == "progressing" and "decision" not in process.kinds()
    failing["on"] = False  # the disk recovers: the next tick decides again
    process.run_until(Phase.ROLLED_BACK)
    assert process.traffic.weights[-1] == 0 and process.saved_phase() == "rolled_back"
    process.audit.close()


def test_a_restart_restores_the_saved_state_and_audits_it_as_saved(tmp_path: Path) -> None:
    first = Process(tmp_path, make_rollout(), Traffic())
    for _ in range(6):
        first.tick()
    before = first.state
    assert before.step >= 1
    first.audit.close()
    second = Process(tmp_path, make_rollout(), Traffic())
    # The same state, its tests' counts carried on from the first process's windows.
    assert replace(second.state, carried=None, seen=None) == replace(before, seen=None)
    assert second.state.carried == before.seen and second.traffic.weights == [before.weight]
    restore = read_entries(second.audit.path)[-1]
    # audited as it was saved; the store now holds it with the counts carried
    assert restore["kind"] == "restore" and restore["data"]["state"] == before.to_json()
    assert first.store.load("fraud") == second.state.to_json()
    assert verify(second.audit.path).ok
    second.audit.close()
