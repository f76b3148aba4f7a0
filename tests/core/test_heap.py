"""The start-up heap frozen out of full collections: garbage freed first, what lives kept out of the collector's walk."""

from __future__ import annotations

import gc
import weakref

from driveloop.core.heap import freeze_long_lived, frozen_heap


class _Node:
    link: object = None


def test_start_up_garbage_is_freed_and_what_lives_is_no_longer_walked() -> None:
    garbage = _Node()
    garbage.link = garbage  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    kept = _Node()
    kept.link = kept
    try:
        frozen = freeze_long_lived()
        assert gone() is None  # collected before the freeze, not kept for ever
        assert frozen > 0 and gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # in the permanent generation: no collection walks it
        fresh = _Node()
        fresh.link = fresh  # made after the freeze: collected as before
        fresh_ref = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


def test_a_frozen_block_gives_the_heap_back_to_the_collector() -> None:
    kept = _Node()
    kept.link = kept
    with frozen_heap() as frozen:
        assert frozen > 0 and gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())
    assert gc.get_freeze_count() == 0 and any(o is kept for o in gc.get_objects())
