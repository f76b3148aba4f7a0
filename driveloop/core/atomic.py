"""All-or-nothing file writes and streamed file hashing: the one definition every package uses.

A reader sees either the old file or the complete new one, and a power cut after a write returned
keeps the new one: temp file in the same directory → fsync → ``os.replace`` → fsync of the directory
entry. :class:`FileOps` performs every durable step through an optional hook, so a test can cut the
power at the Nth step (the hook raising) and then prove the writer recovers; the module functions are
the same operations without a hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

Hook = Callable[[str, Path], None]  # (step name, path) -> None; raising simulates a power cut there
_BLOCK_BYTES = 1 << 20


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename, create, unlink) across a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(dest: Path) -> Path:
    """A fresh, uniquely named temp file next to ``dest`` (same filesystem: the rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(name)


class FileOps:
    """Atomic writes, copies and renames, each durable step announced to ``hook`` first.

    ``durable=False`` skips the fsyncs (same ordering, same hooks): only for tests on throwaway
    directories, where the power cut is simulated by the hook, never on a vehicle.
    """

    def __init__(self, hook: Hook | None = None, durable: bool = True) -> None:
        self.hook = hook
        self.durable = durable

    def _step(self, name: str, path: Path) -> None:
        if self.hook is not None:
            self.hook(name, path)

    def _fsync(self, fd: int) -> None:
        if self.durable:
            os.fsync(fd)

    def commit(self, tmp: Path, path: Path) -> None:
        """Rename the complete, fsynced ``tmp`` over ``path`` and persist the directory entry."""
        self._step("replace", path)
        os.replace(tmp, path)
        self._step("fsync_dir", path.parent)
        if self.durable:
            fsync_dir(path.parent)

    def _write_via_temp(self, path: Path, fill: Callable[[int], None], mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, mode)
            self._step("write", tmp)
            fill(fd)
            self._step("fsync", tmp)
            self._fsync(fd)
            os.close(fd)
            fd = -1
            self.commit(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def write_atomic(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """Replace ``path`` with ``data`` all-or-nothing; ``mode`` is set before any byte is written."""
        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        self._write_via_temp(path, fill, mode)

    def copy_atomic(self, src: Path, dst: Path, mode: int = 0o644) -> None:
        """Copy ``src`` over ``dst`` all-or-nothing."""
        def fill(fd: int) -> None:
            with open(src, "rb") as fin, os.fdopen(os.dup(fd), "wb") as fout:
                shutil.copyfileobj(fin, fout, _BLOCK_BYTES)

        self._write_via_temp(dst, fill, mode)

    def replace(self, tmp: Path, dest: Path) -> None:
        """fsync a temp file written by someone else (a library's ``save(path)``), then commit it."""
        self._step("fsync", tmp)
        if self.durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self.commit(tmp, dest)

    def remove(self, path: Path) -> None:
        self._step("remove", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_DURABLE = FileOps()


def write_atomic(path: Path | str, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` all-or-nothing (durable); returns the path."""
    path = Path(path)
    _DURABLE.write_atomic(path, data, mode)
    return path


def fsync_replace(tmp: Path, dest: Path) -> None:
    """fsync ``tmp`` then atomically rename it over ``dest``, and fsync the directory entry."""
    _DURABLE.replace(tmp, dest)


def file_sha256(path: str | os.PathLike[str], block_bytes: int = _BLOCK_BYTES) -> str:
    """Hex sha256 of a file, streamed (models and segments never sit whole in memory); OSError as is."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
