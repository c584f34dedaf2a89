"""Persisted rollout state: one JSON file per rollout, replaced atomically and durably.

A save writes a temporary file in the same directory, fsyncs it, renames it over the
old file and fsyncs the directory, so after a crash the state is either the old one
or the new one, never a mixture. A state file that does not parse raises StateError:
resetting a rollout silently could undo a rollback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rollguard.policy.errors import StateError

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")  # metadata.name's own pattern
_SUFFIX = ".json"


class StateStore:
    """The state directory: `<root>/<rollout name>.json` for each rollout."""

    def __init__(self, root: Path, *, fsync: Callable[[int], None] = os.fsync) -> None:
        # `fsync` is injectable so tests can fail a write at its most delicate moment.
        self.root = root
        self._fsync = fsync
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{root}: cannot create the state directory: {exc}") from exc

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StateError(f"{name!r} is not a rollout name usable as a file name")
        return self.root / f"{name}{_SUFFIX}"

    def save(self, name: str, data: Mapping[str, Any]) -> None:
        """Replace `name`'s state with `data`; on any failure the previous state stays."""
        target = self.path(name)
        try:
            payload = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise StateError(f"{target}: state is not JSON-serialisable: {exc}") from exc
        try:
            write_atomic(target, payload.encode("utf-8"), fsync=self._fsync)
        except OSError as exc:
            raise StateError(f"{target}: cannot write state: {exc}") from exc

    def load(self, name: str) -> dict[str, Any] | None:
        """`name`'s saved state, or None if it has none; StateError if it is unreadable."""
        return _read(self.path(name))

    def delete(self, name: str) -> None:
        """Forget `name`'s state (no error if it has none)."""
        target = self.path(name)
        try:
            target.unlink(missing_ok=True)
            sync_directory(self.root, fsync=self._fsync)
        except OSError as exc:
            raise StateError(f"{target}: cannot delete state: {exc}") from exc


def write_atomic(target: Path, payload: bytes, *, fsync: Callable[[int], None] = os.fsync) -> None:
    """Replace `target` with `payload` so a crash leaves the old or the new file, whole.

    Raises OSError; the temporary file is removed on failure.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    sync_directory(target.parent, fsync=fsync)


def sync_directory(directory: Path, *, fsync: Callable[[int], None] = os.fsync) -> None:
    """fsync a directory: a rename or a new file is durable only once its entry is."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read state: {exc}") from exc
    try:
        state = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path}: corrupt state file ({exc}); fix or remove it") from exc
    if not isinstance(state, dict):
        raise StateError(f"{path}: corrupt state file (not a JSON object); fix or remove it")
    return state


def _unlink_quietly(path: str) -> None:
    # Best effort: a leftover temporary file is ignored by every reader anyway.
    with contextlib.suppress(OSError):
        os.unlink(path)
