"""Child processes that never outlive their owner."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


def die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM to the child when its owner dies, even by
    ``kill -9`` (Linux ``PR_SET_PDEATHSIG``), so a server is never left running without its owner. The
    signal follows the *thread* that started the child: start long-lived children from a thread that lives
    as long as they should (the main thread, as the CLI and tests do)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def die_with_parent_hook() -> Callable[[], None] | None:
    """``preexec_fn`` for ``subprocess.Popen``: :func:`die_with_parent` where the kernel offers it (Linux)."""
    return die_with_parent if sys.platform == "linux" else None
