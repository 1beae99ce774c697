"""File hashing shared by the checkpoint and data checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 16 << 20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, read in 16 MiB chunks (hashlib releases the GIL on
    them, so threads hash several files in parallel)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
