"""Abuse of the ingest server (real uvicorn on 127.0.0.1): per-vehicle quotas with 429 + Retry-After and
the automatic expiry of stale uploads, revocation from the CLI effective on the next request, one 401
for every bad credential, named admin tokens, the vehicle-id and upload-name rules, hostile JSON."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from driveloop.cli import main
from driveloop.cloud.auth import BAD_CREDENTIALS, register_vehicle
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.ingest import IngestConfig, IngestService, build_app, create_app, serve_in_thread
from driveloop.cloud.quotas import QuotaConfig
from driveloop.cloud.store import ObjectStore
from driveloop.core.exceptions import ConfigError, QuotaExceededError
from driveloop.core.tokens import hash_token
from driveloop.edge.transport import HttpTransport
from tests.cloud.test_ingest import Clock

ALICE = "alice-admin-token-0123"

QUOTAS = QuotaConfig(max_open_uploads=2, max_staged_bytes=1500, max_bytes_per_hour=36_000, stale_upload_s=600.0,
                     max_retry_after_s=900)


@dataclass
class Cloud:
    url: str
    service: IngestService
    catalog: Catalog
    staging: Path
    tokens: dict[str, str]
    clock: Clock

    def client(self, token: str | None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={} if token is None else {"Authorization": f"Bearer {token}"})


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    clock = Clock()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    config = IngestConfig(staging_dir=tmp_path / "uploads", max_chunk_bytes=16 * 1024, quotas=QUOTAS,
                          admin_tokens={"alice": hash_token(ALICE)})
    app = create_app(ObjectStore(tmp_path / "store"), catalog, config, clock=clock)
    tokens = {v: register_vehicle(catalog, v, clock()) for v in ("veh-a", "veh-b")}
    with serve_in_thread(app) as url:
        yield Cloud(url, app.state.service, catalog, tmp_path / "uploads", tokens, clock)
    catalog.close()


def _declare(c: httpx.Client, seed: str, size: int, name: str = "x.mcap") -> httpx.Response:
    return c.post("/v1/uploads", json={"sha256": hashlib.sha256(seed.encode()).hexdigest(), "size": size,
                                       "name": name})


# -- quotas ------------------------------------------------------------------------------------------

def test_open_uploads_quota_answers_429_with_retry_after_and_never_blocks_a_resume(cloud: Cloud) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a, cloud.client(cloud.tokens["veh-b"]) as b:
        first = _declare(a, "one", 100)
        cloud.clock.t += 100
        assert first.status_code == 200 and _declare(a, "two", 100).status_code == 200
        r = _declare(a, "three", 100)
        assert r.status_code == 429 and "open uploads" in r.json()["error"]
        assert r.headers["Retry-After"] == "500"  # the oldest open upload goes stale 600 s after it was touched
        assert _declare(a, "one", 100).json()["upload_id"] == first.json()["upload_id"]  # resuming is never refused
        assert _declare(b, "three", 100).status_code == 200  # quotas are per vehicle
    assert len(cloud.catalog.uploads("open", vehicle="veh-a")) == 2


def test_staged_bytes_quota_counts_declared_sizes(cloud: Cloud) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a:
        assert _declare(a, "big", 1000).status_code == 200
        r = _declare(a, "more", 501)
        assert r.status_code == 429 and "staged bytes" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
        assert _declare(a, "fits", 500).status_code == 200


def test_bytes_per_hour_quota_refills_and_the_transport_reports_retry_after(tmp_path: Path) -> None:
    """36 000 bytes per hour = 10 bytes per second: two 16 000-byte chunks leave 4 000 in the bucket, so
    the third waits (16 000 - 4 000) / 10 = 1 200 s; nothing of it is kept; after that it is accepted."""
    clock = Clock()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    quotas = QuotaConfig(max_open_uploads=None, max_staged_bytes=None, max_bytes_per_hour=36_000)
    config = IngestConfig(staging_dir=tmp_path / "uploads", max_chunk_bytes=16_000, quotas=quotas)
    app = create_app(ObjectStore(tmp_path / "store"), catalog, config, clock=clock)
    token = register_vehicle(catalog, "veh-a", clock())
    with serve_in_thread(app) as url:
        t = HttpTransport(url, token)
        s = t.start(hashlib.sha256(b"stream").hexdigest(), 100_000, "s.mcap")
        assert s.upload_id is not None
        assert t.send_chunk(s.upload_id, 0, b"x" * 16_000).offset == 16_000
        assert t.send_chunk(s.upload_id, 16_000, b"x" * 16_000).offset == 32_000
        with pytest.raises(QuotaExceededError) as e:
            t.send_chunk(s.upload_id, 32_000, b"x" * 16_000)
        assert e.value.retry_after_s == 1200 and "bytes per hour" in str(e.value)
        assert t.offset(s.upload_id).offset == 32_000
        clock.t += 1199
        with pytest.raises(QuotaExceededError):
            t.send_chunk(s.upload_id, 32_000, b"x" * 16_000)
        clock.t += 1
        assert t.send_chunk(s.upload_id, 32_000, b"x" * 16_000).offset == 48_000
        t.close()
    catalog.close()


def test_stale_uploads_expire_automatically_and_free_the_quota(cloud: Cloud) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a:
        old = _declare(a, "one", 100).json()["upload_id"]
        r = a.patch(f"/v1/uploads/{old}", content=b"x" * 40, headers={"Upload-Offset": "0"})
        assert r.status_code == 200 and list(cloud.staging.glob("*.part"))
        assert _declare(a, "two", 100).status_code == 200
        cloud.clock.t += 601  # no request touched them for longer than stale_upload_s
        assert _declare(a, "three", 100).status_code == 200  # the sweep ran first: both slots were freed
        assert a.get(f"/v1/uploads/{old}").json()["state"] == "failed"
    assert [u.sha256 for u in cloud.catalog.uploads("open", vehicle="veh-a")] == [
        hashlib.sha256(b"three").hexdigest()]
    assert list(cloud.staging.glob("*.part")) == []


# -- revocation from the CLI, uniform 401 ------------------------------------------------------------

def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_disable_enable_rotate_take_effect_on_the_next_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.settings import load_settings

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    code, out, _ = _cli(capsys, "cloud", "vehicles", "add", "veh-a", "--json")
    token = json.loads(out)["token"]
    s = load_settings()
    app = build_app(s.resolved_store_url(), s.resolved_catalog_url(), s.cloud_dir / "uploads")
    with serve_in_thread(app) as url:  # one server for the whole test: no restart between the commands

        def status(tok: str) -> int:
            return httpx.get(f"{url}/v1/campaigns", headers={"Authorization": f"Bearer {tok}"}).status_code

        assert status(token) == 200
        assert _cli(capsys, "cloud", "vehicles", "disable", "veh-a")[:2] == (0, "veh-a: disabled\n")
        assert status(token) == 403
        assert _cli(capsys, "cloud", "vehicles", "enable", "veh-a", "--json")[1] == \
            '{"vehicle": "veh-a", "enabled": true, "token": null}\n'
        assert status(token) == 200
        code, new, _ = _cli(capsys, "cloud", "vehicles", "rotate", "veh-a")
        new = new.strip()
        assert code == 0 and new.startswith("veh-a.") and new != token
        assert (status(token), status(new)) == (401, 200)
    code, _, err = _cli(capsys, "cloud", "vehicles", "disable", "ghost")
    assert code == 2 and err.startswith("driveloop: error:") and "unknown vehicle" in err and err.count("\n") == 1
    for bad in (".", "..", "a b"):
        code, _, err = _cli(capsys, "cloud", "vehicles", "disable", bad)
        assert code == 2 and "invalid vehicle id" in err


def test_every_bad_credential_gets_the_same_401(cloud: Cloud) -> None:
    """An unknown vehicle must read exactly like a wrong secret: ids cannot be enumerated."""
    secret_b = cloud.tokens["veh-b"].split(".", 1)[1]
    answers = set()
    for token in ("ghost.secret", "veh-a.wrong-secret", f"veh-a.{secret_b}", "no-dot-here", "..secret", "...",
                  f"ghost.{secret_b}"):
        with cloud.client(token) as c:
            r = _declare(c, "x", 10)
        answers.add((r.status_code, r.text, r.headers.get("WWW-Authenticate")))
    assert answers == {(401, json.dumps({"error": BAD_CREDENTIALS}, separators=(",", ":")), "Bearer")}
    assert cloud.catalog.uploads() == []


# -- named admin tokens ------------------------------------------------------------------------------

def test_admin_actions_are_recorded_under_the_token_name(cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="driveloop.cloud.ingest_service"), cloud.client(ALICE) as admin:
        r = admin.post("/v1/campaigns", json={"name": "near-miss", "condition": "ttc < 1.5", "actor": "mallory"})
        assert r.status_code == 422  # the body names no actor
        r = admin.post("/v1/campaigns", json={"name": "near-miss", "condition": "ttc < 1.5"})
        assert r.status_code == 201, r.text
        assert admin.post(f"/v1/campaigns/{r.json()['id']}/approve").status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if "campaign" in rec.getMessage()]
    assert len(lines) == 2 and all(line.endswith(" by alice") for line in lines)
    with cloud.client("not-alice-but-long-enough") as other:
        assert other.post("/v1/campaigns", json={"name": "x", "condition": "ttc < 1"}).status_code == 403


def test_admin_tokens_are_at_least_16_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        build_app(str(tmp_path / "s"), f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "u",
                  admin_tokens={"admin": "x" * 15})
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    code, _, err = _cli(capsys, "cloud", "serve", "--port", "1", "--admin-token", "short-token")
    assert code == 2 and "at least 16" in err and err.count("\n") == 1
    monkeypatch.setenv("DRIVELOOP_CLOUD_ADMIN_TOKENS", "alice:" + "y" * 15)
    code, _, err = _cli(capsys, "cloud", "serve", "--port", "1")
    assert code == 2 and "at least 16" in err


# -- ids and names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [".", "..", "-rf", "a/b", "veh\x00", ""])
def test_vehicle_ids_that_could_move_state_are_refused(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``.`` and ``..`` would put the uploader's state one folder up (``<home>/uploader/..``)."""
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "spool" / "closed").mkdir(parents=True)
    assert _cli(capsys, "cloud", "vehicles", "add", bad)[0] == 2
    code, _, err = _cli(capsys, "cloud", "upload", "--vehicle", bad, "--max-s", "1")
    assert code == 2 and "invalid vehicle id" in err
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["spool"]  # no state written anywhere
    with pytest.raises(ConfigError):
        register_vehicle(Catalog(f"sqlite:///{tmp_path / 'c.db'}"), bad, 0.0)


@pytest.mark.parametrize("name", ["a\x00b.mcap", "evil\u202egpj.mcap", "zero\u200bwidth.mcap", "line\nbreak.mcap",
                                  "..", ".", "a/b.mcap", "a\\b.mcap", "x" * 256, ""])
def test_upload_names_with_control_or_bidi_characters_are_refused(cloud: Cloud, name: str) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a:
        r = _declare(a, "x", 10, name=name)
    assert r.status_code == 422 and "plain file name" in r.json()["error"]
    assert cloud.catalog.uploads() == []


def test_plain_unicode_names_are_accepted(cloud: Cloud) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a:
        assert _declare(a, "x", 10, name="straße 2026-01-01 .mcap").status_code == 200


# -- hostile JSON ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status", [
    (b"[" * 30_000 + b"]" * 30_000, 422),  # RecursionError in the parser before the depth bound
    (b'{"a":' * 17 + b"1" + b"}" * 17, 422),
    (b'{"sha256": "' + b"a" * 64 + b'", "size": NaN, "name": "x"}', 422),
    (b'{"sha256": "' + b"a" * 64 + b'", "size": Infinity, "name": "x"}', 422),
    (b'{"sha256": "' + b"a" * 64 + b'", "size": 1e400, "name": "x"}', 422),
    (b'{"sha256": "' + b"a" * 64 + b'", "size": ' + b"9" * 40 + b', "name": "x"}', 413),
])
def test_hostile_json_is_a_4xx(cloud: Cloud, body: bytes, status: int) -> None:
    with cloud.client(cloud.tokens["veh-a"]) as a:
        r = a.post("/v1/uploads", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        with cloud.client(ALICE) as admin:
            assert admin.post("/v1/campaigns", content=body).status_code in (413, 422)
    assert cloud.catalog.uploads() == []
