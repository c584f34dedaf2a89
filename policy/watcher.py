"""The policies directory: what changed since the last look, as Applied/Rejected/Removed events.

scan() is synchronous and cheap (list, stat, read a few small files); the caller polls
it. Files are compared by content hash, so a Kubernetes ConfigMap update (an atomic
rename of the `..data` symlink, which may leave every visible mtime unchanged) is seen.
A file that stops validating is Rejected and its last good Rollout stays current. One
rollout per name and per model: a second file claiming either is Rejected, naming both.

A file is one file's problem: whatever reading or parsing it raises becomes its own
Rejected, and the scan goes on to the others. A policies directory that disappears (an
unmounted volume, a ConfigMap being replaced) is treated like a missing registry root:
the rollouts already loaded stay, a warning is logged, and the next scan that finds it
again compares from there. scan() blocks on file I/O and YAML parsing; the gateway
runs it in an executor thread, never on its event loop.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollguard.policy.errors import PolicyInvalid
from rollguard.policy.loader import MAX_POLICY_BYTES, find_line, parse_rollout_bytes
from rollguard.policy.schema import Rollout

log = logging.getLogger("rollguard.policy")


@dataclass(frozen=True, slots=True)
class Applied:
    """A file's Rollout is valid and now current (first seen, edited, moved, re-validated)."""

    name: str
    rollout: Rollout
    path: Path
    changed_fields: tuple[str, ...]  # dotted paths that differ from `previous`
    previous: Rollout | None = None  # the Rollout of this name it replaces, if any


@dataclass(frozen=True, slots=True)
class Rejected:
    """A file does not hold a usable Rollout; `name`'s last good Rollout keeps running."""

    path: Path
    error: str  # `<file>:<line>: <field>: <reason>`, one line per problem
    name: str | None = None  # the rollout this file held before, if any
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    """The file that held rollout `name` is gone (or now declares another name)."""

    name: str
    path: Path


PolicyEvent = Applied | Rejected | Removed


@dataclass(slots=True)
class _Seen:
    digest: str  # sha256 of the content, or of the read error
    name: str | None = None  # the rollout this file holds (its last good one)
    pending: Rollout | None = None  # valid, but its name or model is taken by another file
    text: str = field(default="", repr=False)  # the content, to find lines for messages
    error: str | None = None  # why the file is rejected now, until it changes


@dataclass(frozen=True, slots=True)
class _Current:
    rollout: Rollout
    path: Path


def changed_fields(old: Rollout | None, new: Rollout) -> tuple[str, ...]:
    """Dotted paths of the fields that differ (lists item by item when lengths match)."""
    if old is None:
        return ()
    return tuple(_diff(old.model_dump(), new.model_dump(), ""))


class PolicyDirectory:
    """The Rollout files of one directory and the current good Rollout of each name."""

    def __init__(
        self, root: Path, *, webhook_hosts: tuple[str, ...] = (), last_good: Path | None = None
    ) -> None:
        """`last_good`: a directory (in the state directory) where each file's last applied
        content is kept, so that a file found rejected at start runs its last good version
        as it would have in the process before (None: not kept, e.g. fleet mode)."""
        self.root = root
        self.webhook_hosts = webhook_hosts  # the operator's allow-list (empty allows none)
        self.last_good = last_good
        self._pruned = False  # kept copies of files gone while the gateway was down
        self._resumable: list[tuple[Path, str, str, int | None]] = []  # this scan's
        self.missing: str | None = None  # why the directory cannot be listed, while it cannot
        self._seen: dict[Path, _Seen] = {}
        self._current: dict[str, _Current] = {}
        self._vanished: dict[str, _Current] = {}

    def current(self) -> dict[str, Rollout]:
        """Every rollout now in force, by name (a rejected edit leaves the last good one)."""
        return {name: c.rollout for name, c in self._current.items()}

    def path_of(self, name: str) -> Path | None:
        current = self._current.get(name)
        return current.path if current else None

    def rejected(self) -> dict[Path, str]:
        """Every file rejected now, with why: kept on every scan until the file changes."""
        return {path: seen.error for path, seen in sorted(self._seen.items()) if seen.error}

    def scan(self) -> list[PolicyEvent]:
        """Read the directory and report what changed since the previous scan."""
        files = self._list()
        if files is None:
            return []  # the directory is gone: keep every rollout (see the docstring)
        # Rollouts whose file vanished are reported Removed only at the end: if another
        # file declares the same name in this scan (a renamed file), it is a move.
        self._vanished = {}
        if not self._pruned:
            self._pruned = True
            self._prune_kept({path.name for path in files})
        for path in sorted(self._seen.keys() - files.keys()):
            seen = self._seen.pop(path)
            self._forget_kept(path)
            if seen.name is not None and self.path_of(seen.name) == path:
                self._vanished[seen.name] = self._current.pop(seen.name)
        events: list[PolicyEvent] = []
        self._resumable = []
        for path in sorted(files):
            events.extend(self._consider(path, files[path]))
        for path, digest, error, line in self._resumable:
            events.extend(self._resume(path, digest, error, line))
        self._resumable = []
        # A file rejected as a duplicate may be free to apply now that this scan
        # removed or renamed the rollout it collided with.
        for path, seen in sorted(self._seen.items()):
            if seen.pending is not None and self._owner_conflict(seen.pending, path) is None:
                events.extend(self._apply(path, seen.pending, seen.digest, seen.text))
        events.extend(Removed(name, gone.path) for name, gone in sorted(self._vanished.items()))
        self._vanished = {}
        return events

    def _list(self) -> dict[Path, bytes | OSError] | None:
        found: dict[Path, bytes | OSError] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if self.missing is None:
                log.warning(
                    "policies directory %s cannot be listed (%s); keeping the %d rollout(s) "
                    "loaded until it is back",
                    self.root, reason, len(self._current),
                )  # fmt: skip
            self.missing = reason
            return None
        if self.missing is not None:
            log.warning("policies directory %s is back", self.root)
            self.missing = None
        for entry in entries:
            # `..data` and `..2026_…` are ConfigMap internals; dot-files are editor litter.
            if entry.name.startswith(".") or not entry.name.endswith((".yaml", ".yml")):
                continue
            path = Path(entry.path)
            if not _utf8(entry.path):
                # Its name cannot go into a log line, an audit entry, a metric label or a
                # JSON answer: rejected unread, under its name with the bad bytes replaced.
                shown = Path(os.fsencode(entry.path).decode("utf-8", errors="replace"))
                found[shown] = OSError(errno.EILSEQ, "its name is not UTF-8 text; rename it")
                continue
            try:
                if not entry.is_file():  # follows symlinks; a dangling one is absent
                    continue
                with open(path, "rb") as f:
                    found[path] = f.read(MAX_POLICY_BYTES + 1)
            except FileNotFoundError:
                continue  # deleted between listing and reading
            except OSError as exc:
                found[path] = exc
        return found

    def _consider(self, path: Path, content: bytes | OSError) -> list[PolicyEvent]:
        if isinstance(content, OSError):
            digest = "error:" + str(content)
        else:
            digest = hashlib.sha256(content).hexdigest()
        seen = self._seen.get(path)
        if seen is not None and seen.digest == digest:
            return []
        held = seen.name if seen is not None else None
        line: int | None = None
        if isinstance(content, OSError):
            error = f"{path}: cannot read: {content.strerror or content}"
        else:
            try:
                rollout = parse_rollout_bytes(content, str(path), webhook_hosts=self.webhook_hosts)
            except PolicyInvalid as exc:
                error, line = str(exc), exc.line
            except Exception:  # a bug of ours or the YAML library's: this file's problem only
                log.exception("policy %s could not be parsed", path)
                error = f"{path}:1: (document): could not be parsed (the gateway log has details)"
                line = 1
            else:
                return self._apply(path, rollout, digest, content.decode("utf-8"))
        if seen is None and self.last_good is not None:  # its last good version, if kept:
            self._resumable.append((path, digest, error, line))  # after every file is read
        self._seen[path] = _Seen(digest, held, error=error)
        return [Rejected(path, error, held, line)]

    def _resume(self, path: Path, digest: str, error: str, line: int | None) -> list[PolicyEvent]:
        """A file rejected the first time this process reads it (at start, usually) whose
        last good content is kept: that version runs, as it ran before the restart, and
        the file stays rejected until it is fixed. Without this, a typo made while the
        gateway ran cost nothing until the next start, which dropped the canary (and a
        promoted candidate's traffic went back to the old version). Tried once every
        file of the scan is read, so a valid file claiming the same name or model wins;
        a kept version that would collide is not resumed (nor held pending)."""
        kept = self._kept(path)
        if kept is None:
            return []
        try:
            rollout = parse_rollout_bytes(kept, str(path), webhook_hosts=self.webhook_hosts)
        except Exception:  # kept by an older gateway whose rules were looser: not resumed
            return []
        if self._owner_conflict(rollout, path) is not None:
            return []
        events = self._apply(path, rollout, digest, kept.decode("utf-8"))
        self._seen[
            path
        ].error = f"{error}\n{path}: its last good version, kept in the state directory, runs"
        return events

    def _apply(self, path: Path, rollout: Rollout, digest: str, text: str) -> list[PolicyEvent]:
        seen = self._seen.get(path)
        held = seen.name if seen is not None else None
        conflict = self._owner_conflict(rollout, path)
        if conflict is not None:
            field_name, other = conflict
            line = find_line(text, field_name)
            error = (
                f"{path}:{line or 1}: {field_name}: {_field_value(rollout, field_name)!r} "
                f"is already declared by {other}"
            )
            self._seen[path] = _Seen(digest, held, pending=rollout, text=text, error=error)
            return [Rejected(path, error, held, line)]
        events: list[PolicyEvent] = []
        if held is not None and held != rollout.name and self.path_of(held) == path:
            del self._current[held]
            events.append(Removed(held, path))
        previous = self._current.get(rollout.name) or self._vanished.pop(rollout.name, None)
        old = previous.rollout if previous is not None else None
        self._current[rollout.name] = _Current(rollout, path)
        self._seen[path] = _Seen(digest, rollout.name)
        self._keep(path, text)
        events.append(Applied(rollout.name, rollout, path, changed_fields(old, rollout), old))
        return events

    def _owner_conflict(self, rollout: Rollout, path: Path) -> tuple[str, Path] | None:
        """Another file already holds this rollout's name, or a rollout of the same model."""
        for name, current in self._current.items():
            if current.path == path:
                continue
            if name == rollout.name:
                return "metadata.name", current.path
            if current.rollout.spec.model == rollout.spec.model:
                return "spec.model", current.path
        return None

    # -- the last good content of each file, kept across restarts (file mode) --

    def _kept(self, path: Path) -> bytes | None:
        if self.last_good is None:
            return None
        try:
            return (self.last_good / path.name).read_bytes()
        except OSError:
            return None

    def _keep(self, path: Path, text: str) -> None:
        """Keep what a file held when it applied (atomically; a failure is said, not fatal:
        the rollout runs, only a later restart with a broken file would not resume it)."""
        if self.last_good is None:
            return
        target = self.last_good / path.name
        try:
            data = text.encode("utf-8")
            if target.is_file() and target.read_bytes() == data:
                return
            self.last_good.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(data)
            os.replace(partial, target)
        except OSError as exc:
            log.warning("cannot keep the last good version of %s in %s: %s", path,
                        self.last_good, exc)  # fmt: skip

    def _forget_kept(self, path: Path) -> None:
        if self.last_good is not None:
            try:
                (self.last_good / path.name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot forget the kept version of %s: %s", path, exc)

    def _prune_kept(self, names: set[str]) -> None:
        """Forget kept copies of files deleted while no gateway watched."""
        if self.last_good is None:
            return
        try:
            entries = list(os.scandir(self.last_good))
        except OSError:
            return
        for entry in entries:
            if entry.name not in names:
                self._forget_kept(self.root / entry.name)


def _utf8(name: str) -> bool:
    """Whether a name from the file system is text (not bytes smuggled in as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field_value(rollout: Rollout, dotted: str) -> Any:
    value: Any = rollout.model_dump()
    for part in dotted.split("."):
        value = value[part]
    return value


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(old.keys() | new.keys()):
            out.extend(_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            p
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for p in _diff(a, b, f"{prefix}{i}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]
