"""Rollout state files: round trip, crash safety, and corruption that is never silently reset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey
from rollguard.policy.store import StateStore, StoredState

REPO = Path(__file__).resolve().parents[2]
STATE = {"phase": "progressing", "step": 2, "weight": 25.0, "approved_by": None, "ci": [0.1, 0.2]}


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load("fraud") is None
    store.save("fraud", STATE)
    store.save("fraud-onnx", {"phase": "rolled_back"})
    assert store.load("fraud") == STATE
    assert store.load("fraud-onnx") == {"phase": "rolled_back"}
    store.save("fraud", {"phase": "promoted"})
    assert store.load("fraud") == {"phase": "promoted"}
    store.delete("fraud")
    assert store.load("fraud") is None
    assert StateStore(tmp_path / "state").load("fraud-onnx") == {"phase": "rolled_back"}


def test_other_files_in_the_state_directory_are_not_states(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("fraud", STATE)
    (tmp_path / "audit.jsonl").write_text('{"seq": 1}\n')
    (tmp_path / ".fraud.json.abc123.tmp").write_text('{"phase": "half-writ')  # a crash's leftover
    (tmp_path / "Not A Name.json").write_text("{}")
    assert store.load("fraud") == STATE
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["Not A Name.json", "fraud.json"]


def test_names_that_are_not_file_names_are_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(StateError, match="not a rollout name"):
            store.save(bad, STATE)


def test_failed_write_keeps_the_previous_state_and_leaves_no_temp_file(tmp_path: Path) -> None:
    StateStore(tmp_path).save("fraud", STATE)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    store = StateStore(tmp_path, fsync=failing_fsync)
    with pytest.raises(StateError, match=r"fraud\.json: cannot write state: .*Input/output"):
        store.save("fraud", {"phase": "rolled_back"})
    assert store.load("fraud") == STATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fraud.json"]


def test_unserialisable_state_is_refused_before_touching_the_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("fraud", STATE)
    with pytest.raises(StateError, match="not JSON-serialisable"):
        store.save("fraud", {"when": object()})
    with pytest.raises(StateError, match="not JSON-serialisable"):
        store.save("fraud", {"ratio": float("nan")})
    assert store.load("fraud") == STATE


def test_crash_after_the_temp_write_leaves_the_old_state(tmp_path: Path) -> None:
    """A real process dies (os._exit) after writing its temp file, before the rename."""
    StateStore(tmp_path).save("fraud", STATE)
    crash = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from rollguard.policy.store import StateStore

        def die(fd: int) -> None:
            os.fsync(fd)
            os._exit(9)

        StateStore(Path({str(tmp_path)!r}), fsync=die).save("fraud", {{"phase": "rolled_back"}})
    """)
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "fraud.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".fraud.json.")
    assert leftovers[0].endswith(".tmp")
    store = StateStore(tmp_path)
    assert store.load("fraud") == STATE
    store.save("fraud", {"phase": "rolled_back"})  # and the next save is unaffected
    assert store.load("fraud") == {"phase": "rolled_back"}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"phase": "progr', "corrupt state file"),
        (b"", "corrupt state file"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe{}", "corrupt state file"),
    ],
)
def test_corrupt_state_raises_naming_the_file(tmp_path: Path, content: bytes, why: str) -> None:
    store = StateStore(tmp_path)
    (tmp_path / "fraud.json").write_bytes(content)
    with pytest.raises(StateError, match=why) as info:
        store.load("fraud")
    assert str(tmp_path / "fraud.json") in str(info.value)


KEY = AuditKey(b"k" * 32)


def test_a_state_file_is_sealed_with_its_name_and_audit_seq(tmp_path: Path) -> None:
    StateStore(tmp_path, key=KEY).save("fraud", STATE, audit_seq=7)
    doc = json.loads((tmp_path / "fraud.json").read_text())
    assert set(doc) == {"audit_seq", "mac", "name", "state"}
    assert (doc["audit_seq"], doc["name"], doc["state"]) == (7, "fraud", STATE)
    assert doc["mac"].startswith(f"hmac-sha256:{KEY.id}:")
    assert (tmp_path / "fraud.json").stat().st_mode & 0o777 == 0o600
    stored = StateStore(tmp_path, key=KEY).read("fraud")
    assert stored == StoredState(STATE, 7, "key")


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d["state"].update(phase="promoted"), "seal does not verify"),
        (lambda d: d.update(audit_seq=8), "seal does not verify"),
        (lambda d: d.update(mac="sha256:" + "0" * 64), "digest does not match"),
        (lambda d: d.update(mac=d["mac"].replace(KEY.id, "f" * 16)), "not the configured key"),
    ],
    ids=["state edited", "seq edited", "seal swapped for a digest", "another key"],
)
def test_an_edited_sealed_state_is_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], why: str
) -> None:
    store = StateStore(tmp_path, key=KEY)
    store.save("fraud", STATE, audit_seq=7)
    doc = json.loads((tmp_path / "fraud.json").read_text())
    edit(doc)
    (tmp_path / "fraud.json").write_text(json.dumps(doc))
    with pytest.raises(StateError, match=why):
        store.load("fraud")


def test_a_copied_state_file_is_not_another_rollouts(tmp_path: Path) -> None:
    store = StateStore(tmp_path, key=KEY)
    store.save("fraud", STATE, audit_seq=3)
    shutil.copy(tmp_path / "fraud.json", tmp_path / "other.json")
    with pytest.raises(StateError, match="not 'other'"):
        store.load("other")


def test_without_a_key_a_digest_catches_hand_edits(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("fraud", STATE, audit_seq=2)
    assert json.loads((tmp_path / "fraud.json").read_text())["mac"].startswith("sha256:")
    assert store.read("fraud") == StoredState(STATE, 2, "plain")
    text = (tmp_path / "fraud.json").read_text().replace("progressing", "promoted")
    (tmp_path / "fraud.json").write_text(text)
    with pytest.raises(StateError, match="changed outside rollguard"):
        store.load("fraud")
    StateStore(tmp_path / "k", key=KEY).save("fraud", STATE)
    with pytest.raises(StateError, match="sealed with audit key"):
        StateStore(tmp_path / "k").load("fraud")  # the key is needed to trust it


def test_a_state_file_is_never_read_through_a_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    StateStore(tmp_path / "a").save("fraud", STATE)
    elsewhere.write_bytes((tmp_path / "a" / "fraud.json").read_bytes())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fraud.json").symlink_to(elsewhere)
    with pytest.raises(StateError, match="symbolic link"):
        StateStore(tmp_path / "b").load("fraud")
    StateStore(tmp_path / "b").save("fraud", {"phase": "rolled_back"})  # replaces the link
    assert not (tmp_path / "b" / "fraud.json").is_symlink()
    assert json.loads(elsewhere.read_text())["state"] == STATE


def test_a_state_file_from_an_older_rollguard_is_read_as_legacy(tmp_path: Path) -> None:
    (tmp_path / "fraud.json").write_text(json.dumps(STATE))
    assert StateStore(tmp_path).read("fraud") == StoredState(STATE, None, "legacy")
