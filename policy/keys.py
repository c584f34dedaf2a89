"""The audit key: the secret that makes the audit chain and the state files unforgeable.

Without a key the audit log is a plain sha256 chain and the state files carry a plain
sha256: they show accidents, not forgery (anyone who can write the state directory can
recompute them). With a key every entry's `hash` and every state file's `mac` is an
HMAC-SHA256 under it, and verifying needs the key. The key comes from the environment
(ROLLGUARD_AUDIT_KEY) or from a key file that must not lie inside the state directory:
a key stored beside what it protects protects nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from rollguard.policy.errors import AuditError

MIN_KEY_BYTES = 32  # e.g. `openssl rand -hex 32` (64 characters) or 32 random bytes
_ID_LABEL = b"rollguard audit key id"


@dataclass(frozen=True, slots=True)
class AuditKey:
    """An HMAC-SHA256 key and its public id (which names the key in entries, never reveals it)."""

    secret: bytes = field(repr=False)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise AuditError(
                f"the audit key is {len(self.secret)} bytes; at least {MIN_KEY_BYTES} are needed "
                "(e.g. `openssl rand -hex 32`)"
            )
        key_id = hmac.new(self.secret, _ID_LABEL, hashlib.sha256).hexdigest()[:16]
        object.__setattr__(self, "id", key_id)

    def mac(self, data: bytes) -> str:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()


def load_key(env_value: str | None, key_file: Path | None, state_dir: Path) -> AuditKey | None:
    """The configured key (None when neither source is set); AuditError names what is wrong."""
    if env_value and key_file is not None:
        raise AuditError("both ROLLGUARD_AUDIT_KEY and audit_key_file are set: choose one")
    if env_value:
        return AuditKey(env_value.encode("utf-8"))
    if key_file is None:
        return None
    resolved = key_file.resolve()
    if resolved.is_relative_to(state_dir.resolve()):
        raise AuditError(
            f"audit_key_file {key_file} lies inside the state directory {state_dir}: whoever can "
            "rewrite the log could read the key there; keep it elsewhere"
        )
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise AuditError(f"audit_key_file {key_file}: cannot read: {exc.strerror}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise AuditError(
                f"audit_key_file {key_file} is readable by group or others; chmod 600 it"
            )
        raw = b""
        while chunk := os.read(fd, 4096):
            raw += chunk
    finally:
        os.close(fd)
    return AuditKey(raw.rstrip(b"\r\n"))  # a text file's final newline is not key


def plain_digest(data: bytes) -> str:
    """What stands in for a MAC when no key is configured: detects accidents only."""
    return hashlib.sha256(data).hexdigest()
