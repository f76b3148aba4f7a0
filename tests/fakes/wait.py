"""Polling for a condition another thread or process brings about (a broker's ack, a consumer's index)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(cond: Callable[[], Any], timeout_s: float = 60.0, poll_s: float = 0.05) -> bool:
    """True as soon as ``cond()`` is truthy; after ``timeout_s`` its last answer (so a test asserts on it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return bool(cond())
