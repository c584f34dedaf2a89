"""The append-only, hash-chained audit log (`audit.jsonl`) and its verification.

Each line is the canonical JSON (sorted keys, no spaces) of one entry:
seq, ts, kind, rollout, actor, data, prev (the previous entry's hash, "0"*64 first)
and hash (sha256 of the entry's canonical JSON without `hash`). Changing, inserting,
removing or reordering a line breaks the chain at that line. Removing lines from the
end leaves a shorter valid chain, so every append also records the last seq and hash
in a head file beside the log (`audit.jsonl.head`), and verification compares them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rollguard.policy.errors import AuditError
from rollguard.policy.store import sync_directory, write_atomic

GENESIS = "0" * 64
_FIELDS = ("seq", "ts", "kind", "rollout", "actor", "data", "prev", "hash")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int  # lines that verified before the first bad one (all of them when ok)
    first_bad_line: int | None = None  # 1-based
    reason: str | None = None


class AuditLog:
    """Appends entries to one audit log; safe to call from several threads."""

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        *,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        # Wall clock on purpose: `ts` is a record for people, not a deadline.
        self.path = path
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.Lock()
        self._broken: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = _open_chain(path, fsync)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._seq == 0:
            sync_directory(path.parent, fsync=fsync)  # the new log's entry must be durable

    @property
    def head(self) -> tuple[int, str]:
        """The last entry's seq and hash (0 and GENESIS for an empty log)."""
        return self._seq, self._prev

    def append(
        self, kind: str, rollout: str | None, actor: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write one entry durably and return it as stored; AuditError if it cannot be."""
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
                entry["hash"] = hashlib.sha256(_canonical(entry)).hexdigest()
                line = _canonical(entry) + b"\n"
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


def verify(path: Path) -> VerifyResult:
    """Check every line's hash, seq and prev link, then the tail against the head file."""
    try:
        head = _read_head(path)
    except AuditError as exc:
        return VerifyResult(False, 0, None, str(exc))
    head_seq, head_hash = head if head is not None else (0, GENESIS)
    prev, count, hash_at_head = GENESIS, 0, GENESIS
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                entry, problem = _check_line(raw, lineno, prev)
                if entry is None:
                    return VerifyResult(False, count, lineno, problem)
                prev, count = entry["hash"], lineno
                if lineno == head_seq:
                    hash_at_head = prev
    except FileNotFoundError:
        pass  # no log is an empty log; the head decides whether that is right
    except OSError as exc:
        return VerifyResult(False, count, None, f"{path}: cannot read: {exc}")
    if head_seq > count:
        return VerifyResult(
            False,
            count,
            count + 1,
            f"the log ends at entry {count} but its head records entry {head_seq}: "
            "entries were removed from the end",
        )
    if hash_at_head != head_hash:
        return VerifyResult(
            False, head_seq - 1, head_seq, f"entry {head_seq} does not match the head's hash"
        )
    # One entry past the head is a crash between appending and recording the head.
    if count > head_seq + 1:
        return VerifyResult(
            False,
            head_seq + 1,
            head_seq + 2,
            f"entries after {head_seq + 1} are not recorded in the head"
            + ("" if head is not None else " (head file missing)"),
        )
    return VerifyResult(True, count)


def read_entries(
    path: Path, *, since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """Entries with since <= ts < until (naive datetimes are UTC); unverified."""
    lo, hi = _utc(since), _utc(until)
    entries: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    entry = json.loads(raw)
                    ts = datetime.fromisoformat(entry["ts"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditError(f"{path}:{lineno}: unreadable audit entry: {exc}") from exc
                if (lo is None or ts >= lo) and (hi is None or ts < hi):
                    entries.append(entry)
    except FileNotFoundError:
        return []
    return entries


def export(
    path: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: Literal["json", "csv"] = "json",
) -> str:
    """The entries in [since, until) as a JSON array or as CSV (data as a JSON column)."""
    entries = read_entries(path, since=since, until=until)
    if fmt == "json":
        return json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}; expected 'json' or 'csv'")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_FIELDS)
    for e in entries:
        row = {**e, "data": _canonical(e.get("data")).decode("utf-8")}
        writer.writerow(["" if row.get(k) is None else row[k] for k in _FIELDS])
    return out.getvalue()


def _open_chain(path: Path, fsync: Callable[[int], None]) -> tuple[int, str]:
    """Where the chain continues: the verified last entry, reconciled with the head."""
    tail = _last_line(path)
    if tail is None:
        seq, last_hash, prev = 0, GENESIS, GENESIS
    else:
        entry, problem = _check_line(tail, None, None)
        if entry is None:
            raise AuditError(
                f"{path}: the last entry is damaged ({problem}); not appending "
                "to a broken chain: run `rollguard audit verify`"
            )
        seq, last_hash, prev = entry["seq"], entry["hash"], entry["prev"]
    head = _read_head(path)
    head_seq, head_hash = head if head is not None else (0, GENESIS)
    if (head_seq, head_hash) == (seq, last_hash):
        return seq, last_hash
    if (head_seq, head_hash) == (seq - 1, prev):
        _write_head(path, seq, last_hash, fsync)  # finish an append a crash interrupted
        return seq, last_hash
    raise AuditError(
        f"{path}: the log ends at entry {seq} but its head records entry {head_seq}; "
        "entries were removed or the log replaced: run `rollguard audit verify`"
    )


def _check_line(
    raw: bytes, lineno: int | None, prev: str | None
) -> tuple[dict[str, Any] | None, str]:
    """(entry, "") if the line is intact and follows `prev` as entry `lineno`."""
    if not raw.endswith(b"\n"):
        return None, "incomplete line (no newline): the log was truncated"
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        return None, f"not an audit entry (expected the fields {', '.join(_FIELDS)})"
    body = {k: v for k, v in entry.items() if k != "hash"}
    if hashlib.sha256(_canonical(body)).hexdigest() != entry["hash"]:
        return None, "hash mismatch: the entry was changed"
    if _canonical(entry) + b"\n" != raw:
        return None, "not in canonical form: the line was edited"
    if lineno is not None and entry["seq"] != lineno:
        return None, (
            f"seq is {entry['seq']}, expected {lineno}: a line was removed, inserted or moved"
        )
    if prev is not None and entry["prev"] != prev:
        return None, "prev does not match the previous entry's hash"
    return entry, ""


def _last_line(path: Path) -> bytes | None:
    """The file's last line (with its newline, if it has one), reading from the end."""
    try:
        with open(path, "rb") as f:
            pos = f.seek(0, os.SEEK_END)
            tail = b""
            while pos > 0:
                step = min(4096, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                if (cut := tail.rfind(b"\n", 0, len(tail) - 1)) >= 0:
                    return tail[cut + 1 :]
            return tail or None
    except FileNotFoundError:
        return None


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        raw = _head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{_head_path(path)}: cannot read: {exc}") from exc
    try:
        head = json.loads(raw)
        return int(head["seq"]), str(head["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{_head_path(path)}: damaged head file: {exc}") from exc


def _write_head(path: Path, seq: int, last_hash: str, fsync: Callable[[int], None]) -> None:
    write_atomic(_head_path(path), _canonical({"seq": seq, "hash": last_hash}) + b"\n", fsync=fsync)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _canonical(value: object) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
