"""Content hashes of artifacts: the sha256 a manifest pins and the registry verifies."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large artifacts never sit in memory whole."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
