"""Fleet server against a real uvicorn on 127.0.0.1 (ephemeral port): auth, the rollout flow through
the director, bad input on every endpoint (table-driven, state unchanged), TUF static files, /metrics."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from driveloop.ota.cohorts import in_cohort
from driveloop.ota.controller import replay
from driveloop.ota.server import ServerConfig, create_app
from driveloop.ota.store import BAD_CREDENTIALS, FleetStore
from tests.fakes.serve import ota_serve

ADMIN = "admin-token-0123456789"
ALICE = "alice-token-0123456789"  # a second, named admin token


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Running:
    url: str
    app: FastAPI
    clock: FakeClock
    ota_dir: Path


def serve_in_thread(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Start uvicorn on an ephemeral 127.0.0.1 port in a daemon thread; returns once it accepts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, thread


def write_release(ota_dir: Path, versions: list[str]) -> None:
    """A real TUF targets metadata file naming ``versions`` as model targets (what `ota release` writes)."""
    from tuf.api.metadata import Metadata, TargetFile, Targets

    targets = Targets(version=1)
    for v in versions:
        t = TargetFile.from_data(f"models/{v}/model.onnx", f"onnx-{v}".encode())
        t.unrecognized_fields["custom"] = {"model_version": v}
        targets.targets[t.path] = t
    md_dir = ota_dir / "repo" / "metadata"
    md_dir.mkdir(parents=True, exist_ok=True)
    Metadata(targets).to_file(str(md_dir / "1.targets.json"))


@contextlib.contextmanager
def start_server(tmp: Path, **kw: Any) -> Iterator[Running]:
    ota_dir = tmp / "ota"
    write_release(ota_dir, ["1", "2"])
    clock = FakeClock()
    app = create_app(ServerConfig(ota_dir, ADMIN, eval_interval_s=60.0, background_eval=False,
                                  admin_tokens={"alice": ALICE}, **kw), clock=clock)
    url, server, thread = serve_in_thread(app)
    try:
        yield Running(url, app, clock, ota_dir)
    finally:
        server.should_exit = True
        thread.join()


PLAN = {"stages": [
    {"name": "shadow", "fraction": 0.25, "shadow": True, "min_duration_s": 0.0, "min_evaluations": 1,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1, "min_shadow_ticks": 100}},
    {"name": "canary", "fraction": 0.25, "min_duration_s": 0.0, "min_evaluations": 1,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}},
    {"name": "100%", "fraction": 1.0, "min_duration_s": 0.0, "min_evaluations": 1,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}},
]}
FLEET = [f"veh-{i:03d}" for i in range(24)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with start_server(tmp_path_factory.mktemp("srv")) as r:
        yield r


@pytest.fixture(scope="module")
def tokens(srv: Running) -> dict[str, str]:
    out = {}
    for v in FLEET:
        resp = httpx.post(f"{srv.url}/v1/vehicles", json={"vehicle_id": v}, headers=admin())
        assert resp.status_code == 201, resp.text
        out[v] = resp.json()["token"]
    return out


@pytest.fixture(scope="module")
def fleet(srv: Running, tokens: dict[str, str]) -> Fleet:
    return Fleet(srv, tokens)


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def report(v: str, version: str, seq: int, t: float, interventions: int = 1, shadow: bool = False,
           collisions: int = 0) -> dict[str, Any]:
    d: dict[str, Any] = {"vehicle_id": v, "model_version": version, "window_start_s": t - 600.0, "window_end_s": t,
                         "seq": seq, "ticks": 6000, "fallback_interventions": interventions,
                         "collisions": collisions, "deadline_misses": 0, "inference_p99_ms": 7.5, "crashes": 0}
    if shadow:
        d["shadow"] = {"compared_ticks": 6000, "disagreements": 30, "mean_abs_diff": 0.05}
    return d


class Fleet:
    """Vehicles that ask the server what to run and report health for it."""

    def __init__(self, srv: Running, tokens: dict[str, str]) -> None:
        self.srv, self.tokens, self.seq = srv, tokens, {v: 0 for v in tokens}
        self.running = {v: "1" for v in tokens}
        self.ever_v2: set[str] = set()

    def window(self, bad: bool = False) -> list[dict[str, Any]]:
        self.srv.clock.t += 600.0
        out = []
        with httpx.Client(base_url=self.srv.url) as c:
            for v, tok in self.tokens.items():
                offer = c.get("/v1/update", params={"vehicle": v}, headers=admin(tok)).json()
                if offer["version"]:
                    self.running[v] = offer["version"]
                r = c.post("/v1/installed", json={"vehicle_id": v, "version": self.running[v]}, headers=admin(tok))
                assert r.status_code == 200, r.text  # the updater confirms what the director assigned
                if self.running[v] == "2":
                    self.ever_v2.add(v)
                self.seq[v] += 1
                body = report(v, self.running[v], self.seq[v], self.srv.clock.t,
                              interventions=12 if bad and self.running[v] == "2" else 1,
                              shadow=offer["shadow_version"] == "2")
                r = c.post("/v1/health", json=body, headers=admin(tok))
                assert r.status_code == 200, r.text
                out.append(r.json())
        return out


def state_of(srv: Running) -> tuple[Any, ...]:
    """Everything a bad request must leave unchanged."""
    store = srv.app.state.service.store
    rid = store.latest_rollout_id()
    from sqlalchemy import text

    with store.engine.connect() as c:
        vehicles = c.execute(text("SELECT vehicle_id, token_sha256, last_seq, last_version FROM vehicles")).all()
        health_rows = c.execute(text("SELECT count(*) FROM health")).scalar()
    return (rid, len(store.events(rid)) if rid else 0, len(store.audit_entries()), vehicles, health_rows,
            store.update_outcomes(), store.load(rid).state if rid else None)


def test_good_rollout_end_to_end(srv: Running, fleet: Fleet) -> None:
    fleet.window()  # reports on v1 before any rollout: no decision
    r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": PLAN},
                   headers=admin())
    assert r.status_code == 201, r.text
    rid = r.json()["rollout_id"]
    assert r.json()["stage"] == "shadow"
    stages = []
    for _ in range(8):
        fleet.window()
        st = httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()
        stages.append(st["stage"])
        if st["status"] == "completed":
            break
    assert st["status"] == "completed", stages
    assert set(fleet.running.values()) == {"2"}
    store = srv.app.state.service.store
    assert replay(store.events(rid)) == store.load(rid).state
    assert store.verify_audit().ok
    assert store.update_outcomes()["success"] == len(FLEET)
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert f'driveloop_ota_rollout_status{{rollout="{rid}",status="completed"}} 1.0' in metrics
    assert 'driveloop_ota_updates_total{outcome="success"} 24.0' in metrics
    assert "driveloop_ota_request_seconds_bucket" in metrics
    assert f'driveloop_ota_cohort_size{{cohort="canary",rollout="{rid}"}} 24.0' in metrics
    assert 'driveloop_ota_fleet_vehicles{version="2"} 24.0' in metrics
    assert f'driveloop_ota_health_vehicles{{cohort="canary",rollout="{rid}",stage="100%"}} 24.0' in metrics
    assert 'driveloop_ota_decisions_total{action="promote"} 2.0' in metrics


def test_bad_canary_is_aborted_and_reverted(srv: Running, tokens: dict[str, str], fleet: Fleet) -> None:
    assert set(fleet.running.values()) == {"2"}  # the fleet is on v2 now; roll out v3 on top
    write_release(srv.ota_dir, ["1", "2", "3"])
    plan = {"stages": PLAN["stages"][1:]}
    r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "3", "previous_version": "2", "plan": plan},
                   headers=admin())
    assert r.status_code == 201, r.text
    rid = r.json()["rollout_id"]
    canary = {v for v in FLEET if in_cohort(v, 0.25)}
    exposed: set[str] = set()
    for _ in range(3):
        with httpx.Client(base_url=srv.url) as c:
            srv.clock.t += 600.0
            for v, tok in tokens.items():
                offer = c.get("/v1/update", params={"vehicle": v}, headers=admin(tok)).json()
                fleet.running[v] = offer["version"]
                assert c.post("/v1/installed", json={"vehicle_id": v, "version": offer["version"]},
                              headers=admin(tok)).status_code == 200
                if offer["version"] == "3":
                    exposed.add(v)
                fleet.seq[v] += 1
                body = report(v, fleet.running[v], fleet.seq[v], srv.clock.t,
                              interventions=15 if fleet.running[v] == "3" else 1)
                assert c.post("/v1/health", json=body, headers=admin(tok)).status_code == 200
        if httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["status"] == "aborted":
            break
    st = httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()
    assert st["status"] == "aborted" and "interventions_per_h" in st["reason"]
    assert exposed == canary
    offers = {httpx.get(f"{srv.url}/v1/update", params={"vehicle": v}, headers=admin(t)).json()["version"]
              for v, t in tokens.items()}
    assert offers == {"2"}


def test_tuf_files_served_with_range(srv: Running) -> None:
    target = srv.ota_dir / "repo" / "targets" / "blob.bin"
    target.write_bytes(bytes(range(256)) * 4)
    r = httpx.get(f"{srv.url}/tuf/targets/blob.bin", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == (bytes(range(256)) * 4)[100:200]
    assert httpx.get(f"{srv.url}/tuf/metadata/1.targets.json").json()["signed"]["_type"] == "targets"
    assert httpx.get(f"{srv.url}/tuf/metadata/../../fleet.db").status_code == 404


def _bad_cases(tokens: dict[str, str]) -> list[tuple[str, str, str, dict[str, Any], int, str]]:
    v0, v1 = FLEET[0], FLEET[1]
    t0 = admin(tokens[v0])
    ok = report(v0, "2", 10_000, 9e6)
    return [
        ("health: no token", "POST", "/v1/health", {"json": ok}, 401, BAD_CREDENTIALS),
        ("health: wrong token", "POST", "/v1/health", {"json": ok, "headers": admin("nope")}, 401, BAD_CREDENTIALS),
        ("health: another vehicle's token", "POST", "/v1/health",
         {"json": ok, "headers": admin(tokens[v1])}, 401, BAD_CREDENTIALS),
        ("health: unknown vehicle", "POST", "/v1/health",
         {"json": report("ghost", "2", 1, 9e6), "headers": t0}, 401, BAD_CREDENTIALS),
        ("health: malformed json", "POST", "/v1/health",
         {"content": b"{not json", "headers": t0 | {"Content-Type": "application/json"}}, 422, "invalid request"),
        ("health: bad field", "POST", "/v1/health",
         {"json": ok | {"ticks": -5}, "headers": t0}, 422, "ticks"),
        ("health: unknown field", "POST", "/v1/health",
         {"json": ok | {"speed": 1}, "headers": t0}, 422, "speed"),
        ("health: out-of-order seq", "POST", "/v1/health",
         {"json": report(v0, "2", 1, 9e6), "headers": t0}, 409, "not after"),
        ("health: seq above 2**63", "POST", "/v1/health", {"json": ok | {"seq": 2**64}, "headers": t0}, 422, "seq"),
        ("health: ticks above 2**63", "POST", "/v1/health",
         {"json": ok | {"ticks": 2**63 + 5}, "headers": t0}, 422, "ticks"),
        ("health: deeply nested", "POST", "/v1/health",
         {"content": b"[" * 50_000 + b"]" * 50_000, "headers": t0 | {"Content-Type": "application/json"}}, 413,
         "at most"),
        ("health: nested within the size limit", "POST", "/v1/health",
         {"content": b"[" * 30_000 + b"]" * 30_000, "headers": t0 | {"Content-Type": "application/json"}}, 400,
         "parsing the body"),
        ("update: no token", "GET", f"/v1/update?vehicle={v0}", {}, 401, BAD_CREDENTIALS),
        ("update: unknown vehicle", "GET", "/v1/update?vehicle=ghost", {"headers": t0}, 401, BAD_CREDENTIALS),
        ("update: missing vehicle", "GET", "/v1/update", {"headers": t0}, 422, "vehicle"),
        ("update: bad vehicle id", "GET", "/v1/update?vehicle=../etc", {"headers": t0}, 422, "vehicle_id"),
        ("update: bad current version", "GET", f"/v1/update?vehicle={v0}&current=a%20b", {"headers": t0}, 422,
         "current_version"),
        ("enrol: no token", "POST", "/v1/vehicles", {"json": {"vehicle_id": "new-1"}}, 401, "missing admin"),
        ("enrol: vehicle token", "POST", "/v1/vehicles", {"json": {"vehicle_id": "new-1"}, "headers": t0}, 403,
         "invalid admin"),
        ("enrol: duplicate", "POST", "/v1/vehicles", {"json": {"vehicle_id": v0}, "headers": admin()}, 409,
         "already enrolled"),
        ("enrol: bad id", "POST", "/v1/vehicles", {"json": {"vehicle_id": "../x"}, "headers": admin()}, 422,
         "vehicle_id"),
        ("start: wrong admin", "POST", "/v1/rollouts", {"json": {"version": "9", "previous_version": "2"},
                                                        "headers": admin("x" * 20)}, 403, "invalid admin"),
        ("start: not released", "POST", "/v1/rollouts",
         {"json": {"version": "9", "previous_version": "2"}, "headers": admin()}, 409, "not released"),
        ("start: version not canonical", "POST", "/v1/rollouts",
         {"json": {"version": "v3", "previous_version": "2"}, "headers": admin()}, 422, "version"),
        ("start: bad plan", "POST", "/v1/rollouts", {"json": {"version": "3", "previous_version": "2",
                                                              "plan": {"stages": []}}, "headers": admin()}, 422,
         "at least one stage"),
        ("start: stages not a list", "POST", "/v1/rollouts", {"json": {"version": "3", "previous_version": "2",
                                                                       "plan": {"stages": "abc"}},
                                                              "headers": admin()}, 422, "stages"),
        ("start: stage not an object", "POST", "/v1/rollouts", {"json": {"version": "3", "previous_version": "2",
                                                                         "plan": {"stages": [1]}},
                                                                "headers": admin()}, 422, "stages"),
        ("start: malformed json", "POST", "/v1/rollouts",
         {"content": b"[", "headers": admin() | {"Content-Type": "application/json"}}, 422, "invalid request"),
        ("status: unknown rollout", "GET", "/v1/rollouts/999", {}, 404, "no rollout"),
        ("pause: no token", "POST", "/v1/rollouts/{rid}/pause", {}, 401, "missing admin"),
        ("pause: unknown rollout", "POST", "/v1/rollouts/999/pause", {"headers": admin()}, 404, "no rollout"),
        ("promote during abort", "POST", "/v1/rollouts/{rid}/promote", {"headers": admin()}, 409,
         "cannot promote"),
        ("resume during abort", "POST", "/v1/rollouts/{rid}/resume", {"headers": admin()}, 409, "cannot resume"),
        ("unknown action", "POST", "/v1/rollouts/{rid}/explode", {"headers": admin()}, 422, "unknown action"),
        ("health: oversized body", "POST", "/v1/health",
         {"content": b" " * 70_000, "headers": t0 | {"Content-Type": "application/json"}}, 413, "at most"),
        ("operator: actor in the body", "POST", "/v1/rollouts/{rid}/pause",
         {"json": {"actor": "mallory"}, "headers": admin()}, 422, "actor"),
    ]


def test_bad_input_is_rejected_and_changes_nothing(srv: Running, tokens: dict[str, str]) -> None:
    r = httpx.post(f"{srv.url}/v1/health", json=report(FLEET[0], "2", 9_999, 9e6 - 1), headers=admin(tokens[FLEET[0]]))
    assert r.status_code == 200, r.text
    rid = srv.app.state.service.store.latest_rollout_id()
    assert httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["status"] == "aborted"  # from the test above
    failures = []
    with httpx.Client(base_url=srv.url) as c:
        for name, method, path, kw, code, message in _bad_cases(tokens):
            before = state_of(srv)
            r = c.request(method, path.format(rid=rid), **kw)
            after = state_of(srv)
            body = r.json()
            if r.status_code != code or message not in body.get("error", "") or before != after:
                failures.append((name, r.status_code, body, before == after))
    assert failures == []


def test_promote_then_pause_and_resume_via_api(srv: Running) -> None:
    """The audit's actor is the name of the admin token used (``alice``), never a name in the body."""
    write_release(srv.ota_dir, ["1", "2", "3", "4"])
    r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "4", "previous_version": "2"}, headers=admin())
    rid = r.json()["rollout_id"]
    assert httpx.post(f"{srv.url}/v1/rollouts", json={"version": "4", "previous_version": "2"},
                      headers=admin()).status_code == 409  # one active rollout at a time
    for action, status, stage in [("pause", "paused", "shadow"), ("promote", "paused", "canary"),
                                  ("resume", "running", "canary"), ("abort", "aborted", "canary")]:
        r = httpx.post(f"{srv.url}/v1/rollouts/{rid}/{action}", json={"reason": "test"}, headers=admin(ALICE))
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["stage"]) == (status, stage)
    entries = srv.app.state.service.store.audit_entries(rid)
    assert [e.payload.get("action") for e in entries if e.kind == "operator"] == ["pause", "promote", "resume",
                                                                                  "abort"]
    assert all(e.actor == "alice" for e in entries if e.kind == "operator")


def test_store_survives_restart(srv: Running) -> None:
    store = FleetStore.at(srv.ota_dir)  # a second process opening the same file
    live = srv.app.state.service.store
    rid = live.latest_rollout_id()
    assert store.load(rid).state == live.load(rid).state
    assert store.verify_audit().ok and len(store.audit_entries()) == len(live.audit_entries())


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | str]:
    from driveloop.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    if code == 0 and "--json" in args:
        import json

        return code, json.loads(out.out)
    return code, out.err


def test_cli_rollout_against_the_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    monkeypatch.delenv("DRIVELOOP_OTA_URL", raising=False)
    assert _cli(capsys, "ota", "rollout", "status")[0] == 9  # no rollout yet
    write_release(tmp_path / "ota", ["1", "2"])
    code, err = _cli(capsys, "ota", "rollout", "start", "9", "--previous", "1")
    assert code == 9 and "not released" in str(err)
    code, st = _cli(capsys, "ota", "rollout", "start", "2", "--previous", "1", "--json")
    assert code == 0 and isinstance(st, dict) and (st["stage"], st["status"]) == ("shadow", "running")
    steps = [("pause", 0, "paused"), ("resume", 0, "running"), ("resume", 9, "not paused"),
             ("promote", 0, "canary"), ("abort", 0, "aborted"), ("promote", 9, "cannot promote")]
    for action, want, expect in steps:
        code, out = _cli(capsys, "ota", "rollout", action, "--reason", "cli test", "--json")
        assert code == want, (action, out)
        assert expect in (str(out) if code else f"{out['status']} {out['stage']}")  # type: ignore[index]
    code, st = _cli(capsys, "ota", "rollout", "status", "1", "--json")
    assert isinstance(st, dict) and st["status"] == "aborted" and st["reason"].endswith("cli test")
    assert FleetStore.at(tmp_path / "ota").verify_audit().ok


def test_cli_serve_and_remote_rollout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_release(tmp_path / "ota", ["1", "2"])
    with ota_serve(tmp_path, lambda url: httpx.get(f"{url}/v1/dashboard", timeout=1.0).status_code == 200,
                   {"DRIVELOOP_OTA_ADMIN_TOKEN": ADMIN}) as url:
        monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "elsewhere"))  # remote mode needs no local store
        monkeypatch.setenv("DRIVELOOP_OTA_URL", url)
        monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", ADMIN)
        code, st = _cli(capsys, "ota", "rollout", "start", "2", "--previous", "1", "--json")
        assert code == 0 and isinstance(st, dict) and st["rollout_id"] == 1
        code, st = _cli(capsys, "ota", "rollout", "pause", "--json")
        assert code == 0 and isinstance(st, dict) and st["status"] == "paused"
        code, err = _cli(capsys, "ota", "rollout", "pause")
        assert code == 9 and "409" in str(err) and "already paused" in str(err)
        monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", "wrong-token-wrong-token")
        code, err = _cli(capsys, "ota", "rollout", "abort", "1")
        assert code == 9 and "403" in str(err)
        assert httpx.get(f"{url}/v1/rollouts/1").json()["status"] == "paused"


def test_background_evaluation_decides_without_reports(tmp_path: Path) -> None:
    """A silent fleet still gets decisions: the background loop evaluates every eval_interval_s."""
    ota_dir = tmp_path / "ota"
    write_release(ota_dir, ["1", "2"])
    clock = FakeClock()
    app = create_app(ServerConfig(ota_dir, ADMIN, eval_interval_s=0.05, background_eval=True), clock=clock)
    url, server, thread = serve_in_thread(app)
    try:
        rid = httpx.post(f"{url}/v1/rollouts", json={"version": "2", "previous_version": "1"},
                         headers=admin()).json()["rollout_id"]
        store = app.state.service.store
        clock.t += 600.0
        for _ in range(500):
            if len(store.events(rid)) > 1:
                break
            time.sleep(0.02)
        ev = store.events(rid)
        assert [e.kind for e in ev][:2] == ["start", "evaluate"]
        d = httpx.get(f"{url}/v1/rollouts/{rid}").json()["last_decision"]
        assert d["action"] == "hold" and d["reason"].startswith("inconclusive")
        assert len(store.events(rid)) == 2  # the clock did not move again: no second evaluation
    finally:
        server.should_exit = True
        thread.join()
