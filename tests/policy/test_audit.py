"""The audit log: chained appends, tamper detection at the right line, export by time range."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy.audit import (
    GENESIS,
    AuditLog,
    VerifyResult,
    adopt_key,
    export,
    read_entries,
    verify,
)
from rollguard.policy.errors import AuditError
from rollguard.policy.keys import AuditKey

T0 = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)
N = 20
Lines = list[bytes]


def make_log(path: Path, n: int = N) -> Path:
    ticks = iter(range(n))
    with AuditLog(path, clock=lambda: (T0 + timedelta(minutes=next(ticks))).timestamp()) as log:
        for i in range(n):
            kind = "admin" if i % 5 == 0 else "decision"
            log.append(kind, "fraud", "engine", {"i": i, "weight": i * 5.0, "note": "é"})
    return path


def lines_of(path: Path) -> Lines:
    return path.read_bytes().splitlines(keepends=True)


def canonical(entry: dict[str, object]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_entries_are_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, clock=lambda: T0.timestamp()) as log:
        first = log.append("policy_applied", "fraud", "watcher", {"file": "fraud.yaml"})
        second = log.append("admin", None, "alice", {"action": "pause"})
        assert log.head == (2, second["hash"])
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["ts"] == "2026-11-23T04:00:00.000000Z"
    assert second["prev"] == first["hash"]
    body = {k: v for k, v in second.items() if k != "hash"}
    assert second["hash"] == hashlib.sha256(canonical(body)).hexdigest()
    assert lines_of(path) == [canonical(first) + b"\n", canonical(second) + b"\n"]
    assert verify(path).ok


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 3)
    with AuditLog(path) as log:
        entry = log.append("admin", "fraud", "bob", {})
    assert entry["seq"] == 4
    assert entry["prev"] == json.loads(lines_of(path)[2])["hash"]
    assert verify(path) == VerifyResult(True, 4)


def _change(k: int) -> Callable[[Lines], Lines]:
    def tamper(lines: Lines) -> Lines:
        entry = json.loads(lines[k - 1])
        entry["data"]["weight"] = 100.0  # still canonical JSON: only the hash can tell
        return [*lines[: k - 1], canonical(entry) + b"\n", *lines[k:]]

    return tamper


def _rehash(k: int) -> Callable[[Lines], Lines]:
    def tamper(lines: Lines) -> Lines:
        entry = json.loads(lines[k - 1])
        entry["actor"] = "mallory"
        entry["hash"] = hashlib.sha256(
            canonical({key: v for key, v in entry.items() if key != "hash"})
        ).hexdigest()
        return [*lines[: k - 1], canonical(entry) + b"\n", *lines[k:]]

    return tamper


def _delete(k: int) -> Callable[[Lines], Lines]:
    return lambda lines: [*lines[: k - 1], *lines[k:]]


def _swap(k: int) -> Callable[[Lines], Lines]:
    return lambda lines: [*lines[: k - 1], lines[k], lines[k - 1], *lines[k + 1 :]]


def _insert_copy(k: int) -> Callable[[Lines], Lines]:
    return lambda lines: [*lines[:k], lines[k - 1], *lines[k:]]


def _reformat(k: int) -> Callable[[Lines], Lines]:
    def tamper(lines: Lines) -> Lines:
        pretty = json.dumps(json.loads(lines[k - 1]), sort_keys=True).encode() + b"\n"
        return [*lines[: k - 1], pretty, *lines[k:]]

    return tamper


CASES = [
    *[(f"change line {k}", _change(k), k) for k in range(1, N + 1)],
    # A rewritten entry with a correct own hash breaks the next link (or the head).
    *[(f"rehash line {k}", _rehash(k), min(k + 1, N)) for k in range(1, N + 1)],
    *[(f"delete line {k}", _delete(k), k) for k in range(1, N + 1)],
    *[(f"swap lines {k},{k + 1}", _swap(k), k) for k in range(1, N)],
    *[(f"insert a copy of line {k}", _insert_copy(k), k + 1) for k in range(1, N + 1)],
    *[(f"reformat line {k}", _reformat(k), k) for k in (1, 10, N)],
    ("truncate the last line", lambda lines: [*lines[:-1], lines[-1][:40]], N),
    ("drop the final newline", lambda lines: [*lines[:-1], lines[-1][:-1]], N),
    ("blank line inserted", lambda lines: [*lines[:5], b"\n", *lines[5:]], 6),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 20-entry log, built once: every tampering test starts from a copy of it."""
    return make_log(tmp_path_factory.mktemp("pristine") / "audit.jsonl")


def copy_log(source: Path, directory: Path) -> Path:
    for name in ("audit.jsonl", "audit.jsonl.head"):
        (directory / name).write_bytes((source.parent / name).read_bytes())
    return directory / "audit.jsonl"


@pytest.mark.parametrize(("tamper", "bad_line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tampering_is_found_at_its_line(
    tmp_path: Path, pristine: Path, tamper: Callable[[Lines], Lines], bad_line: int
) -> None:
    path = copy_log(pristine, tmp_path)
    assert verify(path) == VerifyResult(True, N)
    path.write_bytes(b"".join(tamper(lines_of(path))))
    result = verify(path)
    assert not result.ok
    assert result.first_bad_line == bad_line, result.reason
    assert result.entries <= bad_line - 1
    assert result.reason


DAMAGE = pytest.mark.parametrize(
    ("tamper", "bad_line"),
    [(_delete(N), N), (lambda lines: [*lines[:-1], lines[-1][:40]], N), (_change(N), N)],
    ids=["last line deleted", "last line cut (head records it)", "last line changed"],
)


@DAMAGE
def test_a_damaged_log_is_refused_when_so_configured(
    tmp_path: Path, pristine: Path, tamper: Callable[[Lines], Lines], bad_line: int
) -> None:
    path = copy_log(pristine, tmp_path)
    path.write_bytes(b"".join(tamper(lines_of(path))))
    before = path.read_bytes()
    with pytest.raises(AuditError, match=f"broken at line {bad_line}.*audit_refuse_broken"):
        AuditLog(path, refuse_broken=True)
    assert path.read_bytes() == before  # refused: nothing written
    assert not verify(path).ok


@DAMAGE
def test_a_damaged_log_is_reported_recorded_and_continued(
    tmp_path: Path, pristine: Path, tamper: Callable[[Lines], Lines], bad_line: int
) -> None:
    path = copy_log(pristine, tmp_path)
    path.write_bytes(b"".join(tamper(lines_of(path))))
    with AuditLog(path) as log:
        assert not log.chain_ok and log.problem and f"line {bad_line}" in log.problem
        log.append("decision", "fraud", "engine", {"after": "the break"})
    *_, brk, after = [json.loads(line) for line in lines_of(path)]
    assert brk["kind"] == "chain_break" and brk["data"]["line"] == bad_line
    assert after["prev"] == brk["hash"]
    result = verify(path)
    assert not result.ok and result.first_bad_line is not None
    assert result.first_bad_line <= bad_line + 1
    with AuditLog(path) as again:  # the break is recorded once, not at every start
        assert not again.chain_ok
    assert [json.loads(line)["kind"] for line in lines_of(path)].count("chain_break") == 1


def test_removing_the_head_file_is_detected(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 3)
    (tmp_path / "audit.jsonl.head").unlink()
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    with pytest.raises(AuditError, match="head file missing"):
        AuditLog(path, refuse_broken=True)


def test_a_torn_last_line_is_cut_and_the_repair_recorded(tmp_path: Path) -> None:
    """What a crash mid-append leaves: part of a line, the head still at the entry before."""
    path = make_log(tmp_path / "audit.jsonl", 3)
    torn = b'{"actor":"engine","data":{"action":"rollb'
    with path.open("ab") as f:
        f.write(torn)
    assert not verify(path).ok
    with AuditLog(path, refuse_broken=True) as log:  # a crash is not a broken chain
        assert log.chain_ok and log.problem is None
        assert log.head[0] == 4
    repair = json.loads(lines_of(path)[-1])
    assert repair["kind"] == "repair" and repair["seq"] == 4
    assert repair["data"]["dropped_bytes"] == len(torn)
    assert repair["data"]["dropped"] == torn.decode()
    assert repair["data"]["dropped_sha256"] == hashlib.sha256(torn).hexdigest()
    assert verify(path) == VerifyResult(True, 4)


def test_crash_between_append_and_head_update_is_tolerated(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 4)
    head = tmp_path / "audit.jsonl.head"
    # The head as it was before the fourth append: the log is one entry ahead.
    third = json.loads(lines_of(path)[2])
    head.write_text(json.dumps({"seq": 3, "hash": third["hash"]}))
    assert verify(path).ok
    with AuditLog(path) as log:  # opening finishes the interrupted append
        assert log.head[0] == 4
        log.append("admin", "fraud", "bob", {})
    assert verify(path).entries == 5


def test_failed_append_stops_the_log(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 2)
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    log = AuditLog(path, fsync=failing_fsync)
    with pytest.raises(AuditError, match="No space left"):
        log.append("decision", "fraud", "engine", {})
    with pytest.raises(AuditError, match="append failed"):
        log.append("decision", "fraud", "engine", {})
    assert calls["n"] == 1
    log.close()


def test_unserialisable_data_is_refused_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        with pytest.raises(AuditError, match="not JSON-serialisable"):
            log.append("decision", "fraud", "engine", {"x": object()})
        assert log.append("decision", "fraud", "engine", {"x": 1})["seq"] == 1
    assert verify(path).ok


def test_concurrent_appends_from_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:

        def worker(w: int) -> None:
            for i in range(25):
                log.append("decision", f"r{w}", "engine", {"i": i})

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert verify(path) == VerifyResult(True, 100)


def test_missing_log_verifies_as_empty(tmp_path: Path) -> None:
    assert verify(tmp_path / "audit.jsonl").ok
    assert read_entries(tmp_path / "audit.jsonl") == []


def test_export_by_time_range(pristine: Path) -> None:
    path = pristine
    since, until = T0 + timedelta(minutes=5), T0 + timedelta(minutes=8)
    chosen = json.loads(export(path, since=since, until=until, fmt="json"))
    assert [e["seq"] for e in chosen] == [6, 7, 8]  # since inclusive, until exclusive
    assert len(json.loads(export(path))) == N
    naive = since.replace(tzinfo=None)  # naive datetimes are read as UTC
    assert [e["seq"] for e in json.loads(export(path, since=naive))] == list(range(6, N + 1))
    assert json.loads(export(path, until=T0)) == []


def test_export_csv(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 3)
    rows = list(csv.DictReader(io.StringIO(export(path, fmt="csv"))))
    assert [r["seq"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == [
        *("seq", "ts", "kind", "rollout", "actor", "data", "prev", "hash", "key")
    ]
    assert rows[0]["kind"] == "admin" and rows[0]["prev"] == GENESIS
    assert json.loads(rows[1]["data"]) == {"i": 1, "weight": 5.0, "note": "é"}
    assert rows[2]["hash"] == json.loads(lines_of(path)[2])["hash"]


KEY = AuditKey(b"k" * 32)
OTHER = AuditKey(b"o" * 32)


def make_keyed(path: Path, n: int = 5, key: AuditKey = KEY) -> Path:
    with AuditLog(path, key=key) as log:
        for i in range(n):
            log.append("decision", "fraud", "engine", {"i": i})
    return path


def forge_plain(path: Path, edit: Callable[[dict[str, object]], None]) -> None:
    """What someone without the key can do: rewrite entries and recompute the plain chain."""
    prev, out = GENESIS, []
    for line in lines_of(path):
        entry = json.loads(line)
        entry.pop("key", None)
        edit(entry)
        entry["prev"] = prev
        body = {k: v for k, v in entry.items() if k != "hash"}
        entry["hash"] = prev = hashlib.sha256(canonical(body)).hexdigest()
        out.append(canonical(entry) + b"\n")
    path.write_bytes(b"".join(out))
    head = path.with_name(path.name + ".head")
    head.write_bytes(canonical({"seq": len(out), "hash": prev}) + b"\n")


def test_a_keyed_chain_verifies_with_its_key_only(tmp_path: Path) -> None:
    path = make_keyed(tmp_path / "audit.jsonl")
    entries = [json.loads(line) for line in lines_of(path)]
    assert {e["key"] for e in entries} == {KEY.id}
    assert verify(path, KEY) == VerifyResult(True, 5, keyed=True)
    without = verify(path)
    assert not without.ok and "needs the key" in str(without.reason)
    other = verify(path, OTHER)
    assert not other.ok and KEY.id in str(other.reason)
    with pytest.raises(AuditError, match="needs the key"):
        AuditLog(path)  # no unkeyed entries after keyed ones
    with pytest.raises(AuditError, match="not the configured key"):
        AuditLog(path, key=OTHER)


def test_a_recomputed_chain_is_detected_under_the_key(tmp_path: Path) -> None:
    """The forgery of the issue: an automatic rollback erased, the chain recomputed."""
    path = make_keyed(tmp_path / "audit.jsonl")

    def erase(entry: dict[str, object]) -> None:
        entry["data"] = {"i": "nothing happened"}

    forge_plain(path, erase)
    assert verify(path).ok  # without the key a plain chain cannot tell
    result = verify(path, KEY)
    assert not result.ok and "no entry of the audit log is sealed" in str(result.reason)
    with pytest.raises(AuditError, match="no entry of the audit log is sealed"):
        AuditLog(path, key=KEY)


def test_an_entry_rehashed_without_the_key_breaks_the_keyed_chain(tmp_path: Path) -> None:
    path = make_keyed(tmp_path / "audit.jsonl")
    lines = lines_of(path)
    entry = json.loads(lines[2])
    entry["actor"] = "mallory"
    entry["hash"] = hashlib.sha256(
        canonical({k: v for k, v in entry.items() if k != "hash"})
    ).hexdigest()
    path.write_bytes(b"".join([*lines[:2], canonical(entry) + b"\n", *lines[3:]]))
    result = verify(path, KEY)
    assert (result.ok, result.first_bad_line) == (False, 3) and "MAC" in str(result.reason)


def test_adopting_a_key_seals_an_unkeyed_log_from_then_on(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 3)
    with pytest.raises(AuditError, match="adopt-key"):
        AuditLog(path, key=KEY)
    adopted = adopt_key(path, KEY)
    assert (adopted["kind"], adopted["seq"], adopted["key"]) == ("audit_keyed", 4, KEY.id)
    with AuditLog(path, key=KEY) as log:
        assert log.chain_ok
        log.append("admin", "fraud", "alice", {})
    assert verify(path, KEY) == VerifyResult(True, 5, keyed=True)
    with pytest.raises(AuditError, match="already sealed"):
        adopt_key(path, KEY)
    # An unkeyed entry slipped in after the keyed ones is found.
    lines = lines_of(path)
    forge_plain(path, lambda entry: None)
    path.write_bytes(b"".join([*lines, lines_of(path)[0]]))
    assert not verify(path, KEY).ok


def test_files_are_private_and_never_opened_through_a_link(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 2)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.with_name("audit.jsonl.head").stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)  # a log from before: tightened at open
    AuditLog(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "audit.jsonl"
    target.write_bytes(path.read_bytes())
    linked = elsewhere / "state"
    linked.mkdir()
    (linked / "audit.jsonl").symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog(linked / "audit.jsonl")
    assert not verify(linked / "audit.jsonl").ok
    with pytest.raises(AuditError, match="symbolic link"):
        read_entries(linked / "audit.jsonl")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    where=st.floats(0, 1, exclude_max=True),
    byte=st.integers(0, 255),
)
def test_any_changed_byte_fails_keyed_verification(
    tmp_path_factory: pytest.TempPathFactory, n: int, where: float, byte: int
) -> None:
    path = make_keyed(tmp_path_factory.mktemp("prop") / "audit.jsonl", n)
    raw = bytearray(path.read_bytes())
    i = int(where * len(raw))
    if raw[i] == byte:
        return
    raw[i] = byte
    path.write_bytes(bytes(raw))
    assert not verify(path, KEY).ok


def test_a_torn_line_after_an_unrecorded_entry_is_a_break_that_says_so(tmp_path: Path) -> None:
    """The head one entry behind AND a torn line after: two interrupted appends, which one
    crash cannot leave (an append begins only once the previous one's head is written).
    Recorded as a break whose entry keeps its own reason beside the bytes dropped."""
    path = make_log(tmp_path / "audit.jsonl", 4)
    third = json.loads(lines_of(path)[2])
    (tmp_path / "audit.jsonl.head").write_text(json.dumps({"seq": 3, "hash": third["hash"]}))
    torn = b'{"actor":"engine","data":{"action":"rollb'
    with path.open("ab") as f:
        f.write(torn)
    with pytest.raises(AuditError, match="head is one entry behind"):
        AuditLog(path, refuse_broken=True)
    with AuditLog(path) as log:
        assert not log.chain_ok and log.problem and "head is one entry behind" in log.problem
    brk = json.loads(lines_of(path)[-1])
    assert brk["kind"] == "chain_break" and brk["data"]["line"] == 5
    assert "head is one entry behind" in brk["data"]["reason"]
    assert brk["data"]["dropped_bytes"] == len(torn)
    assert brk["data"]["dropped"] == torn.decode()
    assert "head is one entry behind" in str(verify(path).reason)
