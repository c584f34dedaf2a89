"""Walking an audit log's chain: each line's hash or MAC, its seq and prev link, and the head.

One pass over the file gives what verification reports (the first bad line and why) and
what recovery needs (each rollout's last record, from the trusted part of the chain
only). A line that breaks the chain ends the trusted part; a `chain_break` entry (the
gateway's own record of a break it found at start) that verifies on its own begins a
new one. An incomplete last line is kept apart (`torn`): a crash mid-append leaves one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rollguard.policy.keys import AuditKey
from rollguard.policy.store import canonical

GENESIS = "0" * 64
BREAK = "chain_break"
KEYED = "audit_keyed"  # the first keyed entry of a log that began without a key
RECOVERED = "state_recovered"  # policy/recovery.py's record of a state it rebuilt or accepted
# Entries carrying a rollout's whole state in data["state"], and those a saved state
# follows (its `audit_seq`). `restore` is neither: it repeats a state the log already
# holds, and a restore that changes nothing saves nothing.
STATE_KINDS = frozenset({"start", "policy", "decision", "admin", RECOVERED})
RECORD_KINDS = STATE_KINDS | {"threshold"}
_FIELDS = frozenset({"seq", "ts", "kind", "rollout", "actor", "data", "prev", "hash"})


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int  # lines that verified before the first bad one (all of them when ok)
    first_bad_line: int | None = None  # 1-based
    reason: str | None = None
    keyed: bool = False  # verified under an audit key (False: a plain, forgeable chain)


@dataclass(frozen=True, slots=True)
class Record:
    """A rollout's last record in the log: its seq, and the last state an entry carried."""

    seq: int
    state_seq: int = 0
    state: Mapping[str, Any] | None = None

    @classmethod
    def after(cls, previous: Record | None, entry: Mapping[str, Any]) -> Record:
        data = entry.get("data")
        state = data.get("state") if isinstance(data, dict) else None
        if entry["kind"] in STATE_KINDS and isinstance(state, dict):
            return cls(entry["seq"], entry["seq"], state)
        if previous is None:
            return cls(entry["seq"])
        return cls(entry["seq"], previous.state_seq, previous.state)


def seal(entry: dict[str, Any], key: AuditKey | None) -> bytes:
    """Add `key` (with a key) and `hash` to `entry`; its canonical line, newline included."""
    if key is not None:
        entry["key"] = key.id
    body = canonical(entry)
    entry["hash"] = hashlib.sha256(body).hexdigest() if key is None else key.mac(body)
    return canonical(entry) + b"\n"


def check_entry(raw: bytes, key: AuditKey | None) -> tuple[dict[str, Any] | None, str]:
    """(entry, "") if the line is a whole entry whose own hash or MAC verifies."""
    if not raw.endswith(b"\n"):
        return None, "incomplete line (no newline): the log was truncated"
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(entry, dict) or set(entry) - {"key"} != _FIELDS:
        return None, f"not an audit entry (expected the fields {', '.join(sorted(_FIELDS))})"
    body = canonical({k: v for k, v in entry.items() if k != "hash"})
    if "key" in entry:
        if key is None:
            return None, (
                f"sealed with audit key {entry['key']}: verifying it needs the key "
                "(ROLLGUARD_AUDIT_KEY or a key file)"
            )
        if entry["key"] != key.id:
            return None, f"sealed with audit key {entry['key']}, not the configured {key.id}"
        if not hmac.compare_digest(key.mac(body), str(entry["hash"])):
            return None, "MAC mismatch: the entry was changed (or written without the key)"
    elif hashlib.sha256(body).hexdigest() != entry["hash"]:
        return None, "hash mismatch: the entry was changed"
    if canonical(entry) + b"\n" != raw:
        return None, "not in canonical form: the line was edited"
    return entry, ""


@dataclass
class Walk:
    """The state of one pass over a log; feed it lines in order."""

    key: AuditKey | None
    lines: int = 0  # whole lines (the torn tail apart)
    torn: bytes | None = None
    last_seq: int = 0  # the last whole line's seq and hash (as written, verified or not)
    last_hash: str = GENESIS
    last_prev: str = GENESIS
    records: dict[str, Record] = field(default_factory=dict)  # from trusted entries only
    untrusted: set[str] = field(default_factory=set)  # rollouts named in untrusted lines
    unknown_damage: bool = False  # an untrusted line whose rollout cannot be read
    problems: list[tuple[int, str, int]] = field(default_factory=list)  # line, why, verified
    breaks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    verified: int = 0
    _trusted: bool = True
    _expect: int = 1
    _prev: str = GENESIS
    _plain: bool = False
    _keyed: bool = False

    def feed(self, raw: bytes) -> None:
        self.lines += 1
        n = self.lines
        loose = _loose(raw)
        self._note_tail(raw, loose)
        entry, problem = check_entry(raw, self.key)
        if self._trusted:
            problem = self._link(entry) if entry is not None else problem
            if not problem:
                assert entry is not None
                self._accept(entry, n)
                return
            self.problems.append((n, problem, self.verified))
            self._trusted = False
        if entry is not None and entry["kind"] == BREAK:
            self._trusted = True  # the gateway's own record of the break: trust resumes
            self._accept(entry, n)
        elif loose is not None and isinstance(loose.get("rollout"), str):
            self.untrusted.add(loose["rollout"])
        elif loose is None or loose.get("rollout") is not None:
            self.unknown_damage = True

    @property
    def damaged(self) -> bool:
        """Some lines are outside the trusted chain: the log cannot say everything."""
        return bool(self.problems)

    def config_problem(self) -> str | None:
        """The key configured and the log's seal disagree (a set-up error, or a rewrite)."""
        if self.key is None and self.key_ids:
            return (
                f"the audit log is sealed with audit key {self.key_ids[0]}: verifying or "
                "appending to it needs the key (ROLLGUARD_AUDIT_KEY, audit_key_file or --key-file)"
            )
        if self.key is not None and self.key_ids and self.key_ids[0] != self.key.id:
            return (
                f"the audit log is sealed with audit key {self.key_ids[0]}, not the "
                f"configured key {self.key.id}"
            )
        if self.key is not None and self.lines and not self.key_ids:
            return (
                "no entry of the audit log is sealed with the audit key: it was written "
                "before the key was configured, or rewritten by someone without it; check it "
                "with `rollguard audit verify` (no key), then `rollguard audit adopt-key`"
            )
        return None

    def open_problem(self, head: tuple[int, str] | None) -> tuple[int, str] | None:
        """The break in the part of the log after its last recorded break, if any."""
        last_break = self.breaks[-1][0] if self.breaks else 0
        fresh = [(line, why) for line, why, _ in self.problems if line > last_break]
        if fresh:
            return fresh[0]
        if self._trusted:
            return self._head_problem(head)
        return None

    def tail_matches(self, head: tuple[int, str] | None) -> bool:
        return (head or (0, GENESIS)) == (self.last_seq, self.last_hash)

    def result(self, head: tuple[int, str] | None, *, torn_is_bad: bool = True) -> VerifyResult:
        if (config := self.config_problem()) is not None:
            return VerifyResult(False, 0, 1, config)
        if self.problems:
            line, why, verified = self.problems[0]
            return VerifyResult(False, verified, line, why)
        if self.torn is not None and torn_is_bad:
            why = "incomplete line (no newline): the log was truncated"
            return VerifyResult(False, self.lines, self.lines + 1, why)
        if (problem := self._head_problem(head)) is not None:
            line, why = problem
            return VerifyResult(False, min(self.lines, line - 1), line, why)
        if self.breaks:
            line, data = self.breaks[0]
            why = (
                f"the gateway found the chain broken at line {data.get('line')} and went on "
                f"from here: {data.get('reason')}"
            )
            return VerifyResult(False, line - 1, line, why)
        return VerifyResult(True, self.lines, keyed=self.key is not None)

    def _link(self, entry: dict[str, Any]) -> str:
        if entry["seq"] != self._expect:
            return (
                f"seq is {entry['seq']}, expected {self._expect}: "
                "a line was removed, inserted or moved"
            )
        if entry["prev"] != self._prev:
            return "prev does not match the previous entry's hash"
        if self.key is not None:
            if "key" not in entry and self._keyed:
                return "an unkeyed entry among keyed ones: written without the key"
            if "key" in entry and self._plain and not self._keyed and entry["kind"] != KEYED:
                return "keyed entries follow unkeyed ones that no key adoption sealed"
        return ""

    def _accept(self, entry: dict[str, Any], n: int) -> None:
        self._expect, self._prev = entry["seq"] + 1, entry["hash"]
        self._keyed |= "key" in entry
        self._plain |= "key" not in entry
        if not self.problems:
            self.verified = n
        if entry["kind"] == BREAK:
            self.breaks.append((n, entry["data"] if isinstance(entry["data"], dict) else {}))
        rollout = entry["rollout"]
        if isinstance(rollout, str) and entry["kind"] in RECORD_KINDS:
            self.records[rollout] = Record.after(self.records.get(rollout), entry)

    def _note_tail(self, raw: bytes, loose: dict[str, Any] | None) -> None:
        key_id = loose.get("key") if loose is not None else None
        if isinstance(key_id, str) and key_id not in self.key_ids:
            self.key_ids.append(key_id)
        seq = loose.get("seq") if loose is not None else None
        if loose is not None and isinstance(seq, int) and isinstance(loose.get("hash"), str):
            self.last_seq, self.last_hash = seq, loose["hash"]
            self.last_prev = str(loose.get("prev"))
        else:  # a line that is not an entry: go on after it, chained to its bytes
            self.last_seq += 1
            self.last_hash = hashlib.sha256(raw).hexdigest()
            self.last_prev = ""

    def _head_problem(self, head: tuple[int, str] | None) -> tuple[int, str] | None:
        hs, hh = head or (0, GENESIS)
        ls, lh = self.last_seq, self.last_hash

        def line(seq: int) -> int:
            return self.lines - (ls - seq)

        if (hs, hh) == (ls, lh):
            return None
        if hs == ls - 1 and hh == self.last_prev:
            return None  # a crash between appending and recording the head
        if hs > ls:
            return line(ls) + 1, (
                f"the log ends at entry {ls} but its head records entry {hs}: "
                "entries were removed from the end"
            )
        if hs >= ls - 1:
            return line(hs), f"entry {hs} does not match the head's hash"
        missing = "" if head is not None else " (head file missing)"
        return line(hs) + 2, f"entries after {hs + 1} are not recorded in the head{missing}"


def walk_file(fd: int, key: AuditKey | None) -> Walk:
    """Walk the file open at `fd` from its start (the position is left unchanged)."""
    walk = Walk(key)
    offset, rest = 0, b""
    while chunk := os.pread(fd, 1 << 20, offset):
        offset += len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            walk.feed(line + b"\n")
    if rest:
        walk.torn = rest
    return walk


def _loose(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
