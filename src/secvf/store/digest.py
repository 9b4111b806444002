"""Content digests of files SecVF reads whole (downloaded packages, samples)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of ``path``'s content, read in 1 MiB blocks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
