"""Shards in processes of their own: they meet the coordinator at each named point, their results come back
whole, and a failing shard is one clear error that does not leave the others waiting."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.core.shards import run_shards, split


def _count(first: int, n: int, marks: str, sync: Any) -> dict[str, Any]:
    """Marks that it reached "start", waits for the coordinator's file at "go", returns its share."""
    Path(marks, f"started-{first}").write_text(str(time.time()))
    sync("start")
    sync("go")
    seen = Path(marks, "go").exists()  # the coordinator wrote it before it joined "go"
    return {"first": first, "items": list(range(first, first + n)), "pid": os.getpid(), "saw_go": seen}


def _fail_or_wait(k: int, sync: Any) -> dict[str, Any]:
    if k == 1:
        raise ValueError("shard 1 broke")
    sync("start")
    return {"k": k}


def test_shards_meet_at_each_point_and_return_everything(tmp_path: Path) -> None:
    def before(point: str) -> None:
        if point == "go":
            assert len(list(tmp_path.glob("started-*"))) == 3  # every shard reached "start" first
            (tmp_path / "go").write_text("1")

    out = run_shards(_count, [(first, n, str(tmp_path)) for first, n in split(10, 3)],
                     [("start", 60.0), ("go", 60.0)], before=before)
    assert sorted(x for r in out for x in r["items"]) == list(range(10))
    assert all(r["saw_go"] for r in out)
    assert len({r["pid"] for r in out} | {os.getpid()}) == 4  # three processes of their own


def test_a_failing_shard_is_one_error_and_nobody_hangs() -> None:
    with pytest.raises(ConfigError, match="test shard failed.*ValueError: shard 1 broke"):
        run_shards(_fail_or_wait, [(0,), (1,), (2,)], [("start", 120.0)], what="test shard")


@pytest.mark.parametrize(("n", "parts", "expected"), [
    (10, 3, [(0, 3), (3, 3), (6, 4)]),
    (64, 2, [(0, 32), (32, 32)]),
    (5, 5, [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]),
])
def test_split_covers_every_item_once(n: int, parts: int, expected: list[tuple[int, int]]) -> None:
    assert split(n, parts) == expected


@pytest.mark.parametrize(("n", "parts"), [(10, 0), (3, 4)])
def test_split_refuses_impossible_shards(n: int, parts: int) -> None:
    with pytest.raises(ConfigError):
        split(n, parts)


def _wait(k: int, sync: Any) -> dict[str, Any]:
    sync("start")
    return {"k": k}


def test_a_failure_of_the_coordinator_is_named_not_hidden_behind_the_broken_barrier() -> None:
    def before(point: str) -> None:
        raise RuntimeError("coordinator broke")

    with pytest.raises(ConfigError, match="RuntimeError: coordinator broke"):
        run_shards(_wait, [(0,), (1,)], [("start", 120.0)], before=before)
