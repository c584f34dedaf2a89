"""The append-only, chained audit log (`audit.jsonl`): append, verify at open, repair, export.

Each line is the canonical JSON (sorted keys, no spaces) of one entry: seq, ts, kind,
rollout, actor, data, prev (the previous entry's hash, "0"*64 first) and hash. Without
an audit key (policy/keys.py) `hash` is the sha256 of the entry's canonical JSON without
`hash`: it shows accidents, and anyone who can write the file can recompute it. With a
key every entry also names the key (`key`: its id) and `hash` is an HMAC-SHA256 under
it, so a rewritten log no longer verifies. Changing, inserting, removing or reordering a
line breaks the chain at that line; removing lines from the end leaves a shorter valid
chain, so every append also records the last seq and hash in a head file beside the log
(`audit.jsonl.head`), and verification compares them.

Opening the log (the gateway's start) verifies the whole chain (policy/chain.py walks it):
- an incomplete last line, which is what a crash mid-append leaves, is cut off and a
  `repair` entry records the bytes dropped;
- any other break is refused with `refuse_broken`; otherwise it is reported
  (`problem`) and a `chain_break` entry records it, from which the chain goes on.
  `verify` fails on a log holding a `chain_break` entry, so the break stays visible.
Files are created 0600 and never opened through a symbolic link.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rollguard.policy.chain import (
    BREAK,
    GENESIS,
    KEYED,
    RECORD_KINDS,
    Record,
    VerifyResult,
    Walk,
    seal,
    walk_file,
)
from rollguard.policy.errors import AuditError
from rollguard.policy.keys import AuditKey
from rollguard.policy.store import (
    canonical,
    open_private,
    read_private,
    sync_directory,
    write_atomic,
)

__all__ = ["GENESIS", "AuditLog", "Record", "VerifyResult", "adopt_key", "export", "verify"]

log = logging.getLogger("rollguard.audit")
REPAIR = "repair"
ACTOR = "rollguard"  # the actor of the log's own entries (repair, chain_break, audit_keyed)
_FIELDS = ("seq", "ts", "kind", "rollout", "actor", "data", "prev", "hash")


class AuditLog:
    """Appends entries to one audit log; safe to call from several threads."""

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        *,
        key: AuditKey | None = None,
        refuse_broken: bool = False,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        # Wall clock on purpose: `ts` is a record for people, not a deadline.
        self.path = path
        self.key = key
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.Lock()
        self._broken: str | None = None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._fd = open_private(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise AuditError(_open_error(path, exc)) from exc
        try:
            self._open(refuse_broken)
        except BaseException:
            os.close(self._fd)
            raise

    def _open(self, refuse_broken: bool) -> None:
        if stat.S_IMODE(os.fstat(self._fd).st_mode) & 0o077:
            os.fchmod(self._fd, 0o600)  # a log from before 0600 was the rule
        walk = walk_file(self._fd, self.key)
        if (config := walk.config_problem()) is not None:
            raise AuditError(f"{self.path}: {config}")
        head = _read_head(self.path)
        torn, problem = walk.torn, walk.open_problem(head)
        if torn is not None and problem is None and not walk.tail_matches(head):
            # Only a head one entry behind gets here (any other mismatch is a problem
            # already). An append begins once the previous one's head is written, so one
            # crash leaves a lagging head or a torn line, never both.
            problem = (
                walk.lines + 1,
                "the last line is incomplete and the head is one entry behind the last whole "
                "line: two interrupted appends, which one crash cannot leave (the log was "
                "cut, or written by two processes at once)",
            )
        if problem is not None and refuse_broken:
            line, reason = problem
            raise AuditError(
                f"{self.path}: the audit chain is broken at line {line}: {reason}; refusing to "
                "start (audit_refuse_broken is set): run `rollguard audit verify`"
            )
        self.walk = walk  # what the log said at open, for recovery
        #: the last seq before this open appended anything (recovery's crash window)
        self.opened_at = walk.last_seq
        self.records: dict[str, Record] = dict(walk.records)
        self._seq, self._prev = walk.last_seq, walk.last_hash
        if torn is not None:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - len(torn))
            self._fsync(self._fd)
        if walk.lines == 0 and torn is None:
            sync_directory(self.path.parent, fsync=self._fsync)  # the new log's entry
        head_seq = head[0] if head is not None else 0
        if problem is None and head_seq == self._seq - 1:
            _write_head(self.path, self._seq, self._prev, self._fsync)  # an interrupted append
        if torn is not None and problem is None:
            log.warning("%s: dropped an incomplete last line (%d bytes)", self.path, len(torn))
            why = "incomplete last line (crash mid-append)"
            self.append(REPAIR, None, ACTOR, {"reason": why, **_dropped(torn)})
        if problem is not None:
            line, reason = problem
            log.error("%s: the audit chain is broken at line %d: %s", self.path, line, reason)
            data: dict[str, Any] = {
                "line": line,
                "reason": reason,
                "head": None if head is None else list(head),
            }
            if torn is not None:
                data |= _dropped(torn)  # beside the break's own reason, not over it
            self.append(BREAK, None, ACTOR, data)
        found = walk.result(head, torn_is_bad=False)
        #: whether the chain verified at open (a torn tail, once repaired, does not count)
        self.chain_ok = found.ok and problem is None
        self.problem: str | None = None  # the first break, for /admin and the log
        if problem is not None:
            self.problem = f"line {problem[0]}: {problem[1]}"
        elif not found.ok:
            self.problem = f"line {found.first_bad_line}: {found.reason}"

    @property
    def head(self) -> tuple[int, str]:
        """The last entry's seq and hash (0 and GENESIS for an empty log)."""
        return self._seq, self._prev

    @property
    def keyed(self) -> bool:
        return self.key is not None

    def record_seq(self, rollout: str, next_kind: str | None = None) -> int:
        """The audit seq a state saved now corresponds to: the entry about to be appended
        when it is one of the rollout's records (`next_kind`), else its last record."""
        with self._lock:
            if next_kind in RECORD_KINDS:
                return self._seq + 1
            record = self.records.get(rollout)
            return 0 if record is None else record.seq

    def append(
        self, kind: str, rollout: str | None, actor: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write one entry durably and return it as stored; AuditError if it cannot be."""
        return self._append(kind, rollout, actor, data, self.key)

    def _append(
        self,
        kind: str,
        rollout: str | None,
        actor: str,
        data: Mapping[str, Any],
        key: AuditKey | None,
    ) -> dict[str, Any]:
        with self._lock:
            if self._broken is not None:
                raise AuditError(self._broken)
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "ts": _iso(self._clock()),
                "kind": kind,
                "rollout": rollout,
                "actor": actor,
                "data": dict(data),
                "prev": self._prev,
            }
            try:
                line = seal(entry, key)
            except (TypeError, ValueError) as exc:
                raise AuditError(f"audit entry {kind!r} is not JSON-serialisable: {exc}") from exc
            try:
                _write_all(self._fd, line)
                self._fsync(self._fd)
            except OSError as exc:
                # A partial line may now end the file: appending more would hide it.
                self._broken = f"{self.path}: append failed ({exc}); run `rollguard audit verify`"
                raise AuditError(self._broken) from exc
            self._seq, self._prev = entry["seq"], entry["hash"]
            if rollout is not None and kind in RECORD_KINDS:
                self.records[rollout] = Record.after(self.records.get(rollout), entry)
            try:
                _write_head(self.path, self._seq, self._prev, self._fsync)
            except OSError as exc:
                self._broken = f"{_head_path(self.path)}: cannot record the head: {exc}"
                raise AuditError(self._broken) from exc
            stored: dict[str, Any] = json.loads(line)
            return stored

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self._broken = self._broken or f"{self.path}: the audit log is closed"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify(path: Path, key: AuditKey | None = None) -> VerifyResult:
    """Check every line's hash (or MAC), seq and prev link, then the tail against the head."""
    try:
        head = _read_head(path)
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    except AuditError as exc:
        return VerifyResult(False, 0, None, str(exc))
    except OSError as exc:
        return VerifyResult(False, 0, None, _open_error(path, exc))
    try:
        walk = walk_file(fd, key) if fd >= 0 else Walk(key)
    except OSError as exc:
        return VerifyResult(False, 0, None, f"{path}: cannot read: {exc}")
    finally:
        if fd >= 0:
            os.close(fd)
    return walk.result(head)


def adopt_key(path: Path, key: AuditKey) -> dict[str, Any]:
    """Seal an intact unkeyed log under `key`: an `audit_keyed` entry, keyed, continues it.

    From then on only keyed entries verify. Run it once, after `verify` without a key
    says the log is intact: what the log says up to here is taken as it is.
    """
    if verify(path, key).ok:
        raise AuditError(f"{path}: the log is already sealed with this audit key")
    result = verify(path)
    if not result.ok:
        raise AuditError(f"{path}: not adopting a key on this log: {result.reason}")
    with AuditLog(path) as plain:
        return plain._append(
            KEYED, None, ACTOR, {"key": key.id, "unkeyed_entries": plain.head[0]}, key
        )


def read_entries(
    path: Path, *, since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """Entries with since <= ts < until (naive datetimes are UTC); unverified."""
    lo, hi = _utc(since), _utc(until)
    raw = read_private(path, AuditError, "audit log")
    entries: list[dict[str, Any]] = []
    whole = (raw or b"").split(b"\n")[:-1]  # a last line still being written is not an entry
    for lineno, line in enumerate(whole, start=1):
        try:
            entry = json.loads(line)
            ts = datetime.fromisoformat(entry["ts"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{path}:{lineno}: unreadable audit entry: {exc}") from exc
        if (lo is None or ts >= lo) and (hi is None or ts < hi):
            entries.append(entry)
    return entries


def export(
    path: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: Literal["json", "csv"] = "json",
) -> str:
    """The entries in [since, until) as a JSON array or as CSV (data as a JSON column)."""
    return format_entries(read_entries(path, since=since, until=until), fmt)


def format_entries(entries: list[dict[str, Any]], fmt: Literal["json", "csv"] = "json") -> str:
    """Entries as `export` writes them (the fleet's audit stream exports the same way)."""
    if fmt == "json":
        return json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}; expected 'json' or 'csv'")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*_FIELDS, "key"))
    for e in entries:
        row = {**e, "data": canonical(e.get("data")).decode("utf-8")}
        writer.writerow(["" if row.get(k) is None else row[k] for k in (*_FIELDS, "key")])
    return out.getvalue()


def _dropped(torn: bytes) -> dict[str, Any]:
    return {
        "dropped_bytes": len(torn),
        "dropped_sha256": hashlib.sha256(torn).hexdigest(),
        "dropped": torn[:2048].decode("utf-8", "replace"),
    }


def _open_error(path: Path, exc: OSError) -> str:
    if exc.errno == 40:  # ELOOP: O_NOFOLLOW met a symbolic link
        return f"{path}: is a symbolic link; the audit log is never opened through one"
    return f"{path}: cannot open the audit log: {exc}"


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    raw = read_private(_head_path(path), AuditError, "audit head")
    if raw is None:
        return None
    try:
        head = json.loads(raw)
        return int(head["seq"]), str(head["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{_head_path(path)}: damaged head file: {exc}") from exc


def _write_head(path: Path, seq: int, last_hash: str, fsync: Callable[[int], None]) -> None:
    write_atomic(_head_path(path), canonical({"seq": seq, "hash": last_hash}) + b"\n", fsync=fsync)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
