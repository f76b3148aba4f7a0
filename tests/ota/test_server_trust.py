"""Fleet-server trust (real uvicorn on 127.0.0.1): one 401 for every bad vehicle credential, revocation
(disable / enable / rotate) over the admin API and from the CLI, effective on the next request and
audited under the admin token's name, admin tokens of at least 16 characters, tokens never sent over
plain HTTP beyond loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from driveloop.cli import main
from driveloop.core.exceptions import ConfigError
from driveloop.ota.server import ServerConfig, create_app
from driveloop.ota.store import BAD_CREDENTIALS, FleetStore
from tests.ota.test_server import ADMIN, ALICE, Running, admin, report, start_server

VEHICLES = ["veh-1", "veh-2"]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Running, dict[str, str]]]:
    with start_server(tmp_path) as r:
        tokens = {v: httpx.post(f"{r.url}/v1/vehicles", json={"vehicle_id": v}, headers=admin(ALICE)).json()["token"]
                  for v in VEHICLES}
        yield r, tokens


def _health(url: str, vehicle: str, token: str, seq: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/health", json=report(vehicle, "1", seq, 5000.0 + seq), headers=admin(token))


def _update(url: str, vehicle: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/update", params={"vehicle": vehicle}, headers=admin(token))


def test_unknown_vehicle_and_wrong_token_get_the_same_401(srv: tuple[Running, dict[str, str]]) -> None:
    r, tokens = srv
    cases = [("ghost", tokens["veh-1"]), ("veh-1", "wrong"), ("veh-1", tokens["veh-2"]), ("ghost", "wrong"),
             ("veh-1", "Bearer")]
    answers = set()
    for vehicle, token in cases:
        for resp in (_health(r.url, vehicle, token, 1), _update(r.url, vehicle, token)):
            answers.add((resp.status_code, resp.text))
    assert answers == {(401, json.dumps({"error": BAD_CREDENTIALS}, separators=(",", ":")))}


def _actions(store: FleetStore) -> list[tuple[str, str, str]]:
    return [(e.actor, e.payload["action"], e.payload["vehicle_id"]) for e in store.audit_entries()
            if e.kind == "vehicle"]


def test_disable_enable_rotate_over_the_api(srv: tuple[Running, dict[str, str]]) -> None:
    r, tokens = srv
    tok = tokens["veh-1"]
    assert _health(r.url, "veh-1", tok, 1).status_code == 200
    d = httpx.post(f"{r.url}/v1/vehicles/veh-1/disable", headers=admin(ALICE))
    assert d.status_code == 200 and d.json() == {"vehicle_id": "veh-1", "enabled": False, "token": None}
    disabled = [_health(r.url, "veh-1", tok, 2), _update(r.url, "veh-1", tok)]
    assert [x.status_code for x in disabled] == [403, 403] and "disabled" in disabled[0].json()["error"]
    assert _update(r.url, "veh-2", tokens["veh-2"]).status_code == 200  # only that vehicle
    assert httpx.post(f"{r.url}/v1/vehicles/veh-1/enable", headers=admin()).json()["enabled"] is True
    assert _health(r.url, "veh-1", tok, 2).status_code == 200
    rot = httpx.post(f"{r.url}/v1/vehicles/veh-1/rotate", headers=admin(ALICE)).json()
    assert rot["enabled"] is True and rot["token"] and rot["token"] != tok
    assert _health(r.url, "veh-1", tok, 3).status_code == 401
    assert _health(r.url, "veh-1", rot["token"], 3).status_code == 200
    store = r.app.state.service.store
    assert _actions(store) == [("alice", "enrol", "veh-1"), ("alice", "enrol", "veh-2"),
                               ("alice", "disable", "veh-1"), ("admin", "enable", "veh-1"),
                               ("alice", "rotate", "veh-1")]
    assert store.verify_audit().ok


@pytest.mark.parametrize("path,headers,code,message", [
    ("/v1/vehicles/ghost/disable", admin(), 404, "no vehicle"),
    ("/v1/vehicles/veh-1/explode", admin(), 422, "action"),
    ("/v1/vehicles/veh-1/disable", {}, 401, "missing admin"),
    ("/v1/vehicles/veh-1/disable", admin("a-vehicle-token-but-not-admin"), 403, "invalid admin"),
])
def test_vehicle_actions_refused(srv: tuple[Running, dict[str, str]], path: str, headers: dict[str, str], code: int,
                                 message: str) -> None:
    r, tokens = srv
    resp = httpx.post(f"{r.url}{path}", headers=headers)
    assert resp.status_code == code and message in resp.json()["error"]
    assert _update(r.url, "veh-1", tokens["veh-1"]).status_code == 200


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_revocation_on_the_local_store_reaches_the_running_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        srv: tuple[Running, dict[str, str]]) -> None:
    """``ota vehicles …`` without DRIVELOOP_OTA_URL writes the store the server reads: no restart."""
    r, tokens = srv
    monkeypatch.setenv("DRIVELOOP_HOME", str(r.ota_dir.parent))
    monkeypatch.delenv("DRIVELOOP_OTA_URL", raising=False)
    monkeypatch.setenv("USER", "carol")
    assert _cli(capsys, "ota", "vehicles", "disable", "veh-2")[:2] == (0, "veh-2: disabled\n")
    assert _update(r.url, "veh-2", tokens["veh-2"]).status_code == 403
    assert _cli(capsys, "ota", "vehicles", "enable", "veh-2")[0] == 0
    code, out, _ = _cli(capsys, "ota", "vehicles", "rotate", "veh-2", "--json")
    new = json.loads(out)["token"]
    assert code == 0 and _update(r.url, "veh-2", tokens["veh-2"]).status_code == 401
    assert _update(r.url, "veh-2", new).status_code == 200
    code, out, _ = _cli(capsys, "ota", "vehicles", "list", "--json")
    assert [(v["vehicle_id"], v["enabled"]) for v in json.loads(out)["vehicles"]] == [("veh-1", True), ("veh-2", True)]
    assert [a for a in _actions(r.app.state.service.store) if a[2] == "veh-2"][1:] == [
        ("local:carol", "disable", "veh-2"), ("local:carol", "enable", "veh-2"), ("local:carol", "rotate", "veh-2")]
    code, _, err = _cli(capsys, "ota", "vehicles", "disable", "ghost")
    assert code == 9 and "unknown vehicle" in err and err.count("\n") == 1
    assert _cli(capsys, "ota", "vehicles", "disable", "..")[0] == 2


def test_cli_revocation_over_http_records_the_token_name(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          srv: tuple[Running, dict[str, str]]) -> None:
    r, tokens = srv
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DRIVELOOP_OTA_URL", r.url)
    monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", ALICE)
    code, out, _ = _cli(capsys, "ota", "vehicles", "disable", "veh-1", "--json")
    assert code == 0 and json.loads(out)["enabled"] is False
    assert _update(r.url, "veh-1", tokens["veh-1"]).status_code == 403
    assert _actions(r.app.state.service.store)[-1] == ("alice", "disable", "veh-1")
    code, _, err = _cli(capsys, "ota", "vehicles", "disable", "ghost")
    assert code == 9 and "404" in err


@pytest.mark.parametrize("kw", [{"admin_token": "x" * 15}, {"admin_token": ADMIN, "admin_tokens": {"bob": "y" * 15}},
                                {"admin_token": ADMIN, "admin_tokens": {"bad name": "y" * 20}}])
def test_admin_tokens_are_at_least_16_characters_and_well_named(tmp_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        create_app(ServerConfig(tmp_path / "ota", background_eval=False, **kw))


def test_ota_serve_refuses_short_admin_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", "short")
    code, _, err = _cli(capsys, "ota", "serve", "--port", "1")
    assert code == 2 and "at least 16" in err and err.count("\n") == 1
    monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKENS", "alice:tooshort")
    assert _cli(capsys, "ota", "serve", "--port", "1")[0] == 2


def test_admin_token_is_not_sent_over_plain_http_beyond_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    monkeypatch.setenv("DRIVELOOP_OTA_URL", "http://fleet.example.invalid:8700")
    monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", ADMIN)
    code, _, err = _cli(capsys, "ota", "rollout", "status", "1")
    assert code == 2 and "plain HTTP" in err


@pytest.mark.parametrize("vehicle", [".", "..", "-x", "a/b"])
def test_path_like_vehicle_ids_are_refused(srv: tuple[Running, dict[str, str]], vehicle: str) -> None:
    r, tokens = srv
    assert httpx.post(f"{r.url}/v1/vehicles", json={"vehicle_id": vehicle}, headers=admin()).status_code == 422
    assert _update(r.url, vehicle, tokens["veh-1"]).status_code == 422
    assert [v["vehicle_id"] for v in r.app.state.service.store.vehicles()] == VEHICLES
