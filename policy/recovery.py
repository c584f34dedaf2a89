"""State from the log: a rollout's state file is checked against the audit log before use.

The audit log is the source of truth; a state file is its cache (it also keeps the
bookkeeping no entry records, such as a step's request baseline). At start, for each
rollout, `recover` compares the file's seal and `audit_seq` with the rollout's last
record in the log (policy/chain.py's Record):

| state file | log | outcome |
|---|---|---|
| missing | has a state for it | rebuilt from the log |
| missing | nothing about it | a new rollout: begins |
| missing / not sealed by the key | broken where it records it | refused: the log cannot say |
| seal does not verify | any | refused (StateError names the file and the remedy) |
| seq = its last record, same outcome | | used as saved |
| seq = its last record, another outcome | | refused: changed outside rollguard |
| seq older than its last record | | stale: rebuilt from the log |
| seq after its last record, up to one past the log's end | | crash-saved: applied, audited |
| seq further ahead than the log | | refused |

A save is followed at once by its rollout's record at the seq it names (every append
runs on the event loop), so a sealed state naming a seq after the rollout's last record
was saved by a process that died before writing that record. Whatever holds that seq
now came later: the `repair` of the torn record, or entries of a start that was itself
killed before it recovered this rollout (policy entries, other rollouts' records).

"Outcome" is what routes traffic and what a decision changes: the versions, the
generation, the step, the approval, the A/B winner, and the phase when either side is
terminal (a `rolled_back` edited to `promoted` is refused). Whatever is rebuilt or
accepted is recorded in a `state_recovered` entry and saved at once, so log and file
agree again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rollguard.policy.audit import ACTOR, AuditLog
from rollguard.policy.chain import RECOVERED
from rollguard.policy.errors import StateError
from rollguard.policy.store import StateStore, StoredState

log = logging.getLogger("rollguard.recovery")

OUTCOME = (
    "model",
    "stable",
    "candidate",
    "strategy",
    "generation",
    "step",
    "approved_by",
    "winner",
)
_TERMINAL = frozenset({"promoted", "rolled_back", "concluded"})


@dataclass(frozen=True, slots=True)
class Recovered:
    """The state to start a rollout from (None: begin anew), and why it is not the file's."""

    state: Mapping[str, Any] | None
    note: str | None = None


def recover(name: str, store: StateStore, audit: AuditLog) -> Recovered:
    """The state `name` starts from; StateError when neither file nor log can be trusted."""
    found = _decide(name, store, audit)
    if found.note is not None and found.state is not None:
        log.warning("rollout %s: %s", name, found.note)
        data = {"reason": found.note, "state": dict(found.state)}
        audit.append(RECOVERED, name, ACTOR, data)
        store.save(name, found.state, audit_seq=audit.record_seq(name))
    return found


def _decide(name: str, store: StateStore, audit: AuditLog) -> Recovered:
    record = audit.records.get(name)
    walk = audit.walk
    damaged = name in walk.untrusted or walk.unknown_damage
    stored = store.read(name)  # StateError when its seal does not verify
    keyed = store.key is not None
    if stored is None:
        if damaged:
            raise StateError(
                f"rollout {name!r}: its state file is missing and the audit log is broken where "
                "it records this rollout, so the log cannot say where it stood; refusing to "
                "start it (restore the state file, or archive the log to start anew)"
            )
        if record is None or record.state is None:
            return Recovered(None)
        return Recovered(
            record.state, f"state file missing: rebuilt from audit entry {record.state_seq}"
        )
    trusted = stored.sealed == "key" or not keyed
    seq = stored.audit_seq
    if record is None or record.state is None:
        if damaged and stored.sealed == "key":
            note = "the audit log is broken where it records this rollout: its key-sealed state"
            return Recovered(stored.state, note + " file is used and recorded again")
        if trusted and seq is not None and _saved_before_a_crash(seq, 0, audit):
            return Recovered(stored.state, _CRASH)
        raise StateError(
            f"rollout {name!r}: the state file corresponds to audit entry {seq}, but the audit "
            "log holds no record of this rollout: the log and the state disagree (log "
            f"replaced, or state copied in); {_REMEDY}"
        )
    if seq is None or seq == record.seq:
        if (diff := _differs(stored.state, record.state)) is not None:
            raise StateError(
                f"rollout {name!r}: the state file says {diff[0]} but audit entry "
                f"{record.state_seq} says {diff[1]}: the state was changed outside rollguard; "
                f"refusing to trust it ({_REMEDY})"
            )
        if not trusted:
            return Recovered(
                record.state,
                f"state file not sealed with the audit key: rebuilt from audit entry "
                f"{record.state_seq}",
            )
        if seq is None:
            note = "state file from an older rollguard agrees with the log: sealed now"
            return Recovered(stored.state, note)
        return Recovered(stored.state)
    if seq < record.seq:
        return Recovered(
            record.state,
            f"state file is stale (audit entry {seq}; the log's last record of this rollout is "
            f"{record.seq}): rebuilt from audit entry {record.state_seq}",
        )
    if damaged and stored.sealed == "key":
        return Recovered(stored.state, "the audit log is broken after its last trusted record")
    if trusted and _saved_before_a_crash(seq, record.seq, audit):
        return Recovered(stored.state, _CRASH)
    raise StateError(
        f"rollout {name!r}: the state file corresponds to audit entry {seq}, which the audit log "
        f"does not hold for this rollout (its last record is entry {record.seq}, the log ends "
        f"at entry {audit.opened_at}); {_REMEDY}"
    )


def _saved_before_a_crash(seq: int, last_record: int, audit: AuditLog) -> bool:
    """A state saved for entry `seq` whose record was never written (see the docstring)."""
    return last_record < seq <= audit.opened_at + 1


def agrees(stored: StoredState | None, audit: AuditLog, name: str) -> str | None:
    """Why `stored` and the log disagree on `name` (None when they agree), for checks."""
    record = audit.records.get(name)
    if stored is None or record is None or record.state is None:
        return None if stored is None and record is None else "one of state and log is missing"
    if stored.audit_seq != record.seq:
        return f"state file at audit entry {stored.audit_seq}, log's last record {record.seq}"
    diff = _differs(stored.state, record.state)
    return None if diff is None else f"state {diff[0]} vs log {diff[1]}"


_CRASH = "saved just before a crash and never audited: applied, and audited now"
_REMEDY = "remove the state file to rebuild it from the audit log"


def _differs(saved: Mapping[str, Any], logged: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first outcome field on which two states differ, as (saved, logged) text."""
    fields = list(OUTCOME)
    if saved.get("phase") in _TERMINAL or logged.get("phase") in _TERMINAL:
        fields.insert(0, "phase")
    for key in fields:
        if saved.get(key) != logged.get(key):
            return f"{key}={saved.get(key)!r}", f"{key}={logged.get(key)!r}"
    return None
