"""Fleet servers and ingest servers as replicas over one PostgreSQL (started here from Debian's
``postgresql`` binaries, as tests/cloud/test_postgres.py does) and one shared data directory.

- Two ``driveloop ota serve`` replicas: vehicles enrol, check for updates, confirm installs and report
  health at both (each request at the other replica than the last); the state is one, the audit chain
  verifies, and evaluations are never closer together than the evaluation interval (decided once).
- Two fleet services racing for one evaluation: the second waits on the advisory lock and then finds
  nothing due (exactly one decision); a replica killed while it holds the lock mid-decision leaves no
  trace but the health report it had committed, and another replica decides with that report.
- Two ``driveloop cloud serve`` replicas: an upload begun at one continues at the other, a chunk sent to
  both at once is taken by one, and every segment is cataloged once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cloud.test_postgres import _free_port, _fresh_database, server  # noqa: F401  (the PostgreSQL fixture)
from tests.fakes.serve import driveloop_command
from tests.ota.test_server import PLAN, FakeClock, report, write_release

pytestmark = pytest.mark.slow
ADMIN = "replica-admin-token-0123456789"
CLI = driveloop_command()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRIVELOOP_", "RAY_ADDRESS"))}
    return {**env, "DRIVELOOP_HOME": str(home), "DRIVELOOP_OTA_ADMIN_TOKEN": ADMIN, **extra}


class Replicas:
    """Server processes started by a test, each on its own loopback port; stopped by their pids."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str], probe: str) -> str:
        port = _free_port()
        proc = subprocess.Popen([*args, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"replica exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            try:
                httpx.get(url + probe, timeout=2.0)
                return url
            except httpx.TransportError:
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    r = Replicas()
    try:
        yield r
    finally:
        r.stop()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------------- fleet servers


def test_two_fleet_server_replicas_share_one_postgres(server: str, tmp_path: Path,  # noqa: F811
                                                      replicas: Replicas) -> None:
    from driveloop.ota.store import FleetStore, events

    db = _fresh_database(server)
    write_release(tmp_path / "ota", ["1", "2"])
    env = _env(tmp_path, DRIVELOOP_FLEET_DB_URL=db)
    urls = [replicas.start([*CLI, "ota", "serve", "--eval-interval-s", "1"], env, "/metrics") for _ in range(2)]
    vehicles = [f"veh-r{i}" for i in range(6)]
    tokens = {}
    for i, v in enumerate(vehicles):  # enrolled at both replicas, half each
        r = httpx.post(f"{urls[i % 2]}/v1/vehicles", json={"vehicle_id": v}, headers=_auth(ADMIN))
        assert r.status_code == 201, r.text
        tokens[v] = r.json()["token"]
    r = httpx.post(f"{urls[1]}/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": PLAN},
                   headers=_auth(ADMIN))
    assert r.status_code == 201, r.text

    rounds, accepted = 4, 0
    last_end = {v: time.time() - 60.0 for v in vehicles}
    for k in range(rounds):
        time.sleep(0.5)  # each window a little longer than the last report's
        for i, v in enumerate(vehicles):
            here, there = urls[(i + k) % 2], urls[(i + k + 1) % 2]
            offer = httpx.get(f"{here}/v1/update", params={"vehicle": v}, headers=_auth(tokens[v])).json()
            running = offer["version"] or "1"
            r = httpx.post(f"{there}/v1/installed", json={"vehicle_id": v, "version": running},
                           headers=_auth(tokens[v]))
            assert r.status_code == 200, r.text  # confirmed at the other replica than the one that assigned
            now = time.time()
            body = {**report(v, running, k + 1, now), "window_start_s": last_end[v], "window_end_s": now,
                    "ticks": int((now - last_end[v]) * 10)}
            last_end[v] = now
            r = httpx.post(f"{here}/v1/health", json=body, headers=_auth(tokens[v]))
            assert r.status_code == 200 and r.json()["accepted"], r.text
            accepted += 1
    # a replica accepts no report twice, whichever replica took the first
    r = httpx.post(f"{urls[0]}/v1/health", json={**report(vehicles[0], "1", rounds, time.time())},
                   headers=_auth(tokens[vehicles[0]]))
    assert r.status_code == 409

    store = FleetStore(db)
    with store.engine.connect() as c:
        from sqlalchemy import func, select

        from driveloop.ota.store import health

        assert c.execute(select(func.count()).select_from(health)).scalar() == accepted
        evaluate_times = [row[0] for row in c.execute(select(events.c.at_s).where(events.c.kind == "evaluate")
                                                     .order_by(events.c.id))]
    assert {v["vehicle_id"] for v in store.vehicles()} == set(vehicles)
    assert store.verify_audit().ok
    assert evaluate_times and all(b - a >= 1.0 for a, b in zip(evaluate_times, evaluate_times[1:]))
    a, b = (httpx.get(f"{u}/v1/rollouts/1").json() for u in urls)
    assert a == b  # one rollout, the same from both replicas


def _service(db: str, clock: Any) -> Any:
    from driveloop.ota.server import FleetService
    from driveloop.ota.store import FleetStore

    return FleetService(FleetStore(db), clock, eval_interval_s=60.0)


def _waiting_for_lock(db: str) -> int:
    import psycopg

    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
        return int(row[0]) if row else 0


def _start_rollout(service: Any, at_s: float) -> int:
    from driveloop.ota.controller import RolloutPlan

    return int(service.store.create_rollout("2", "1", RolloutPlan.from_dict(PLAN), at_s, "test"))


def test_racing_replicas_decide_an_evaluation_once(server: str) -> None:  # noqa: F811
    db = _fresh_database(server)
    clock = FakeClock(1000.0)
    first, second = _service(db, clock), _service(db, clock)  # two engines: two replicas' connection pools
    rid = _start_rollout(first, 1000.0)
    clock.t = 1000.0 + 61.0  # an evaluation is due
    inside, go = threading.Event(), threading.Event()
    window = first.window

    def held_window(r: Any) -> Any:  # the first replica is mid-decision, holding the lock
        inside.set()
        assert go.wait(60)
        return window(r)

    first.window = held_window
    results: dict[str, Any] = {}
    t1 = threading.Thread(target=lambda: results.update(first=first.evaluate()))
    t1.start()
    assert inside.wait(60)
    t2 = threading.Thread(target=lambda: results.update(second=second.evaluate()))
    t2.start()
    while _waiting_for_lock(db) != 1 and t2.is_alive():  # the second replica waits on the advisory lock
        time.sleep(0.05)
    waited = t2.is_alive()
    go.set()
    t1.join()
    t2.join()
    assert waited, "the second replica did not wait for the first one's decision"
    assert results["first"] is not None and results["second"] is None
    assert [e.kind for e in second.store.events(rid)] == ["start", "evaluate"]
    assert second.store.verify_audit().ok


CHILD = """
import sys, time
from pathlib import Path
from driveloop.contracts.fleet import HealthReport
from driveloop.ota.server import FleetService
from driveloop.ota.store import FleetStore

db, marker, body = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
service = FleetService(FleetStore(db), time.time, eval_interval_s=60.0)
def stuck(r):  # mid-decision: the lock is held, nothing is committed yet
    marker.write_text("in")
    time.sleep(3600)
service.window = stuck
service.ingest(HealthReport.model_validate_json(body))
"""


def test_a_replica_killed_mid_decision_loses_nothing(server: str, tmp_path: Path) -> None:  # noqa: F811
    import json

    from driveloop.contracts.fleet import InstallConfirmation, VehicleEnrol

    db = _fresh_database(server)
    survivor = _service(db, time.time)
    rid = _start_rollout(survivor, time.time() - 120.0)  # an evaluation is due
    survivor.enrol(VehicleEnrol(vehicle_id="veh-k0"))
    offer = survivor.offer("veh-k0")
    survivor.confirm(InstallConfirmation(vehicle_id="veh-k0", version=offer.version or "1"))
    now = time.time()
    body = json.dumps({**report("veh-k0", offer.version or "1", 1, now), "window_start_s": now - 60.0,
                       "window_end_s": now, "ticks": 600})
    marker = tmp_path / "mid-decision"
    child = subprocess.Popen([sys.executable, "-c", CHILD, db, str(marker), body])
    try:
        while not marker.exists():
            assert child.poll() is None, "the replica died before its decision"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # killed holding the lock, mid-decision
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert [e.kind for e in survivor.store.events(rid)] == ["start"]  # its decision left no trace
    d = survivor.evaluate()  # not blocked: PostgreSQL released the dead replica's lock
    assert d is not None
    evs = survivor.store.events(rid)
    assert [e.kind for e in evs] == ["start", "evaluate"]
    cohorts = evs[-1].data["window"]
    assert sum(int(c["reports"]) for c in (cohorts["canary"], cohorts["control"])) == 1  # its report counted
    assert survivor.store.verify_audit().ok


# ------------------------------------------------------------------------------------- ingest servers


def test_two_ingest_replicas_share_catalog_store_and_staging(server: str, tmp_path: Path,  # noqa: F811
                                                              replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from driveloop.cli import main
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.store import ObjectStore
    from driveloop.edge.spool import Spool
    from tests.fakes.transport import record_synthetic_segments

    db = _fresh_database(server)
    home = tmp_path / "home"
    env = _env(home, DRIVELOOP_CATALOG_URL=db)
    for k, v in env.items():
        if k.startswith("DRIVELOOP_"):
            monkeypatch.setenv(k, v)
    tokens = {}
    for v in ("veh-i0", "veh-i1"):
        assert main(["cloud", "vehicles", "add", v, "--json"]) == 0
        tokens[v] = json.loads(capsys.readouterr().out)["token"]
    urls = [replicas.start([*CLI, "cloud", "serve"], env, "/healthz") for _ in range(2)]
    cat = Catalog(db)
    spool = Spool(tmp_path / "spool", 10**9)
    segments = [(v, p) for i, v in enumerate(tokens)
                for p in record_synthetic_segments(spool, v, 2, ticks_per_segment=30, seed=i)]

    def patch(url: str, v: str, upload: str, offset: int, chunk: bytes) -> httpx.Response:
        return httpx.patch(f"{url}/v1/uploads/{upload}", content=chunk,
                           headers={**_auth(tokens[v]), "Upload-Offset": str(offset)}, timeout=30)

    for k, (v, path) in enumerate(segments):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        a, b = urls[k % 2], urls[(k + 1) % 2]
        r = httpx.post(f"{a}/v1/uploads", json={"sha256": sha, "size": len(data), "name": path.name},
                       headers=_auth(tokens[v]))
        assert r.status_code in (200, 201), r.text
        upload = r.json()["upload_id"]
        half = len(data) // 2
        assert patch(b, v, upload, 0, data[:half]).status_code == 200  # begun at one replica, continued at the other
        rest = data[half:]
        both: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda u=u: both.append(patch(u, v, upload, half, rest))) for u in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(x.status_code for x in both)
        assert codes[0] == 200 and all(c in (200, 409) for c in codes), [x.text for x in both]
        final = httpx.get(f"{a}/v1/uploads/{upload}", headers=_auth(tokens[v])).json()
        assert final["cataloged"] and final["sha256"] == sha, final
    records = cat.new_segments()
    assert sorted(r.sha256 for r in records) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for _, p in segments)
    store = ObjectStore(home / "cloud" / "store")
    assert store.shas() == sorted(r.sha256 for r in records)
    assert not list((home / "cloud" / "uploads").glob("*.part"))
    cat.close()
