"""Rollout state files: round trip, crash safety, and corruption that is never silently reset."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollguard.policy.errors import StateError
from rollguard.policy.store import StateStore

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
