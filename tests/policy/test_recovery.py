"""policy.recovery: each row of its table, with a real state store and audit log on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rollguard.policy.audit import AuditLog
from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey
from rollguard.policy.recovery import recover
from rollguard.policy.store import StateStore

KEY = AuditKey(b"r" * 32)
BASE = {"model": "fraud", "stable": "1", "candidate": "2", "strategy": "canary", "generation": 1}


def state(phase: str, step: int = 0, **more: Any) -> dict[str, Any]:
    return {**BASE, "phase": phase, "step": step, **more}


class Dir:
    """A state directory: the log and the store, reopened as a restart does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.audit = AuditLog(root / "audit.jsonl", key=KEY)
        self.store = StateStore(root / "rollouts", key=KEY)

    def record(self, kind: str, data: dict[str, Any], *, save: bool = True) -> None:
        """What the shell does: save (seq of the entry to come), then append."""
        if save:
            seq = self.audit.record_seq("fraud", kind)
            self.store.save("fraud", data, audit_seq=seq)
        self.audit.append(kind, "fraud", "engine", {"reason": kind, "state": data})

    def restart(self) -> Dir:
        self.audit.close()
        return Dir(self.root)

    def kinds(self) -> list[str]:
        lines = (self.root / "audit.jsonl").read_bytes().splitlines()
        return [json.loads(line)["kind"] for line in lines]


@pytest.fixture
def d(tmp_path: Path) -> Dir:
    d = Dir(tmp_path)
    d.record("start", state("progressing"))
    d.record("decision", state("progressing", 1))
    return d


def test_an_agreeing_state_file_is_used_as_saved(d: Dir) -> None:
    d.store.save("fraud", state("progressing", 1, step_start_requests=40), audit_seq=2)
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("progressing", 1, step_start_requests=40)
    assert found.note is None and d.kinds() == ["start", "decision"]


def test_a_missing_state_file_is_rebuilt_from_the_log(d: Dir) -> None:
    d.record("decision", state("rolled_back", 1))
    (d.root / "rollouts" / "fraud.json").unlink()
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("rolled_back", 1)
    assert found.note is not None and "state file missing" in found.note
    assert d.kinds()[-1] == "state_recovered"
    assert d.store.read("fraud") is not None
    assert recover("fraud", d.store, d.restart().audit).note is None  # agreeing from now on


def test_a_stale_state_file_is_rebuilt_from_the_log(d: Dir) -> None:
    old = (d.root / "rollouts" / "fraud.json").read_bytes()  # a backup of the state
    d.record("decision", state("rolled_back", 1))
    (d.root / "rollouts" / "fraud.json").write_bytes(old)
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("rolled_back", 1)
    assert found.note is not None and "stale" in found.note


def test_a_state_saved_just_before_a_crash_is_applied_and_audited(d: Dir) -> None:
    seq = d.audit.record_seq("fraud", "decision")
    d.store.save("fraud", state("rolled_back", 1), audit_seq=seq)  # then killed
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("rolled_back", 1)
    assert found.note is not None and "never audited" in found.note
    assert d.kinds()[-1] == "state_recovered"
    stored = d.store.read("fraud")
    assert stored is not None and stored.audit_seq == 3


TORN = b'{"actor":"engine","data":{"action":"rollback","reas'  # a crash mid-append


def interrupted_restart(d: Dir, appended: str) -> Dir:
    """A start that appends entries, then is killed before it recovers "fraud"."""
    d = d.restart()  # a torn tail is repaired here: its `repair` entry comes first
    if appended == "policy_applied":  # the watcher's entry just before recover()
        d.audit.append("policy_applied", "fraud", "policy-watcher", {})
    elif appended == "another rollout":  # rollouts recovered before this one
        d.audit.append("policy_applied", "other", "policy-watcher", {})
        d.audit.append("start", "other", "engine", {"state": {**BASE, "phase": "progressing"}})
    return d.restart()


@pytest.mark.parametrize("appended", ["repair", "policy_applied", "another rollout"])
def test_a_crash_saved_state_survives_a_start_killed_before_recovering_it(
    d: Dir, appended: str
) -> None:
    """Saved as entry 3, the append of entry 3 torn by a kill; the next start appends
    (a repair, a policy entry, another rollout's records) and is killed too: the start
    after it still applies the decision, not refuses to start."""
    seq = d.audit.record_seq("fraud", "decision")
    d.store.save("fraud", state("rolled_back", 1), audit_seq=seq)
    if appended == "repair":
        with (d.root / "audit.jsonl").open("ab") as f:
            f.write(TORN)
    d = interrupted_restart(d, appended)
    assert d.kinds()[2] != "decision"  # entry 3 is about something else now
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("rolled_back", 1)
    assert found.note is not None and "never audited" in found.note
    assert d.kinds()[-1] == "state_recovered"
    stored = d.store.read("fraud")
    assert stored is not None and stored.audit_seq == len(d.kinds())
    assert recover("fraud", d.store, d.restart().audit).note is None  # agreeing from now on


def test_a_state_ahead_of_the_log_is_refused(d: Dir) -> None:
    d.audit.append("policy_applied", "other", "watcher", {})
    d.store.save("fraud", state("promoted", 2), audit_seq=5)  # the log ends at entry 3
    d = d.restart()
    with pytest.raises(StateError, match="does not hold for this rollout"):
        recover("fraud", d.store, d.audit)


def test_a_state_behind_a_later_record_is_stale_not_a_crash(d: Dir) -> None:
    """Entry 3 is another rollout's, but fraud has a record after it: the log is newer."""
    d.audit.append("policy_applied", "other", "watcher", {})
    d.store.save("fraud", state("promoted", 2), audit_seq=3)
    d.record("decision", state("rolled_back", 1), save=False)
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("rolled_back", 1)
    assert found.note is not None and "stale" in found.note


def test_an_outcome_the_log_does_not_say_is_refused(d: Dir) -> None:
    d.record("decision", state("rolled_back", 1))
    d.store.save("fraud", state("promoted", 1), audit_seq=3)  # sealed, yet not what happened
    d = d.restart()
    with pytest.raises(StateError, match="phase='promoted' but audit entry 3 says"):
        recover("fraud", d.store, d.audit)


def test_a_log_with_no_record_refuses_a_state_that_claims_one(tmp_path: Path) -> None:
    d = Dir(tmp_path)
    d.store.save("fraud", state("promoted"), audit_seq=9)
    with pytest.raises(StateError, match="holds no record of this rollout"):
        recover("fraud", d.store, d.audit)
    assert recover("new", d.store, d.audit).state is None  # a new rollout begins


def test_a_first_state_saved_before_a_crash_survives_an_interrupted_start(
    tmp_path: Path,
) -> None:
    """The rollout's very first save (its `start` entry never written), then a start
    killed after appending its policy entry: the state still applies."""
    d = Dir(tmp_path)
    d.audit.append("policy_applied", "fraud", "policy-watcher", {})
    d.store.save("fraud", state("progressing"), audit_seq=d.audit.record_seq("fraud", "start"))
    d = interrupted_restart(d, "policy_applied")
    found = recover("fraud", d.store, d.audit)
    assert found.state == state("progressing")
    assert found.note is not None and "never audited" in found.note


def test_a_missing_state_and_a_log_broken_where_it_records_it_is_refused(d: Dir) -> None:
    d.record("decision", state("rolled_back", 1))
    lines = (d.root / "audit.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"engine"', b'"mallory"')
    (d.root / "audit.jsonl").write_bytes(b"".join(lines))
    (d.root / "rollouts" / "fraud.json").unlink()
    d = d.restart()
    assert not d.audit.chain_ok
    with pytest.raises(StateError, match="log cannot say"):
        recover("fraud", d.store, d.audit)


def test_a_plain_state_under_a_key_is_rebuilt_when_it_agrees(d: Dir) -> None:
    StateStore(d.root / "rollouts").save("fraud", state("progressing", 1), audit_seq=2)
    d = d.restart()
    found = recover("fraud", d.store, d.audit)
    assert found.note is not None and "not sealed with the audit key" in found.note
    StateStore(d.root / "rollouts").save("fraud", state("promoted", 1), audit_seq=3)
    d = d.restart()
    with pytest.raises(StateError, match="changed outside rollguard"):
        recover("fraud", d.store, d.audit)
