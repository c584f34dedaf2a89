"""Content hashes of a version's files, and the one way to read them: once, hashed, kept.

The bytes that are hashed are the bytes that are loaded. A file is read whole into
memory and its sha256 computed over that buffer; a runner loads from the buffer (or from
a private copy of it), never from the path again, so a file swapped on disk between the
check and the load is never what runs. Every file must be a regular file inside the
version directory once symlinks are resolved (ConfigMap-style `..data` links inside it
are fine, a link to a file elsewhere is not), so a manifest cannot make the registry read
`/dev/zero`, a FIFO or another version's files.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rollguard.serving.errors import ArtifactError
from rollguard.serving.manifest import REMOTE, Manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large artifacts never sit in memory whole
    (for `registry add` and the demo builder; the registry uses `read_pinned`)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inside(directory: Path, name: str) -> Path:
    """`directory/name` resolved; ArtifactError when it resolves outside `directory`
    (itself resolved: a version directory may be a symlink to where it really lives)."""
    root = directory.resolve()
    target = (directory / name).resolve()
    if not target.is_relative_to(root):
        raise ArtifactError(f"{directory / name}: resolves outside its version directory")
    return target


def read_file(directory: Path, name: str) -> bytes:
    """The whole content of the regular file `directory/name`, which must stay inside
    `directory`; ArtifactError naming the file otherwise."""
    path = directory / name
    target = inside(directory, name)
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the scan; O_NOFOLLOW on
        # the resolved path: it was checked, a link swapped in since is refused.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: named in model.yaml but missing") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_pinned(directory: Path, name: str, sha256: str) -> bytes:
    """The file's bytes once their sha256 is `sha256`; ArtifactError otherwise."""
    data = read_file(directory, name)
    actual = sha256_bytes(data)
    if actual != sha256:
        raise ArtifactError(
            f"{directory / name}: sha256 {actual} does not match {sha256} in model.yaml"
        )
    return data


@dataclass(frozen=True, slots=True)
class PinnedBytes:
    """A version's files as read once and checked against its manifest: what is loaded."""

    artifact: bytes = b""  # empty for framework http
    files: Mapping[str, bytes] = field(default_factory=dict)  # the manifest's `files`

    @classmethod
    def read(cls, directory: Path, manifest: Manifest) -> PinnedBytes:
        """Read and check every file the manifest pins; ArtifactError naming the first
        that is missing, unreadable, outside the directory or not what was pinned.
        Blocking (reads whole files): call it off the event loop."""
        if manifest.framework in REMOTE:  # nothing local: the upstream serves it
            return cls()
        assert manifest.artifact is not None and manifest.sha256 is not None
        artifact = read_pinned(directory, manifest.artifact, manifest.sha256)
        files = {f.path: read_pinned(directory, f.path, f.sha256) for f in manifest.files}
        return cls(artifact, files)
