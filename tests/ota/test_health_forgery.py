"""The two rollout forgeries of the fleet-trust issue (§1), through the server's HTTP API.

1. A vehicle the director keeps on v1 (outside the canary) reports ``model_version: "2", collisions: 1``:
   it must not abort the fleet-wide rollout of v2.
2. Four honest canary vehicles at ~50 interventions/h against a control at ~0/h abort the canary; one
   control vehicle claiming the canary version over a 0–1e12 s window with 0 interventions must not
   turn that into a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from driveloop.ota.cohorts import in_cohort
from driveloop.ota.server import ServerConfig, create_app

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
TOL = {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}
PLAN = {"stages": [
    {"name": "canary", "fraction": 0.5, "min_duration_s": 0.0, "min_evaluations": 1, "tolerances": TOL},
    {"name": "100%", "fraction": 1.0, "min_duration_s": 0.0, "min_evaluations": 1, "tolerances": TOL},
]}
IDS = [f"car{i:03d}" for i in range(40)]
CANARY = [v for v in IDS if in_cohort(v, 0.5)][:4]
CONTROL = [v for v in IDS if not in_cohort(v, 0.5)][:5]  # the last one forges
NOW_S = 10_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW_S

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from tests.ota.test_server import write_release

    write_release(tmp_path / "ota", ["1", "2"])
    app = create_app(ServerConfig(tmp_path / "ota", "admin-token-0123456789", background_eval=False), clock=Clock())
    with TestClient(app) as c:
        tokens = {v: c.post("/v1/vehicles", json={"vehicle_id": v}, headers=ADMIN).json()["token"]
                  for v in CANARY + CONTROL}
        r = c.post("/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": PLAN}, headers=ADMIN)
        assert r.status_code == 201, r.text
        for v, tok in tokens.items():  # each vehicle asks the director, installs and confirms what it was told
            offer = c.get("/v1/update", params={"vehicle": v}, headers=_auth(tok)).json()
            assert offer["version"] == ("2" if v in CANARY else "1")
            r = c.post("/v1/installed", json={"vehicle_id": v, "version": offer["version"]}, headers=_auth(tok))
            assert r.status_code == 200, r.text
        yield c, tokens


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _report(v: str, version: str, start_s: float, end_s: float, interventions: int = 0,
            collisions: int = 0) -> dict[str, Any]:
    return {"vehicle_id": v, "model_version": version, "window_start_s": start_s, "window_end_s": end_s,
            "seq": 1, "ticks": int((end_s - start_s) * 10) if end_s - start_s < 1e8 else 10**9,
            "fallback_interventions": interventions, "collisions": collisions, "deadline_misses": 0,
            "inference_p99_ms": 7.5, "crashes": 0}


def _evaluate(c: TestClient) -> dict[str, Any]:
    r = c.post("/v1/rollouts/1/evaluate", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_control_vehicle_claiming_the_new_version_with_a_collision_does_not_abort(fleet: Any) -> None:
    c, tokens = fleet
    forger = CONTROL[-1]
    c.post("/v1/health", json=_report(forger, "2", NOW_S - 600, NOW_S, collisions=1), headers=_auth(tokens[forger]))
    status = _evaluate(c)
    assert status["status"] != "aborted", status["reason"]
    assert 'driveloop_ota_health_rejected_total{reason="not_confirmed"} 1.0' in c.get("/metrics").text


def test_a_control_vehicle_claiming_the_canary_over_a_huge_window_cannot_pass_a_bad_model(fleet: Any) -> None:
    c, tokens = fleet
    for v in CANARY:  # ~50 interventions/h over 600 s
        c.post("/v1/health", json=_report(v, "2", NOW_S - 600, NOW_S, interventions=8), headers=_auth(tokens[v]))
    for v in CONTROL[:-1]:
        c.post("/v1/health", json=_report(v, "1", NOW_S - 600, NOW_S), headers=_auth(tokens[v]))
    forger = CONTROL[-1]
    c.post("/v1/health", json=_report(forger, "2", 0.0, 1e12), headers=_auth(tokens[forger]))
    status = _evaluate(c)
    assert status["status"] == "aborted", status
    assert status["stage"] == "canary"


def test_rules_2_logs_replay_as_decided() -> None:
    """Rules 3 add a minimum of control vehicles; a logged rules-2 plan keeps rules 2's gate."""
    from driveloop.ota.controller import GATE_RULES
    from driveloop.ota.gates import evaluate_active

    assert GATE_RULES[2].active is evaluate_active
