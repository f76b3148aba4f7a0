"""All-or-nothing file writes and streamed file hashing, shared by every package (a leaf module: it
imports nothing of ours).

A reader sees either the old file or the complete new one, and a power cut after ``write_atomic``
returned keeps the new one: temp file in the same directory → fsync → ``os.replace`` → fsync of the
directory entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename, create, unlink) across a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` all-or-nothing; ``mode`` is set before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike[str], block_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (models and segments never sit whole in memory); OSError as is."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
