"""The policies directory: edits, rejections, ConfigMap symlink swaps, removals, duplicates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from rollguard.policy.loader import parse_rollout
from rollguard.policy.state import RolloutState
from rollguard.policy.watcher import Applied, PolicyDirectory, Rejected, Removed


def policy(
    name: str = "fraud",
    *,
    model: str = "fraud",
    candidate: str = "1.1.0",
    max_errors: float = 0.01,
    strategy: str = "canary",
    interval: str = "5s",
) -> str:
    return f"""\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: {name}}}
spec:
  model: {model}
  stable: "1.0.0"
  candidate: "{candidate}"
  strategy: {strategy}
  key: header:x-user-id
  interval: {interval}
  steps:
    - {{weight: 10, hold: 5s}}
    - {{weight: 100}}
  checks:
    - {{metric: error_rate, max: {max_errors}}}
"""


def test_first_scan_applies_and_an_unchanged_directory_is_quiet(tmp_path: Path) -> None:
    (tmp_path / "fraud.yaml").write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    [event] = watcher.scan()
    assert isinstance(event, Applied)
    assert (event.name, event.path, event.changed_fields) == ("fraud", tmp_path / "fraud.yaml", ())
    assert event.previous is None
    assert watcher.current() == {"fraud": event.rollout}
    assert watcher.scan() == []


def test_valid_edit_applies_with_changed_fields(tmp_path: Path) -> None:
    path = tmp_path / "fraud.yaml"
    path.write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    [first] = watcher.scan()
    path.write_text(policy(max_errors=0.02, interval="2s"))
    [event] = watcher.scan()
    assert isinstance(event, Applied)
    assert event.changed_fields == ("spec.checks.0.max", "spec.interval")
    assert isinstance(first, Applied) and event.previous == first.rollout
    assert watcher.current()["fraud"].spec.checks[0].max == 0.02
    assert RolloutState.initial(event.previous, 0.0).same_rollout(event.rollout)  # keeps progress


def test_invalid_edit_is_rejected_with_line_and_the_last_good_stays(tmp_path: Path) -> None:
    path = tmp_path / "fraud.yaml"
    path.write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    watcher.scan()
    good = watcher.current()["fraud"]
    path.write_text(policy(strategy="canery"))
    [event] = watcher.scan()
    assert isinstance(event, Rejected)
    assert event.error.startswith(f"{path}:8: spec.strategy: ")
    assert (event.name, event.line, event.path) == ("fraud", 8, path)
    assert watcher.current() == {"fraud": good}
    assert watcher.scan() == []  # reported once, not on every poll
    path.write_text("spec: [unclosed\n")
    [syntax] = watcher.scan()
    assert isinstance(syntax, Rejected) and syntax.error.startswith(f"{path}:2: YAML: ")
    assert watcher.current() == {"fraud": good}
    path.write_text(policy())  # back to the last good text: applied again, nothing changed
    [fixed] = watcher.scan()
    assert isinstance(fixed, Applied) and fixed.changed_fields == ()


def test_a_file_first_seen_invalid_is_rejected_without_a_name(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(policy(name="Not A Name"))
    watcher = PolicyDirectory(tmp_path)
    [event] = watcher.scan()
    assert isinstance(event, Rejected) and event.name is None and event.line == 3
    assert watcher.current() == {}


def _configmap_version(root: Path, stamp: str, files: dict[str, str], mtime: float) -> str:
    version = root / f"..{stamp}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
        os.utime(version / name, (mtime, mtime))
    return version.name


def test_configmap_atomic_symlink_swap_is_seen_even_with_equal_mtimes(tmp_path: Path) -> None:
    mtime = 1_700_000_000.0
    first = _configmap_version(tmp_path, "2026_11_23_04_26_00.1", {"fraud.yaml": policy()}, mtime)
    (tmp_path / "..data").symlink_to(first)
    (tmp_path / "fraud.yaml").symlink_to("..data/fraud.yaml")
    watcher = PolicyDirectory(tmp_path)
    [applied] = watcher.scan()
    assert isinstance(applied, Applied) and applied.path == tmp_path / "fraud.yaml"

    # What the kubelet does: a new timestamped directory, a temporary symlink to it,
    # renamed over ..data in one step, then the old directory goes.
    second = _configmap_version(
        tmp_path, "2026_11_23_04_27_00.2", {"fraud.yaml": policy(max_errors=0.05)}, mtime
    )
    (tmp_path / "..data_tmp").symlink_to(second)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    for leftover in (tmp_path / first).iterdir():
        leftover.unlink()
    (tmp_path / first).rmdir()

    [event] = watcher.scan()
    assert isinstance(event, Applied)
    assert event.changed_fields == ("spec.checks.0.max",)
    assert watcher.current()["fraud"].spec.checks[0].max == 0.05


def test_configmap_key_dropped_is_removed(tmp_path: Path) -> None:
    first = _configmap_version(tmp_path, "v1", {"fraud.yaml": policy()}, 1.0)
    (tmp_path / "..data").symlink_to(first)
    (tmp_path / "fraud.yaml").symlink_to("..data/fraud.yaml")
    watcher = PolicyDirectory(tmp_path)
    watcher.scan()
    second = _configmap_version(tmp_path, "v2", {}, 1.0)
    (tmp_path / "..data_tmp").symlink_to(second)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    # The visible symlink now dangles (the kubelet removes it a moment later).
    assert watcher.scan() == [Removed("fraud", tmp_path / "fraud.yaml")]
    assert watcher.current() == {}


def test_removal(tmp_path: Path) -> None:
    (tmp_path / "fraud.yaml").write_text(policy())
    (tmp_path / "other.yml").write_text(policy("other", model="other"))
    watcher = PolicyDirectory(tmp_path)
    assert {e.name for e in watcher.scan() if isinstance(e, Applied)} == {"fraud", "other"}
    (tmp_path / "fraud.yaml").unlink()
    assert watcher.scan() == [Removed("fraud", tmp_path / "fraud.yaml")]
    assert set(watcher.current()) == {"other"}


def test_removing_a_rejected_file_removes_its_last_good_rollout(tmp_path: Path) -> None:
    path = tmp_path / "fraud.yaml"
    path.write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    watcher.scan()
    path.write_text("not: [valid")
    watcher.scan()
    path.unlink()
    assert watcher.scan() == [Removed("fraud", path)]


def test_duplicate_name_is_rejected_naming_both_files_until_the_first_goes(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(policy())
    b.write_text(policy(candidate="1.2.0"))
    watcher = PolicyDirectory(tmp_path)
    applied, rejected = watcher.scan()
    assert isinstance(applied, Applied) and applied.path == a
    assert isinstance(rejected, Rejected) and rejected.path == b
    assert rejected.error == f"{b}:3: metadata.name: 'fraud' is already declared by {a}"
    assert watcher.current()["fraud"].spec.candidate == "1.1.0"
    assert watcher.scan() == []
    a.unlink()
    [taken_over] = watcher.scan()  # b's version replaces a's: an edit, not a removal
    assert isinstance(taken_over, Applied) and taken_over.path == b
    assert taken_over.changed_fields == ("spec.candidate",)
    assert watcher.current()["fraud"].spec.candidate == "1.2.0"


def test_two_rollouts_of_one_model_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("fraud-a"))
    (tmp_path / "b.yaml").write_text(policy("fraud-b"))
    _, rejected = PolicyDirectory(tmp_path).scan()
    assert isinstance(rejected, Rejected)
    assert rejected.error == (
        f"{tmp_path / 'b.yaml'}:5: spec.model: 'fraud' is already declared by {tmp_path / 'a.yaml'}"
    )


def test_renaming_a_rollout_removes_the_old_name(tmp_path: Path) -> None:
    path = tmp_path / "fraud.yaml"
    path.write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    watcher.scan()
    path.write_text(policy("fraud-v2"))
    removed, applied = watcher.scan()
    assert removed == Removed("fraud", path)
    assert isinstance(applied, Applied) and applied.name == "fraud-v2"
    assert applied.previous is None
    assert set(watcher.current()) == {"fraud-v2"}


def test_hidden_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / ".fraud.yaml.swp").write_text("junk")
    (tmp_path / ".hidden.yaml").write_text("junk")
    (tmp_path / "README.md").write_text("junk")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert PolicyDirectory(tmp_path).scan() == []
    assert PolicyDirectory(tmp_path / "absent").scan() == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),
        ({"max_errors": 0.5}, True),
        ({"interval": "1s"}, True),
        ({"candidate": "1.2.0"}, False),
        ({"model": "fraud-onnx"}, False),
        ({"strategy": "blue_green"}, False),
    ],
)
def test_an_edit_keeps_progress_unless_it_names_another_rollout(
    changes: dict[str, Any], expected: bool
) -> None:
    old = parse_rollout(policy(), "old.yaml")
    new = parse_rollout(policy(**changes), "new.yaml")
    assert RolloutState.initial(old, 0.0).same_rollout(new) is expected


def test_renaming_the_file_moves_the_rollout_without_removing_it(tmp_path: Path) -> None:
    old = tmp_path / "fraud.yaml"
    old.write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    [first] = watcher.scan()
    old.rename(tmp_path / "fraud-canary.yaml")
    [moved] = watcher.scan()
    assert isinstance(first, Applied) and isinstance(moved, Applied)
    assert moved.path == tmp_path / "fraud-canary.yaml"
    assert (moved.previous, moved.changed_fields) == (first.rollout, ())
    assert watcher.path_of("fraud") == tmp_path / "fraud-canary.yaml"


def test_a_broken_file_never_blocks_the_others(tmp_path: Path) -> None:
    """A deep or aliased file is that file's Rejected; edits and deletions elsewhere in the
    same scan still apply, and keep applying on later scans."""
    (tmp_path / "fraud.yaml").write_text(policy())
    (tmp_path / "iris.yaml").write_text(policy("iris", model="iris"))
    watcher = PolicyDirectory(tmp_path)
    watcher.scan()
    (tmp_path / "deep.yaml").write_text("spec: " + "[" * 100_000 + "]" * 100_000)
    (tmp_path / "bomb.yaml").write_text("a: &a [x, x]\nb: [*a, *a]\n")
    (tmp_path / "fraud.yaml").write_text(policy(max_errors=0.05))
    (tmp_path / "iris.yaml").unlink()
    events = watcher.scan()
    rejected = {e.path.name: e.error for e in events if isinstance(e, Rejected)}
    assert "nested deeper than" in rejected["deep.yaml"]
    assert "anchors and aliases are not allowed" in rejected["bomb.yaml"]
    assert Removed("iris", tmp_path / "iris.yaml") in events
    assert watcher.current()["fraud"].spec.checks[0].max == 0.05
    (tmp_path / "fraud.yaml").write_text(policy(max_errors=0.07))
    [event] = watcher.scan()  # the broken files, unchanged, stay quiet
    assert isinstance(event, Applied) and event.rollout.spec.checks[0].max == 0.07
    assert set(watcher.rejected()) == {tmp_path / "deep.yaml", tmp_path / "bomb.yaml"}


def test_rejection_status_persists_until_the_file_changes(tmp_path: Path) -> None:
    unreadable = tmp_path / "broken.yaml"
    # Root reads any file whatever its mode; /proc/self/mem opens and then fails to read.
    unreadable.symlink_to("/proc/self/mem")
    (tmp_path / "fraud.yaml").write_text(policy())
    watcher = PolicyDirectory(tmp_path)
    [*_, first] = sorted(watcher.scan(), key=lambda e: isinstance(e, Rejected))
    assert isinstance(first, Rejected) and "cannot read" in first.error
    for _ in range(3):
        assert watcher.scan() == []  # no new event ...
        assert set(watcher.rejected()) == {unreadable}  # ... and still rejected
    unreadable.unlink()
    watcher.scan()
    assert watcher.rejected() == {}


def test_a_vanished_directory_keeps_what_is_loaded(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    root.mkdir()
    (root / "fraud.yaml").write_text(policy())
    watcher = PolicyDirectory(root)
    watcher.scan()
    loaded = watcher.current()
    root.rename(tmp_path / "elsewhere")
    assert watcher.scan() == []  # not Removed: an unmounted volume is not a decision
    assert watcher.current() == loaded and watcher.missing is not None
    (tmp_path / "elsewhere").rename(root)
    assert watcher.scan() == [] and watcher.missing is None
    (root / "fraud.yaml").unlink()
    assert watcher.scan() == [Removed("fraud", root / "fraud.yaml")]


def _rollout_text(name: str, candidate: str) -> str:
    return policy().replace("name: fraud", f"name: {name}").replace('"1.1.0"', f'"{candidate}"')


def test_a_file_broken_while_running_resumes_its_kept_version_unless_a_valid_file_claims_it(
    tmp_path: Path,
) -> None:
    """The last good content of each file is kept (`last_good`); a start that finds the
    file broken runs that version. A valid file claiming the same model wins over a kept
    copy, and the kept copy is not held pending to apply later (found in review)."""
    policies, kept = tmp_path / "policies", tmp_path / "state" / "policies"
    policies.mkdir()
    (policies / "z.yaml").write_text(_rollout_text("fraud", "1.1.0"))
    PolicyDirectory(policies, last_good=kept).scan()
    (policies / "z.yaml").write_text("spec: [broken\n")
    alone = PolicyDirectory(policies, last_good=kept)  # a restart
    events = alone.scan()
    assert [type(e).__name__ for e in events] == ["Rejected", "Applied"]
    assert alone.current()["fraud"].spec.candidate == "1.1.0"
    assert (
        "its last good version, kept in the state directory, runs"
        in (alone.rejected()[policies / "z.yaml"])
    )
    (policies / "c.yaml").write_text(_rollout_text("fraud-b", "1.2.0"))  # same model
    contested = PolicyDirectory(policies, last_good=kept)
    contested.scan()
    assert {n: r.spec.candidate for n, r in contested.current().items()} == {"fraud-b": "1.2.0"}
    (policies / "c.yaml").unlink()
    contested.scan()
    assert contested.current() == {}  # the kept copy never applies by itself later
