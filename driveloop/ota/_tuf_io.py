"""Crash-safe file primitives for the signing side of OTA (TUF repository and key store).

Every file the release service writes goes through ``core.atomic.write_atomic``, so a crash leaves
either the old file or the new one, never a torn one; :func:`remove_stale_temps` clears the temp
files such a crash leaves behind. Mutations of the repository are serialised with :func:`repo_lock` (an ``flock`` on a lock file), so
two operators releasing at once cannot interleave version bumps.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["remove_stale_temps", "repo_lock"]


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files a crash left behind (they were never the committed version)."""
    removed = 0
    if not directory.is_dir():
        return 0
    for p in directory.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed += 1
    if removed:
        logger.info("removed %d stale temp files in %s", removed, directory)
    return removed


@contextlib.contextmanager
def repo_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive, process-wide lock around a repository mutation."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
