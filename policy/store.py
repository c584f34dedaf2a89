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

Saves in the background: `save` writes before it returns (a decision's state, which its
audit entry must not precede); `save_later` (bookkeeping no audit entry records: the
tests' counts each tick) serialises and seals at once, on the caller's thread, and
leaves the writing and its two fsyncs to the store's writer thread. Every save of a rollout takes a
number, writes of one rollout take turns under its lock, and a write whose number is
below the one on disk is skipped: a bookkeeping write still waiting can never land after
(and over) a later save, and only the newest waiting one of a rollout is written. A
failed background write is logged and tried again with the next save or `flush`; `flush`
(the gateway's shutdown) writes what is still waiting. What a SIGKILL loses: the saves
still waiting, i.e. at most the last tick's bookkeeping, as when it lands just before a
save; the next process counts on from the save before (policy/carry.py).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey, plain_digest

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")  # metadata.name's own pattern
_SUFFIX = ".json"
_REMEDY = "remove it to rebuild the rollout's state from the audit log"
log = logging.getLogger("rollguard.state")


@dataclass(frozen=True, slots=True)
class _Write:
    """One save, sealed and serialised: `seq` orders it among the store's saves."""

    name: str
    seq: int
    target: Path
    payload: bytes


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
        # The order of saves (the module docstring): `_order` guards the fields below it;
        # a rollout's lock is held while its file is written.
        self._order = threading.Lock()
        self._idle = threading.Condition(self._order)
        self._seq = 0
        self._landed: dict[str, int] = {}  # the seq of the save on disk, per rollout
        self._pending: dict[str, _Write] = {}  # the newest save waiting, per rollout
        self._locks: dict[str, threading.Lock] = {}
        self._busy = False  # the writer thread is at work
        self._writer: ThreadPoolExecutor | None = None  # started by the first save_later

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StateError(f"{name!r} is not a rollout name usable as a file name")
        return self.root / f"{name}{_SUFFIX}"

    def save(self, name: str, data: Mapping[str, Any], *, audit_seq: int = 0) -> None:
        """Replace `name`'s state with `data` before returning; on any failure the
        previous state stays. A save of `name` still waiting in the background is
        superseded: it is never written after this one."""
        write = self._sealed(name, data, audit_seq)
        with self._order:
            waiting = self._pending.get(name)
            if waiting is not None and waiting.seq < write.seq:
                del self._pending[name]
        self._land(write)

    def save_later(self, name: str, data: Mapping[str, Any], *, audit_seq: int = 0) -> None:
        """Replace `name`'s state with `data` from the writer thread (the module docstring).

        StateError at once when `data` cannot be serialised; a failed write is logged and
        retried with the next save or `flush`, unless a later save of `name` lands first.
        """
        write = self._sealed(name, data, audit_seq)
        with self._order:
            self._pending[name] = write
            self._schedule()

    def flush(self, timeout: float | None = None) -> bool:
        """Write the saves still waiting, each tried once more if it failed; True when
        none is left waiting (False: a write failed again, or `timeout` passed)."""
        with self._order:
            self._schedule()
            if not self._idle.wait_for(lambda: not self._busy, timeout):
                return False
            return not self._pending

    def close(self, timeout: float | None = None) -> bool:
        """`flush`, then stop the writer thread; later saves start another."""
        flushed = self.flush(timeout)
        with self._order:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=False)
        return flushed

    def _sealed(self, name: str, data: Mapping[str, Any], audit_seq: int) -> _Write:
        """The file `name`'s state is to become, numbered after every earlier save."""
        target = self.path(name)
        try:
            body = {"audit_seq": audit_seq, "name": name, "state": dict(data)}
            document = {**body, "mac": self._seal(body)}
            payload = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise StateError(f"{target}: state is not JSON-serialisable: {exc}") from exc
        with self._order:
            self._seq += 1
            return _Write(name, self._seq, target, payload.encode("utf-8"))

    def _land(self, write: _Write) -> None:
        """Write one save unless a later save of its rollout is on disk already."""
        with self._order:
            lock = self._locks.setdefault(write.name, threading.Lock())
        with lock:
            with self._order:
                if write.seq <= self._landed.get(write.name, 0):
                    return  # superseded
            try:
                write_atomic(write.target, write.payload, fsync=self._fsync)
            except OSError as exc:
                raise StateError(f"{write.target}: cannot write state: {exc}") from exc
            with self._order:
                self._landed[write.name] = write.seq

    def _schedule(self) -> None:
        """With `_order` held: set the writer thread to work if a save waits for it."""
        if self._busy or not self._pending:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="rollguard-state")
        self._busy = True
        try:
            self._writer.submit(self._drain)
        except RuntimeError:  # the interpreter is exiting: nothing runs submitted work
            self._busy = False

    def _drain(self) -> None:
        """The writer thread: write what waits until nothing does; keep failed saves."""
        failed: dict[str, _Write] = {}
        while True:
            with self._order:
                if not self._pending:
                    for name, write in failed.items():  # unless a later one waits or landed
                        if write.seq > self._landed.get(name, 0):
                            self._pending.setdefault(name, write)
                    self._busy = False
                    self._idle.notify_all()
                    return
                write = self._pending.pop(next(iter(self._pending)))
            try:
                self._land(write)
            except StateError as exc:
                log.error("%s (tried again with the next save)", exc)
                failed[write.name] = write
            except BaseException:  # never leave `_busy` set: flush would wait forever
                with self._order:
                    self._busy = False
                    self._idle.notify_all()
                raise

    def load(self, name: str) -> dict[str, Any] | None:
        """`name`'s saved state, or None if it has none; StateError if unreadable or forged."""
        stored = self.read(name)
        return None if stored is None else stored.state

    def read(self, name: str) -> StoredState | None:
        """`name`'s state file with its audit seq, its seal verified; None if it has none.
        A save of `name` waiting in the background is written first (if it can be)."""
        path = self.path(name)
        with self._order:
            waiting = self._pending.pop(name, None)
        if waiting is not None:
            try:
                self._land(waiting)
            except StateError as exc:
                log.error("%s (tried again with the next save)", exc)
                with self._order:
                    if waiting.seq > self._landed.get(name, 0):
                        self._pending.setdefault(name, waiting)
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
        """Forget `name`'s state (no error if it has none), and any save of it waiting."""
        target = self.path(name)
        with self._order:
            self._seq += 1
            seq = self._seq
            self._pending.pop(name, None)
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            try:
                target.unlink(missing_ok=True)
                sync_directory(self.root, fsync=self._fsync)
            except OSError as exc:
                raise StateError(f"{target}: cannot delete state: {exc}") from exc
            with self._order:
                self._landed[name] = seq

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
