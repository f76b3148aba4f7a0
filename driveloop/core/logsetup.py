"""Where a process's log lines go: one JSON-lines file under the data directory, and the terminal.

- The file (``<home>/logs/<service>.jsonl``, size-capped with rotation) gets every line at INFO and
  above (DEBUG with ``--debug``), from every library, in the one format of :mod:`driveloop.core.logfmt`.
- The terminal (stderr) gets only driveloop's own lines at the chosen level, plus errors from
  libraries other than Ray and Flower: their internal chatter belongs in the file, not in the user's
  terminal. It is readable on a terminal and JSON otherwise (``DRIVELOOP_LOG_FORMAT=json|console``
  forces one).
- Python warnings (pandas deprecations…) are logged (to the file), not printed.

Calling :func:`configure_logging` again replaces what an earlier call installed (the CLI runs many
commands in one test process); handlers someone else installed (pytest's ``caplog``) are left alone.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from driveloop.core.logfmt import LIVE_STDERR, ConsoleFormatter, JsonFormatter

__all__ = ["configure_logging", "set_service_name", "adopt_library_logs", "reset_logging", "log_dir", "QUIET_LIBRARIES", "FILE_MAX_BYTES"]

QUIET_LIBRARIES = ("ray", "flwr", "py.warnings", "filelock", "fsspec", "urllib3", "numba", "matplotlib", "torch",
                   "PIL", "asyncio", "pandas", "pyarrow")
# Chatty at INFO in every request or import, and nothing in them is needed to follow the loop.
_WARN_ONLY = ("httpx", "httpcore", "uvicorn.access", "numba", "matplotlib", "PIL", "filelock", "urllib3",
              "asyncio", "grpc", "botocore", "s3fs", "aiobotocore")
FILE_MAX_BYTES = 64 * 2**20  # per file; 3 rotated files kept
_MARK = "_driveloop_handler"


def log_dir(home: Path | str) -> Path:
    return Path(home) / "logs"


class _ConsoleFilter(logging.Filter):
    """driveloop's own lines; from anything else, errors only, and never Ray's or Flower's."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "driveloop" or name.startswith("driveloop."):
            return True
        if any(name == q or name.startswith(q + ".") for q in QUIET_LIBRARIES):
            return False
        return record.levelno >= logging.ERROR


class _LogFile(logging.handlers.RotatingFileHandler):
    """The JSON-lines file, created on the first line (``driveloop drive --help`` leaves no folder
    behind). A data directory that cannot be written stops this handler, not the command: the
    command meets the same disk and reports it in its one error line; ``failed`` keeps the reason."""

    failed: str | None = None

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self.failed = f"{type(exc).__name__}: {exc}"
            return
        super().handleError(record)


def _ours(handlers: Iterable[logging.Handler]) -> list[logging.Handler]:
    return [h for h in handlers if getattr(h, _MARK, False)]


def _console_is_json() -> bool:
    forced = os.environ.get("DRIVELOOP_LOG_FORMAT", "").strip().lower()
    if forced in ("json", "console"):
        return forced == "json"
    stream = sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure_logging(service: str, console_level: int = logging.WARNING, home: Path | str | None = None,
                      file_level: int = logging.INFO) -> Path | None:
    """Install the console handler (and, with ``home``, the file handler) on the root logger.

    Returns the log file's path (None without ``home``); the file and its folder appear with the
    first line.
    """
    root = logging.getLogger()
    if not _ours(root.handlers):
        _saved["root_level"] = root.level  # what reset_logging gives back
    for h in _ours(root.handlers):
        root.removeHandler(h)
        h.close()
    console = LIVE_STDERR()
    console.setLevel(console_level)
    console.setFormatter(JsonFormatter(service) if _console_is_json() else ConsoleFormatter(service))
    console.addFilter(_ConsoleFilter())
    setattr(console, _MARK, True)
    root.addHandler(console)
    path: Path | None = None
    if home is not None:
        path = log_dir(home).absolute() / f"{service}.jsonl"
        fh = _LogFile(path, maxBytes=FILE_MAX_BYTES, backupCount=3, encoding="utf-8", delay=True)
        fh.setLevel(file_level)
        fh.setFormatter(JsonFormatter(service))
        setattr(fh, _MARK, True)
        root.addHandler(fh)
    root.setLevel(min(console_level, file_level) if path is not None else console_level)
    for name in _WARN_ONLY:
        logging.getLogger(name).setLevel(max(logging.WARNING, console_level))
    logging.captureWarnings(True)  # warnings become lines of the file, not text on the terminal
    _last.update(console_level=console_level, home=home, file_level=file_level)
    return path


_last: dict[str, Any] = {}
_saved: dict[str, int] = {}


def reset_logging() -> None:
    """Undo :func:`configure_logging` (our handlers closed, the root level and warnings as they were):
    the CLI's ``main`` runs many commands in one process (tests), each configuring its own."""
    root = logging.getLogger()
    for h in _ours(root.handlers):
        root.removeHandler(h)
        h.close()
    if "root_level" in _saved:
        root.setLevel(_saved.pop("root_level"))
    logging.captureWarnings(False)


def _terminal_or_dead(h: logging.Handler) -> bool:
    """A library's handler that writes to the terminal, or to a stream already closed (one bound on import to
    a stderr that has since been replaced and closed, as a test's captured stderr is): not a file it keeps."""
    if isinstance(h, logging.FileHandler):
        return False
    stream = getattr(h, "stream", None)
    if stream is None or stream in (sys.stderr, sys.stdout) or stream is sys.__stderr__ or stream is sys.__stdout__:
        return True
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except ValueError:  # "I/O operation on closed file"
        return True


def adopt_library_logs(*names: str) -> int:
    """Take over loggers a library configured for itself on import (Ray's ``ray``/``ray.data``, Flower's
    ``flwr``): drop their handlers that write to the terminal and let their records reach the root
    logger, whose file handler keeps them and whose console filter keeps Ray and Flower off the
    terminal. Their file handlers (Ray's session logs) stay. Returns how many handlers were removed."""
    removed = 0
    for name in names:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if _terminal_or_dead(h):
                lg.removeHandler(h)
                removed += 1
        lg.propagate = True
        if lg.level < logging.INFO:  # Ray Data sets DEBUG for its own file; our file keeps INFO and above
            lg.setLevel(logging.INFO)
    return removed


def set_service_name(service: str) -> Path | None:
    """Rename this process's lines and file (``driveloop cloud serve`` becomes ``ingest``), keeping
    the levels and data directory of the last :func:`configure_logging` (defaults without one)."""
    return configure_logging(service, **_last)
