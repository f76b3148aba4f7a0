"""Catalog: segments (idempotent, queryable, consumed once), vehicles, uploads, campaigns.

Every test takes the ``catalog`` fixture; tests/cloud/test_postgres.py reruns them all against a real
PostgreSQL server by overriding that fixture.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import fields, replace
from pathlib import Path

import pytest

from driveloop.cloud.campaigns import CampaignSpec, approve, new_campaign
from driveloop.cloud.catalog import (
    UPLOAD_DONE,
    UPLOAD_FAILED,
    UPLOAD_OPEN,
    Catalog,
    SegmentQuery,
    SegmentRecord,
)
from driveloop.contracts.segment import SegmentMeta
from driveloop.core.exceptions import ConfigError, StorageError

META_FIELDS = {f.name for f in fields(SegmentMeta)}


def make_record(n: int, **overrides: object) -> SegmentRecord:
    """A synthetic cataloged segment; ``n`` picks the sha256 and the time slot. Its metadata holds only
    what the catalog keeps (the rest None), so it round-trips equal; overrides go to ``meta`` by name."""
    meta = SegmentMeta(
        vehicle=f"veh-{n % 2}",
        scenario="highway" if n % 3 else "cut_in",
        seed=1000 + n,
        model_version="1",
        start_s=20.0 * n,
        end_s=20.0 * n + 19.9,
        n_ticks=200,
        events={},
        has_event=False,
        priority=None,
        recorded_at_unix_s=None,
        obs_version=None,
        schema_version=None,
    )
    base = SegmentRecord(
        sha256=hashlib.sha256(f"seg-{n}".encode()).hexdigest(),
        meta=replace(meta, **{k: v for k, v in overrides.items() if k in META_FIELDS}),  # type: ignore[arg-type]
        size=1000 + n,
        ingested_at_s=5000.0 + n,
        name=f"seg-{n}.mcap",
    )
    return replace(base, **{k: v for k, v in overrides.items() if k not in META_FIELDS})  # type: ignore[arg-type]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog(f"sqlite:///{tmp_path / 'sub' / 'catalog.db'}")
    yield cat
    cat.close()


def test_add_segment_is_idempotent_and_round_trips(catalog: Catalog) -> None:
    rec = make_record(1, events={"aeb": 2, "fcw": 1}, has_event=True)
    assert catalog.add_segment(rec) is True
    assert catalog.add_segment(rec) is False
    assert catalog.add_segment(replace(rec, meta=replace(rec.meta, vehicle="someone-else"))) is False  # first wins
    assert catalog.get_segment(rec.sha256) == rec
    assert catalog.has_segment(rec.sha256)
    assert not catalog.has_segment("0" * 64)
    assert catalog.get_segment("0" * 64) is None
    assert len(catalog.segments()) == 1


QUERY_CASES = [
    ("all", SegmentQuery(), [0, 1, 2, 3, 4, 5]),
    ("vehicle", SegmentQuery(vehicle="veh-1"), [1, 3, 5]),
    ("scenario", SegmentQuery(scenario="cut_in"), [0, 3]),
    ("model", SegmentQuery(model_version="2"), [4, 5]),
    ("event", SegmentQuery(event="aeb"), [2, 5]),
    ("event-absent", SegmentQuery(event="collision"), []),
    ("has-event", SegmentQuery(has_event=True), [2, 4, 5]),
    ("no-event", SegmentQuery(has_event=False), [0, 1, 3]),
    ("time-overlap", SegmentQuery(from_s=30.0, until_s=60.0), [1, 2, 3]),
    ("from-only", SegmentQuery(from_s=80.0), [4, 5]),
    ("combined", SegmentQuery(vehicle="veh-1", has_event=True), [5]),
    ("limit", SegmentQuery(limit=2), [0, 1]),
]


@pytest.mark.parametrize("query,expected", [c[1:] for c in QUERY_CASES], ids=[c[0] for c in QUERY_CASES])
def test_segment_queries(catalog: Catalog, query: SegmentQuery, expected: list[int]) -> None:
    events = {2: {"aeb": 1}, 4: {"fcw": 3, "aeb": 0}, 5: {"aeb": 2, "fallback": 1}}
    for n in range(6):
        ev = events.get(n, {})
        catalog.add_segment(make_record(n, events=ev, has_event=bool(ev), model_version="2" if n >= 4 else "1"))
    got = [r.sha256 for r in catalog.segments(query)]
    assert got == [make_record(n).sha256 for n in expected]


def test_new_segments_and_mark_consumed(catalog: Catalog) -> None:
    for n in range(4):
        catalog.add_segment(make_record(n))
    shas = [make_record(n).sha256 for n in range(4)]
    assert [r.sha256 for r in catalog.new_segments()] == shas
    assert catalog.mark_consumed(shas[:2], "ds-a") == 2
    assert [r.sha256 for r in catalog.new_segments()] == shas[2:]
    assert catalog.mark_consumed(shas[:3], "ds-b") == 1  # first consumer is kept
    assert catalog.get_segment(shas[0]).consumed_by_dataset == "ds-a"  # type: ignore[union-attr]
    assert catalog.get_segment(shas[2]).consumed_by_dataset == "ds-b"  # type: ignore[union-attr]
    assert [r.sha256 for r in catalog.segments(SegmentQuery(unconsumed=False))] == shas[:3]
    assert catalog.mark_consumed([], "ds-c") == 0
    with pytest.raises(StorageError, match="unknown segments"):
        catalog.mark_consumed(["f" * 64], "ds-c")
    with pytest.raises(ConfigError):
        catalog.mark_consumed(shas, "")
    assert [r.sha256 for r in catalog.new_segments()] == shas[3:]


def test_vehicles(catalog: Catalog) -> None:
    v = catalog.add_vehicle("veh-1", "a" * 64, now_s=10.0)
    assert v.enabled and v.token_hash == "a" * 64
    with pytest.raises(ConfigError, match="already registered"):
        catalog.add_vehicle("veh-1", "b" * 64, now_s=11.0)
    catalog.update_vehicle("veh-1", token_hash="c" * 64, enabled=False)
    got = catalog.get_vehicle("veh-1")
    assert got is not None and got.token_hash == "c" * 64 and not got.enabled
    assert catalog.get_vehicle("nope") is None
    with pytest.raises(ConfigError, match="unknown vehicle"):
        catalog.update_vehicle("nope", enabled=True)
    assert [x.id for x in catalog.vehicles()] == ["veh-1"]


def test_upload_lifecycle(catalog: Catalog) -> None:
    catalog.add_vehicle("veh-0", "a" * 64, now_s=0.0)
    rec = make_record(0)
    up = catalog.create_upload("u1", "veh-0", rec.sha256, rec.size, "seg-0.mcap", now_s=1.0)
    assert (up.state, up.offset) == (UPLOAD_OPEN, 0)
    assert catalog.open_upload("veh-0", rec.sha256) == up
    assert catalog.open_upload("veh-1", rec.sha256) is None
    catalog.set_upload_offset("u1", 500, now_s=2.0)
    assert catalog.get_upload("u1").offset == 500  # type: ignore[union-attr]
    assert catalog.complete_upload("u1", rec, now_s=3.0) is True
    done = catalog.get_upload("u1")
    assert done is not None and done.state == UPLOAD_DONE and done.offset == rec.size
    assert catalog.open_upload("veh-0", rec.sha256) is None
    assert catalog.get_segment(rec.sha256) == rec
    # a second upload of the same bytes completes without a second segment row
    catalog.create_upload("u2", "veh-0", rec.sha256, rec.size, "again.mcap", now_s=4.0)
    assert catalog.complete_upload("u2", rec, now_s=5.0) is False
    assert len(catalog.segments()) == 1
    catalog.create_upload("u3", "veh-0", "e" * 64, 10, "bad.mcap", now_s=6.0)
    catalog.fail_upload("u3", "sha256 mismatch", now_s=7.0)
    failed = catalog.get_upload("u3")
    assert failed is not None and failed.state == UPLOAD_FAILED and failed.error == "sha256 mismatch"
    assert [u.id for u in catalog.uploads(UPLOAD_DONE)] == ["u1", "u2"]
    assert catalog.get_upload("missing") is None


def test_upload_needs_a_known_vehicle(catalog: Catalog) -> None:
    with pytest.raises(StorageError):
        catalog.create_upload("u1", "ghost", "a" * 64, 10, "x.mcap", now_s=0.0)
    assert catalog.uploads() == []


def test_campaigns_round_trip(catalog: Catalog) -> None:
    spec = CampaignSpec(name="low-ttc", condition="ttc < 1.5 or fallback", expires_at_s=9000.0, priority=1)
    c = new_campaign(spec, now_s=100.0)
    catalog.save_campaign(c)
    assert catalog.get_campaign(c.id) == c
    approved = approve(c, now_s=200.0)
    catalog.save_campaign(approved)
    assert catalog.get_campaign(c.id) == approved
    assert [x.id for x in catalog.campaigns(state="approved")] == [c.id]
    assert catalog.campaigns(state="created") == []
    assert catalog.get_campaign("cmp-000000000000") is None


def test_concurrent_inserts_of_same_segment_land_once(catalog: Catalog) -> None:
    rec = make_record(7)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(catalog.add_segment(rec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert len(catalog.segments()) == 1


def test_bad_urls_and_queries(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a database URL"):
        Catalog("definitely not a url")
    with pytest.raises(StorageError):
        Catalog("nosuchdialect://x/y")
    with pytest.raises(ConfigError):
        SegmentQuery(limit=0)
