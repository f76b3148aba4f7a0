"""Spool: upload order, quota eviction order (routine before events), promotion, removal, quarantine."""

from __future__ import annotations

from pathlib import Path

import pytest

from driveloop.edge.spool import Spool
from driveloop.core.exceptions import ConfigError

SIZE = 1000


def _add(spool: Spool, vehicle: str, opened_ns: int, priority: int, size: int = SIZE) -> tuple[Path, list[Path]]:
    part = spool.part_path(vehicle, opened_ns)
    part.write_bytes(b"x" * size)
    return spool.add_closed(part, vehicle, opened_ns, priority)


def _names(spool: Spool) -> list[tuple[int, int]]:
    return [(e.opened_ns, e.priority) for e in spool.closed_segments()]


def test_upload_order_events_first_then_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    for ns, prio in [(5, 0), (1, 0), (3, 4), (2, 9), (4, 4)]:
        _add(spool, "v1", ns, prio)
    assert _names(spool) == [(2, 9), (3, 4), (4, 4), (1, 0), (5, 0)]
    entry = spool.closed_segments()[0]
    assert entry.has_event and entry.vehicle == "v1" and entry.size_bytes == SIZE
    assert spool.usage_bytes() == 5 * SIZE


EVICTION = [
    # (name, segments added in order as (opened_ns, priority), quota in segments, survivors)
    ("routine_oldest_first", [(1, 0), (2, 0), (3, 0), (4, 0)], 3, [(2, 0), (3, 0), (4, 0)]),
    ("routine_before_events", [(1, 5), (2, 0), (3, 5), (4, 0), (5, 0)], 3, [(1, 5), (3, 5), (5, 0)]),
    ("events_when_no_routine", [(1, 5), (2, 2), (3, 5), (4, 0)], 2, [(1, 5), (3, 5)]),
    ("lowest_priority_event_first", [(1, 9), (2, 1), (3, 4), (4, 1)], 2, [(1, 9), (3, 4)]),
    ("new_routine_evicted_if_only_events", [(1, 5), (2, 5), (3, 0)], 2, [(1, 5), (2, 5)]),
    ("under_quota_keeps_all", [(1, 0), (2, 1)], 2, [(2, 1), (1, 0)]),
]


@pytest.mark.parametrize("name,segments,quota_n,survivors", EVICTION, ids=[e[0] for e in EVICTION])
def test_eviction_order(tmp_path: Path, name: str, segments: list[tuple[int, int]], quota_n: int,
                        survivors: list[tuple[int, int]]) -> None:
    spool = Spool(tmp_path, quota_n * SIZE)
    evicted: list[Path] = []
    for ns, prio in segments:
        evicted += _add(spool, "v", ns, prio)[1]
    assert sorted(_names(spool)) == sorted(survivors)
    assert len(evicted) == len(segments) - len(survivors)
    assert spool.usage_bytes() <= spool.quota_bytes
    assert all(not p.exists() for p in evicted)


def test_open_parts_count_but_are_never_evicted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * SIZE)
    open_part = spool.part_path("v", 100)
    open_part.write_bytes(b"y" * SIZE)
    _add(spool, "v", 1, 0)
    evicted = _add(spool, "v", 2, 3)[1]
    assert [p.name for p in evicted] == [spool.closed_path("v", 1, 0).name]
    assert open_part.exists() and spool.usage_bytes() == 2 * SIZE


def test_quarantine_is_evicted_before_any_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * SIZE)
    spool.part_path("crashed", 7).write_bytes(b"z" * SIZE)
    (moved,) = spool.quarantine_parts("crashed")
    assert moved.parent == spool.quarantine_dir
    _add(spool, "v", 1, 0)
    evicted = _add(spool, "v", 2, 0)[1]
    assert evicted == [moved] and len(spool.closed_segments()) == 2


def test_quarantine_only_touches_its_own_vehicle(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    mine, other = spool.part_path("car-1", 1), spool.part_path("car-10", 2)
    mine.write_bytes(b"a")
    other.write_bytes(b"b")
    moved = spool.quarantine_parts("car-1")
    assert [p.name for p in moved] == [mine.name]
    assert other.exists() and not mine.exists()


def test_promote_and_remove_follow_renames(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    path, _ = _add(spool, "v", 1, 0)
    promoted = spool.promote(path, 6)
    assert promoted.name.endswith("-p6.mcap") and not path.exists()
    assert spool.promote(promoted, 2) == promoted  # never demoted
    assert _names(spool) == [(1, 6)]
    assert spool.remove(path) is True  # the uploader still holds the old name
    assert spool.closed_segments() == [] and spool.remove(path) is False


def test_foreign_files_in_closed_are_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    (spool.closed_dir / "notes.txt").write_text("hi")
    (spool.closed_dir / "123-v-p1.mcap").write_bytes(b"short id")
    for vehicle in (".", "..", "-v", "_v"):  # ids the vehicle-id rule refuses are not segments
        (spool.closed_dir / f"{1:019d}-{vehicle}-p1.mcap").write_bytes(b"bad id")
    assert spool.closed_segments() == []


@pytest.mark.parametrize("vehicle", ["v", "veh-0", "car-p1", "a.b_c-d", "x" * 64])
def test_file_names_round_trip_the_vehicle_id(tmp_path: Path, vehicle: str) -> None:
    """The id is embedded in the file name, and may itself contain "-p<digit>"."""
    spool = Spool(tmp_path, 10**6)
    _add(spool, vehicle, 7, 3)
    [entry] = spool.closed_segments()
    assert (entry.vehicle, entry.opened_ns, entry.priority) == (vehicle, 7, 3)
    assert entry.segment_id == f"{7:019d}-{vehicle}"


@pytest.mark.parametrize("quota", [0, -5, 1.5])
def test_bad_quota(tmp_path: Path, quota: object) -> None:
    with pytest.raises(ConfigError):
        Spool(tmp_path, quota)  # type: ignore[arg-type]


@pytest.mark.parametrize("vehicle", ["", ".", "..", "a/b", "../x", "a b", "x" * 65])
def test_bad_vehicle_ids(tmp_path: Path, vehicle: str) -> None:
    spool = Spool(tmp_path, 10)
    with pytest.raises(ConfigError):
        spool.part_path(vehicle, 1)


def test_bad_priority(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Spool(tmp_path, 10).closed_path("v", 1, 10)
