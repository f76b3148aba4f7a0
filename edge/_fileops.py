"""Crash-safe file primitives for the vehicle, with a hook at every durable step.

The updater only writes through :class:`FileOps`, so a test can inject a power cut at the Nth step
(``hook`` raising) and then prove the vehicle recovers. Each write is temp file → fsync → os.replace →
directory fsync: after a crash the destination holds either the old bytes or the new ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

Hook = Callable[[str, Path], None]  # (step name, path) -> None; raising simulates a power cut there


class FileOps:
    """Atomic writes/copies with an optional fault-injection hook."""

    def __init__(self, hook: Hook | None = None, durable: bool = True) -> None:
        self.hook = hook
        # durable=False skips the fsyncs (same ordering, same hooks): only for tests on throwaway
        # directories, where the power cut is simulated by the hook, never on a vehicle.
        self.durable = durable

    def _fsync(self, fd: int) -> None:
        if self.durable:
            os.fsync(fd)

    def _step(self, name: str, path: Path) -> None:
        if self.hook is not None:
            self.hook(name, path)

    def _tmp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.tmp")

    def _commit(self, tmp: Path, path: Path) -> None:
        self._step("replace", path)
        os.replace(tmp, path)
        self._step("fsync_dir", path.parent)
        if not self.durable:
            return
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` all-or-nothing."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(path)  # a crash leaves it behind; readers only ever open committed names
        self._step("write", tmp)
        with open(tmp, "wb") as f:
            f.write(data)
            self._step("fsync", tmp)
            f.flush()
            self._fsync(f.fileno())
        self._commit(tmp, path)

    def copy_atomic(self, src: Path, dst: Path) -> None:
        """Copy ``src`` over ``dst`` all-or-nothing."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(dst)
        self._step("write", tmp)
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            self._step("fsync", tmp)
            fout.flush()
            self._fsync(fout.fileno())
        self._commit(tmp, dst)

    def remove(self, path: Path) -> None:
        self._step("remove", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
