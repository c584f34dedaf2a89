"""Persisted rollout state: one sealed JSON file per rollout, replaced atomically and durably.

A save writes a temporary file (0600) in the same directory, fsyncs it, renames it over
the old file and fsyncs the directory, so after a crash the state is either the old one
or the new one, never a mixture. Each file is an envelope:

    {"audit_seq": N, "mac": "...", "name": "<rollout>", "state": {...}}

`audit_seq` is the seq of the rollout's last audit record the state corresponds to
(policy/recovery.py checks the two agree at start), and `mac` seals name, seq and state:
an HMAC-SHA256 under the audit key ("hmac-sha256:<key id>:<hex>"), or a plain sha256
("sha256:<hex>") when no key is configured, which shows accidents but not forgery. A file
that does not parse or whose seal does not verify raises StateError naming the file:
resetting a rollout silently could undo a rollback. Files are read without following
symbolic links.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey, plain_digest

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")  # metadata.name's own pattern
_SUFFIX = ".json"
_REMEDY = "remove it to rebuild the rollout's state from the audit log"


@dataclass(frozen=True, slots=True)
class StoredState:
    """One state file as read: the state, the audit seq it corresponds to, how it was sealed."""

    state: dict[str, Any]
    audit_seq: int | None  # None: a file from before states carried one
    sealed: Literal["key", "plain", "legacy"]


class StateStore:
    """The state directory: `<root>/<rollout name>.json` for each rollout."""

    def __init__(
        self,
        root: Path,
        *,
        key: AuditKey | None = None,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        # `fsync` is injectable so tests can fail a write at its most delicate moment.
        self.root = root
        self.key = key
        self._fsync = fsync
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{root}: cannot create the state directory: {exc}") from exc

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StateError(f"{name!r} is not a rollout name usable as a file name")
        return self.root / f"{name}{_SUFFIX}"

    def save(self, name: str, data: Mapping[str, Any], *, audit_seq: int = 0) -> None:
        """Replace `name`'s state with `data`; on any failure the previous state stays."""
        target = self.path(name)
        try:
            body = {"audit_seq": audit_seq, "name": name, "state": dict(data)}
            document = {**body, "mac": self._seal(body)}
            payload = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise StateError(f"{target}: state is not JSON-serialisable: {exc}") from exc
        try:
            write_atomic(target, payload.encode("utf-8"), fsync=self._fsync)
        except OSError as exc:
            raise StateError(f"{target}: cannot write state: {exc}") from exc

    def load(self, name: str) -> dict[str, Any] | None:
        """`name`'s saved state, or None if it has none; StateError if unreadable or forged."""
        stored = self.read(name)
        return None if stored is None else stored.state

    def read(self, name: str) -> StoredState | None:
        """`name`'s state file with its audit seq, its seal verified; None if it has none."""
        path = self.path(name)
        raw = read_private(path, StateError, "state")
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"{path}: corrupt state file ({exc}); fix or {_REMEDY}") from exc
        if not isinstance(doc, dict):
            raise StateError(f"{path}: corrupt state file (not a JSON object); {_REMEDY}")
        if "mac" not in doc:
            return StoredState(doc, None, "legacy")  # trusted no further than the log says
        return self._unseal(path, name, doc)

    def delete(self, name: str) -> None:
        """Forget `name`'s state (no error if it has none)."""
        target = self.path(name)
        try:
            target.unlink(missing_ok=True)
            sync_directory(self.root, fsync=self._fsync)
        except OSError as exc:
            raise StateError(f"{target}: cannot delete state: {exc}") from exc

    def names(self) -> list[str]:
        """The rollouts that have a state file."""
        try:
            files = sorted(self.root.glob(f"*{_SUFFIX}"))
        except OSError as exc:
            raise StateError(f"{self.root}: cannot list: {exc}") from exc
        return [p.stem for p in files if _NAME.match(p.stem)]

    def _seal(self, body: Mapping[str, Any]) -> str:
        data = canonical(body)
        if self.key is None:
            return f"sha256:{plain_digest(data)}"
        return f"hmac-sha256:{self.key.id}:{self.key.mac(data)}"

    def _unseal(self, path: Path, name: str, doc: dict[str, Any]) -> StoredState:
        fields = set(doc)
        if fields != {"audit_seq", "mac", "name", "state"} or not isinstance(doc["state"], dict):
            raise StateError(f"{path}: corrupt state file (unexpected fields); {_REMEDY}")
        mac, body = doc["mac"], {k: v for k, v in doc.items() if k != "mac"}
        kind, _, rest = str(mac).partition(":")
        if kind == "hmac-sha256":
            key_id, _, _ = rest.partition(":")
            if self.key is None:
                raise StateError(
                    f"{path}: sealed with audit key {key_id}, and no key is configured "
                    "(ROLLGUARD_AUDIT_KEY or audit_key_file)"
                )
            if key_id != self.key.id:
                raise StateError(
                    f"{path}: sealed with audit key {key_id}, not the configured key "
                    f"{self.key.id}; {_REMEDY}"
                )
        elif kind == "sha256":
            # Under a key this seal proves nothing: the caller trusts such a file no
            # further than the audit log agrees with it.
            digest = f"sha256:{plain_digest(canonical(body))}"
            if not hmac.compare_digest(str(mac), digest):
                raise StateError(
                    f"{path}: the state file's digest does not match: it was changed outside "
                    f"rollguard; refusing to trust it ({_REMEDY})"
                )
            return self._checked(path, name, doc, "plain")
        else:
            raise StateError(f"{path}: unknown seal {kind!r}; {_REMEDY}")
        if not hmac.compare_digest(str(mac), self._seal(body)):
            raise StateError(
                f"{path}: the state file's seal does not verify: it was changed outside "
                f"rollguard; refusing to trust it ({_REMEDY})"
            )
        return self._checked(path, name, doc, "key" if self.key else "plain")

    @staticmethod
    def _checked(
        path: Path, name: str, doc: dict[str, Any], sealed: Literal["key", "plain"]
    ) -> StoredState:
        if doc["name"] != name or not isinstance(doc["audit_seq"], int):
            raise StateError(f"{path}: the state of {doc['name']!r}, not {name!r}; {_REMEDY}")
        return StoredState(doc["state"], doc["audit_seq"], sealed)


def write_atomic(target: Path, payload: bytes, *, fsync: Callable[[int], None] = os.fsync) -> None:
    """Replace `target` with `payload` so a crash leaves the old or the new file, whole.

    The new file is 0600 (mkstemp's mode); the rename replaces a symbolic link at
    `target` rather than writing through it. Raises OSError; the temporary file is
    removed on failure.
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


def open_private(path: Path, flags: int) -> int:
    """os.open with O_NOFOLLOW, creating 0600; a symbolic link raises OSError(ELOOP)."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)


def read_private(path: Path, error: type[Exception], what: str) -> bytes | None:
    """The bytes of `path` (None if it does not exist), never through a symbolic link."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(_describe(path, exc, what)) from exc
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(_describe(path, exc, what)) from exc
    finally:
        os.close(fd)


def canonical(value: object) -> bytes:
    """The one JSON form that is hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _describe(path: Path, exc: OSError, what: str) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path}: is a symbolic link; the {what} file is never read or written through one"
    return f"{path}: cannot read {what}: {exc}"


def _unlink_quietly(path: str) -> None:
    # Best effort: a leftover temporary file is ignored by every reader anyway.
    with contextlib.suppress(OSError):
        os.unlink(path)
