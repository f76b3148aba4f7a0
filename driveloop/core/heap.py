"""Keep the garbage collector's full passes off a long-running process's start-up heap.

CPython's full (generation 2) collection walks every container object the process holds. A process that has just
built a long-lived state — a fleet's stream connections, subscriptions and models — holds hundreds of thousands of
them: with 500 vehicle connections in one process a full pass stopped its event loop for 100–350 ms
(docs/BENCHMARKS.md "Road hazards"), and the first one after the start falls on the first messages it serves.
That state lives until the process stops, so walking it finds nothing to free.

:func:`freeze_long_lived` collects once (so start-up garbage is freed, not kept) and then moves every object alive
into the permanent generation (``gc.freeze``), which later collections skip; what is allocated afterwards is
collected as before. Call it once the state is built, before the process starts serving. :func:`frozen_heap` does
the same for a ``with`` block and gives the heap back to the collector after it (``gc.unfreeze``), for work that
runs inside a process that goes on (a command called in-process, a test session).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze_long_lived", "frozen_heap"]


def freeze_long_lived() -> int:
    """Collect, then exclude every object alive now from future collections; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def frozen_heap() -> Iterator[int]:
    """:func:`freeze_long_lived` on entry (yields how many objects are frozen), ``gc.unfreeze`` on exit."""
    try:
        yield freeze_long_lived()
    finally:
        gc.unfreeze()
