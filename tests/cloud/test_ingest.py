"""Ingest server over real uvicorn on 127.0.0.1: auth table, upload/resume, bad-input table (catalog
and store unchanged), campaign endpoints, and the embedded LocalTransport on the same service."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import httpx
import pytest

from driveloop.cloud.auth import register_vehicle
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.ingest_service import ChunkWriter
from driveloop.cloud.ingest import IngestConfig, IngestService, create_app, serve_in_thread
from driveloop.cloud.store import ObjectStore
from driveloop.contracts.segment import validate_segment
from driveloop.edge.spool import Spool
from driveloop.cloud.local_transport import LocalTransport
from driveloop.edge.transport import HttpTransport, campaign_triggers
from driveloop.core.exceptions import AuthError, SegmentError, UploadError, UploadRejectedError
from driveloop.core.tokens import hash_token
from tests.fakes.transport import record_synthetic_segments

ADMIN = "admin-secret-token"
MAX_SEGMENT_BYTES = 1_000_000
MAX_CHUNK_BYTES = 16 * 1024


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Cloud:
    url: str
    service: IngestService
    store: ObjectStore
    catalog: Catalog
    staging: Path
    tokens: dict[str, str]
    clock: Clock

    def client(self, token: str | None) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers)

    def assert_unchanged(self, shas: list[str] | None = None) -> None:
        """Catalog and store hold exactly ``shas`` (default: nothing) and no partial is left."""
        want = sorted(shas or [])
        assert sorted(r.sha256 for r in self.catalog.segments()) == want
        assert self.store.shas() == want
        assert list(self.staging.glob("*.part")) == []


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    clock = Clock()
    store = ObjectStore(tmp_path / "store")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    staging = tmp_path / "uploads"
    config = IngestConfig(staging_dir=staging, max_segment_bytes=MAX_SEGMENT_BYTES,
                          max_chunk_bytes=MAX_CHUNK_BYTES, admin_token_hash=hash_token(ADMIN))
    app = create_app(store, catalog, config, clock=clock)
    tokens = {v: register_vehicle(catalog, v, clock()) for v in ("veh-a", "veh-b", "veh-off")}
    catalog.update_vehicle("veh-off", enabled=False)
    with serve_in_thread(app) as url:
        yield Cloud(url, app.state.service, store, catalog, staging, tokens, clock)
    catalog.close()


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Real recorded segments of veh-a (3, the middle one with an event) and veh-b (1); read-only."""
    spool = Spool(tmp_path_factory.mktemp("spool"), 10**9)
    return {
        "veh-a": record_synthetic_segments(spool, "veh-a", 3, ticks_per_segment=30, seed=1, event_segments=(1,)),
        "veh-b": record_synthetic_segments(spool, "veh-b", 1, ticks_per_segment=30, seed=2),
    }


def _upload_all(t: HttpTransport | LocalTransport, data: bytes, name: str, chunk: int = 10_000) -> dict[str, object]:
    sha = hashlib.sha256(data).hexdigest()
    status = t.start(sha, len(data), name)
    while not status.confirmed:
        assert status.upload_id is not None
        status = t.send_chunk(status.upload_id, status.offset, data[status.offset : status.offset + chunk])
    return status.to_json()


def test_upload_catalogs_a_validated_segment(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    path = segments["veh-a"][1]
    data = path.read_bytes()
    t = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    result = _upload_all(t, data, path.name)
    info = validate_segment(path)
    assert result["cataloged"] is True and result["sha256"] == info.sha256 == hashlib.sha256(data).hexdigest()
    rec = cloud.catalog.get_segment(info.sha256)
    assert rec is not None
    m = rec.meta
    assert (m.vehicle, m.scenario, m.seed, m.n_ticks, rec.size) == ("veh-a", "highway", 1, 30, len(data))
    assert m.events == info.meta.events and m.has_event and m.events
    assert rec.name == path.name and rec.ingested_at_s == cloud.clock()
    with cloud.store.open(info.sha256) as f:
        assert f.read() == data
    cloud.assert_unchanged([info.sha256])
    # declaring the same bytes again: "exists", nothing to send
    again = t.start(info.sha256, len(data), path.name)
    assert again.state == "exists" and again.confirmed and again.upload_id is None


def test_resume_after_a_new_connection(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    data = segments["veh-a"][0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    first = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    s = first.start(sha, len(data), "a.mcap")
    assert s.upload_id and s.offset == 0
    s = first.send_chunk(s.upload_id, 0, data[:15_000])
    s = first.send_chunk(s.upload_id, 15_000, data[15_000:30_000])
    assert (s.offset, s.state, s.cataloged) == (30_000, "open", False)
    first.close()
    second = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    resumed = second.start(sha, len(data), "a.mcap")
    assert (resumed.upload_id, resumed.offset) == (s.upload_id, 30_000)
    with cloud.client(cloud.tokens["veh-a"]) as c:
        head = c.head(f"/v1/uploads/{s.upload_id}")
        assert head.status_code == 200 and head.headers["Upload-Offset"] == "30000"
        assert head.headers["Upload-Length"] == str(len(data))
    with pytest.raises(UploadRejectedError) as conflict:
        second.send_chunk(s.upload_id, 10_000, data[10_000:20_000])
    assert conflict.value.status == 409 and conflict.value.offset == 30_000
    s = second.send_chunk(s.upload_id, 30_000, data[30_000:45_000])
    done = second.send_chunk(s.upload_id, 45_000, data[45_000:])
    assert done.confirmed and done.sha256 == sha
    # the reply got lost and the client retries the last chunk: same answer, nothing re-stored
    assert second.send_chunk(s.upload_id, 45_000, data[45_000:]).confirmed
    assert second.offset(s.upload_id).confirmed
    assert cloud.service.stats.segments_cataloged == 1
    cloud.assert_unchanged([sha])


def _declare(c: httpx.Client, data: bytes, sha: str | None = None, size: int | None = None) -> httpx.Response:
    return c.post("/v1/uploads", json={"sha256": sha or hashlib.sha256(data).hexdigest(),
                                       "size": len(data) if size is None else size, "name": "x.mcap"})


def _send(c: httpx.Client, data: bytes, sha: str | None = None) -> httpx.Response:
    """Declare and send ``data`` chunk by chunk; the first refusal (or the final reply) is returned."""
    r = _declare(c, data, sha)
    assert r.status_code == 200, r.text
    upload_id = r.json()["upload_id"]
    for offset in range(0, len(data), MAX_CHUNK_BYTES):
        r = c.patch(f"/v1/uploads/{upload_id}", content=data[offset : offset + MAX_CHUNK_BYTES],
                    headers={"Upload-Offset": str(offset)})
        if r.status_code != 200:
            break
    return r


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


BAD_INPUT = [
    # (case, who, action(data) -> response, expected status)
    ("truncated", "veh-a", lambda c, d: _send(c, d[: len(d) // 2]), 422),
    ("truncated-footer", "veh-a", lambda c, d: _send(c, d[:-10]), 422),
    ("bit-flip", "veh-a", lambda c, d: _send(c, _flip(d, len(d) // 3)), 422),
    ("not-mcap", "veh-a", lambda c, d: _send(c, b"\x00garbage" * 100), 422),
    ("wrong-hash", "veh-a", lambda c, d: _send(c, d, sha=hashlib.sha256(b"other").hexdigest()), 422),
    ("bad-sha-format", "veh-a", lambda c, d: _declare(c, d, sha="XYZ"), 422),
    ("zero-size", "veh-a", lambda c, d: _declare(c, d, size=0), 422),
    ("oversized-declared", "veh-a", lambda c, d: _declare(c, d, size=MAX_SEGMENT_BYTES + 1), 413),
    ("oversized-chunk", "veh-a", lambda c, d: c.patch(
        f"/v1/uploads/{_declare(c, d).json()['upload_id']}", content=d[: MAX_CHUNK_BYTES + 1],
        headers={"Upload-Offset": "0"}), 413),
    ("chunk-past-size", "veh-a", lambda c, d: c.patch(
        f"/v1/uploads/{_declare(c, d[:1000]).json()['upload_id']}", content=d[:2000],
        headers={"Upload-Offset": "0"}), 413),
    ("missing-offset", "veh-a", lambda c, d: c.patch(
        f"/v1/uploads/{_declare(c, d).json()['upload_id']}", content=d[:10]), 400),
    ("unknown-upload", "veh-a", lambda c, d: c.get("/v1/uploads/nope"), 404),
    ("not-json", "veh-a", lambda c, d: c.post("/v1/uploads", content=b"{nope"), 422),
    ("json-too-big", "veh-a", lambda c, d: c.post("/v1/uploads", content=b" " * 70_000), 413),
    ("no-token", None, lambda c, d: _declare(c, d), 401),
    ("unknown-vehicle", "ghost.secret", lambda c, d: _declare(c, d), 401),
    ("malformed-token", "no-dot-here", lambda c, d: _declare(c, d), 401),
    ("wrong-secret", "veh-a.wrongsecret", lambda c, d: _declare(c, d), 401),
    ("disabled-vehicle", "veh-off", lambda c, d: _declare(c, d), 403),
    ("other-vehicles-segment", "veh-b", lambda c, d: _send(c, d), 403),
    ("campaign-needs-admin", "veh-a", lambda c, d: c.post("/v1/campaigns", json={"name": "x", "condition": "ttc < 1"}), 403),
]


@pytest.mark.parametrize("who,action,expected", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(cloud: Cloud, segments: dict[str, list[Path]],
                                                  who: str | None, action, expected: int) -> None:  # type: ignore[no-untyped-def]
    token = cloud.tokens.get(who, who) if who else None
    data = segments["veh-a"][0].read_bytes()
    with cloud.client(token) as c:
        r = action(c, data)
    assert r.status_code == expected, r.text
    assert r.json()["error"]
    if expected == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
    cloud.assert_unchanged()


def test_refused_segments_mark_the_upload_failed(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    data = segments["veh-a"][0].read_bytes()
    with cloud.client(cloud.tokens["veh-a"]) as c:
        r = _send(c, data[:-10])
        assert r.status_code == 422 and "segment" in r.json()["error"].lower()
        failed = [u for u in cloud.catalog.uploads() if u.state == "failed"]
        assert len(failed) == 1 and failed[0].error
        # the same declaration later opens a fresh upload, the good bytes then land
        assert _send(c, data).status_code == 200
    assert cloud.service.stats.uploads_rejected == 1
    cloud.assert_unchanged([hashlib.sha256(data).hexdigest()])
    metrics = cloud.client(None).get("/metrics").text
    assert "driveloop_ingest_segments_cataloged_total 1.0" in metrics
    assert "driveloop_ingest_uploads_rejected_total 1.0" in metrics


def test_cannot_touch_another_vehicles_upload(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    data = segments["veh-a"][0].read_bytes()
    a = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    b = HttpTransport(cloud.url, cloud.tokens["veh-b"])
    s = a.start(hashlib.sha256(data).hexdigest(), len(data), "a.mcap")
    assert s.upload_id
    for call in (lambda: b.offset(s.upload_id), lambda: b.send_chunk(s.upload_id, 0, data[:10])):  # type: ignore[arg-type]
        with pytest.raises(AuthError) as e:
            call()
        assert e.value.status == 403
    assert a.offset(s.upload_id).offset == 0
    with pytest.raises(AuthError) as e:
        HttpTransport(cloud.url, "veh-a.bogus").start(s.sha256, s.size, "a.mcap")
    assert e.value.status == 401


def test_connection_refused_is_a_retryable_upload_error() -> None:
    t = HttpTransport("http://127.0.0.1:9", "veh-a.x", timeout_s=2.0)
    with pytest.raises(UploadError) as e:
        t.start("a" * 64, 10, "x.mcap")
    assert not isinstance(e.value, UploadRejectedError)


def test_campaign_endpoints(cloud: Cloud) -> None:
    admin, vehicle = cloud.client(ADMIN), cloud.client(cloud.tokens["veh-a"])
    spec = {"name": "low-ttc", "condition": "ttc < 1.5 or fallback", "trigger_mode": "rising_edge",
            "min_interval_s": 2.0, "pre_window_s": 4.0, "post_window_s": 3.0, "priority": 6,
            "expires_at_s": cloud.clock() + 3600}
    r = admin.post("/v1/campaigns", json=spec)
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    assert r.json()["state"] == "created"
    assert vehicle.get("/v1/campaigns").json() == {"campaigns": []}  # not approved yet
    assert vehicle.post(f"/v1/campaigns/{cid}/approve").status_code == 403
    r = admin.post(f"/v1/campaigns/{cid}/approve")
    assert r.status_code == 200 and r.json()["state"] == "approved"
    assert admin.post(f"/v1/campaigns/{cid}/approve").status_code == 422  # twice
    assert admin.post("/v1/campaigns/cmp-000000000000/approve").status_code == 404
    listed = HttpTransport(cloud.url, cloud.tokens["veh-a"]).campaigns()
    assert [c["id"] for c in listed] == [cid]
    (trigger,) = campaign_triggers(listed)
    assert (trigger.name, trigger.condition, trigger.mode) == ("campaign.low-ttc", spec["condition"], "rising_edge")
    assert (trigger.pre_s, trigger.post_s, trigger.priority, trigger.min_interval_s) == (4.0, 3.0, 6, 2.0)
    cloud.clock.t += 3601  # expired: vehicles stop receiving it
    assert vehicle.get("/v1/campaigns").json() == {"campaigns": []}
    for bad in ({"name": "x", "condition": "ttc <"}, {"name": "x", "condition": "__import__('os')"},
                {"name": "x", "condition": "speeed > 3"}, {"name": "x"}, {"name": "x", "condition": "ttc<1", "foo": 1},
                {"name": "Bad Name", "condition": "ttc < 1"}, ["not", "an", "object"]):
        r = admin.post("/v1/campaigns", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert [c.id for c in cloud.catalog.campaigns()] == [cid]
    assert cloud.client(None).get("/v1/campaigns").status_code == 401


def test_admin_api_disabled_without_admin_token(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(ObjectStore(tmp_path / "s"), catalog, IngestConfig(staging_dir=tmp_path / "u"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers={"Authorization": "Bearer anything"}) as c:
        r = c.post("/v1/campaigns", json={"name": "x", "condition": "ttc < 1"})
    assert r.status_code == 403 and "disabled" in r.json()["error"]
    catalog.close()


def test_local_transport_uses_the_same_validation(tmp_path: Path, segments: dict[str, list[Path]]) -> None:
    local = LocalTransport.under(tmp_path / "cloud", "veh-a")
    good = segments["veh-a"][2].read_bytes()
    assert _upload_all(local, good, "good.mcap")["cataloged"] is True
    with pytest.raises(UploadRejectedError) as torn:
        _upload_all(local, good[:-50], "torn.mcap")
    assert torn.value.status == 422 and isinstance(torn.value.__cause__, SegmentError)
    assert str(torn.value).startswith("segment torn.mcap refused: ") and "uploads" not in str(torn.value)
    declared = local.start(hashlib.sha256(b"other").hexdigest(), len(good), "x.mcap")
    assert declared.upload_id is not None
    with pytest.raises(UploadRejectedError) as wrong:
        local.send_chunk(declared.upload_id, 0, good)
    assert wrong.value.status == 422 and "sha256" in str(wrong.value)
    foreign = segments["veh-b"][0].read_bytes()
    with pytest.raises(AuthError):
        _upload_all(local, foreign, "foreign.mcap")
    catalog = local.service.catalog
    assert [r.sha256 for r in catalog.segments()] == [hashlib.sha256(good).hexdigest()]
    assert local.service.store.shas() == [hashlib.sha256(good).hexdigest()]
    assert local.campaigns() == []
    local.close()


def test_cli_manages_the_same_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], segments: dict[str, list[Path]]) -> None:
    """``driveloop cloud vehicles add`` issues a token the server accepts; bad campaign → one-line
    error, exit 2, nothing saved; ``segments list --json`` shows what was ingested."""
    import json

    from driveloop.cli import main
    from driveloop.cloud.ingest import build_app
    from driveloop.settings import load_settings

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    assert main(["cloud", "vehicles", "add", "veh-a", "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    assert main(["cloud", "vehicles", "add", "veh-a"]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["cloud", "campaigns", "create", "--name", "x", "--condition", "ttc <"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("driveloop: error:") and err.count("\n") == 1
    assert main(["cloud", "campaigns", "create", "--name", "near-miss", "--condition", "ttc < 1.5 or fallback",
                 "--priority", "6"]) == 0
    cid = capsys.readouterr().out.strip()
    assert main(["cloud", "campaigns", "approve", cid]) == 0
    assert main(["cloud", "campaigns", "approve", "cmp-000000000000"]) == 6  # unknown id: UploadRejectedError
    capsys.readouterr()

    s = load_settings()
    app = build_app(s.resolved_store_url(), s.resolved_catalog_url(), s.cloud_dir / "uploads")
    with serve_in_thread(app) as url:
        t = HttpTransport(url, token)
        assert _upload_all(t, segments["veh-a"][0].read_bytes(), "a.mcap")["cataloged"] is True
        assert [c["id"] for c in t.campaigns()] == [cid]
    assert main(["cloud", "segments", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["count"] == 1 and listed["segments"][0]["vehicle"] == "veh-a"
    assert list(listed["segments"][0]) == ["sha256", "vehicle", "scenario", "seed", "model_version", "start_s", "end_s",
                                           "n_ticks", "events", "has_event", "size", "ingested_at_s", "name",
                                           "consumed_by_dataset"]  # the JSON keys never change
    assert main(["cloud", "campaigns", "list", "--json"]) == 0
    assert [c["state"] for c in json.loads(capsys.readouterr().out)["campaigns"]] == ["approved"]
    assert main(["cloud", "uploads", "list", "--json", "--state", "done"]) == 0
    assert len(json.loads(capsys.readouterr().out)["uploads"]) == 1
    assert main(["cloud", "uploads", "expire", "--older-than-s", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"expired": []}
    assert main(["cloud", "uploads", "expire", "--older-than-s", "0"]) == 2


def test_cli_upload_drains_a_spool_into_the_local_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With no cloud URL configured, ``driveloop cloud upload`` lands segments in the embedded cloud."""
    import json

    from driveloop.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.delenv("DRIVELOOP_CLOUD_URL", raising=False)
    spool = Spool(home / "spool", 10**9)
    shas = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in record_synthetic_segments(spool, "veh-a", 2, ticks_per_segment=20, seed=8))
    record_synthetic_segments(spool, "veh-b", 1, ticks_per_segment=20, seed=9)
    assert main(["cloud", "upload", "--vehicle", "veh-a", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["sha256"]) == shas and out["pending"] == 0 and out["rejected"] == []
    assert [e.vehicle for e in spool.closed_segments()] == ["veh-b"]  # not its segments
    assert main(["cloud", "segments", "list", "--json", "--vehicle", "veh-a"]) == 0
    assert sorted(s["sha256"] for s in json.loads(capsys.readouterr().out)["segments"]) == shas
    assert main(["cloud", "upload", "--vehicle", "veh-a", "--spool-dir", str(tmp_path / "nope")]) == 2


def test_stale_uploads_expire_and_the_vehicle_starts_over(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    data = segments["veh-a"][0].read_bytes()
    t = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    s = t.start(hashlib.sha256(data).hexdigest(), len(data), "a.mcap")
    assert s.upload_id is not None
    t.send_chunk(s.upload_id, 0, data[:10_000])
    cloud.clock.t += 3_000
    fresh = t.start(hashlib.sha256(data[:500]).hexdigest(), 500, "b.mcap")  # another, recent upload
    assert cloud.service.expire_uploads(max_age_s=3_600) == []
    cloud.clock.t += 1_000
    assert cloud.service.expire_uploads(max_age_s=3_600) == [s.upload_id]
    assert list(cloud.staging.glob("*.part")) == []
    assert t.offset(s.upload_id).state == "failed"
    with pytest.raises(UploadRejectedError) as e:
        t.send_chunk(s.upload_id, 10_000, data[10_000:20_000])
    assert e.value.status == 422
    again = t.start(s.sha256, s.size, "a.mcap")
    assert again.upload_id != s.upload_id and again.offset == 0
    assert fresh.upload_id in {u.id for u in cloud.catalog.uploads(state="open")}


def test_streamed_oversized_chunk_is_cut_at_the_limit(cloud: Cloud, segments: dict[str, list[Path]]) -> None:
    """A chunked body (no Content-Length) over the limit: 413 once the limit is crossed; what arrived
    before is kept as a valid prefix (like a dropped connection) and the upload then completes."""
    data = segments["veh-a"][0].read_bytes()
    with cloud.client(cloud.tokens["veh-a"]) as c:
        upload_id = _declare(c, data).json()["upload_id"]
        pieces = (data[i : i + 4096] for i in range(0, 3 * MAX_CHUNK_BYTES, 4096))
        r = c.patch(f"/v1/uploads/{upload_id}", content=pieces, headers={"Upload-Offset": "0"})
        assert r.status_code == 413 and "chunk larger" in r.json()["error"]
        offset = int(r.headers["Upload-Offset"])
        assert offset == MAX_CHUNK_BYTES
        assert cloud.catalog.segments() == [] and cloud.store.shas() == []
    t = HttpTransport(cloud.url, cloud.tokens["veh-a"])
    status = t.offset(upload_id)
    while not status.confirmed:
        status = t.send_chunk(upload_id, status.offset, data[status.offset : status.offset + MAX_CHUNK_BYTES])
    cloud.assert_unchanged([hashlib.sha256(data).hexdigest()])


def test_fsspec_object_store_behind_the_ingest(tmp_path: Path, segments: dict[str, list[Path]]) -> None:
    """The non-local (fsspec URL) store path, as an ``s3://`` deployment would use it."""
    url = f"memory://ingest-{tmp_path.name}"
    local = LocalTransport.under(tmp_path / "cloud", "veh-a", store_url=url)
    data = segments["veh-a"][1].read_bytes()
    assert _upload_all(local, data, "a.mcap")["cataloged"] is True
    sha = hashlib.sha256(data).hexdigest()
    assert local.service.store.shas() == [sha] and not local.service.store.is_local
    url_of = local.service.store.url_of(sha)
    assert url_of.startswith("memory://") and url_of.endswith(f"/segments/{sha[:2]}/{sha}.mcap")
    with fsspec.open(url_of, "rb") as f:  # a reader given the URL finds the same bytes
        assert f.read() == data
    local.close()


def test_concurrent_requests_on_one_upload_never_interleave(tmp_path: Path, segments: dict[str, list[Path]]) -> None:
    """A second request waits for the one holding the upload (busy_wait_s), then sees the settled
    state: 409 busy if it is still held, the final status if the first one completed the upload."""
    import threading

    data = segments["veh-a"][0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    def service(name: str, busy_wait_s: float) -> tuple[IngestService, str]:
        catalog = Catalog(f"sqlite:///{tmp_path / name / 'c.db'}")
        svc = IngestService(ObjectStore(tmp_path / name / "s"), catalog,
                            IngestConfig(staging_dir=tmp_path / name / "u", busy_wait_s=busy_wait_s))
        upload_id = svc.begin(svc.ensure_local_vehicle("veh-a"), sha, len(data), "a.mcap").upload_id
        assert upload_id is not None
        return svc, upload_id

    impatient, uid = service("a", busy_wait_s=0.05)
    writer = impatient.open_chunk("veh-a", uid, 0, None)
    assert isinstance(writer, ChunkWriter) and impatient.uploads_in_flight() == 1
    writer.write(data[:1000])
    with pytest.raises(UploadRejectedError) as busy:
        impatient.open_chunk("veh-a", uid, 0, None)
    assert busy.value.status == 409 and busy.value.offset == 0  # nothing durable yet
    assert writer.close().offset == 1000 and impatient.uploads_in_flight() == 0

    patient, uid = service("b", busy_wait_s=30.0)
    writer = patient.open_chunk("veh-a", uid, 0, None)
    assert isinstance(writer, ChunkWriter)
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(patient.open_chunk("veh-a", uid, 0, None)))
    waiter.start()
    writer.write(data)
    final = writer.close()
    waiter.join()
    assert final.confirmed and results == [final]  # the waiter got the final status, not a 409
    for svc in (impatient, patient):
        svc.catalog.close()
