"""Property-based fuzz of the fleet server's API over its OpenAPI schema (``tests/api_fuzz.py``):
whatever a vehicle, an operator or a stranger sends, the answer is never a 5xx."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.api_fuzz import ApiFuzzer
from tests.ota.test_server import ADMIN, PLAN, admin, report, start_server

EXAMPLES = 80  # per operation: about 20 s on 2 busy cores
SEEDS = {  # known-good bodies the run mutates: they get past authentication and validation to the store
    "POST /v1/health": [report("veh-1", "1", 1, 1000.0) | {"shadow": {"compared_ticks": 10, "disagreements": 1,
                                                                      "mean_abs_diff": 0.1}}],
    "POST /v1/rollouts": [{"version": "2", "previous_version": "1", "plan": PLAN}],
    "POST /v1/vehicles": [{"vehicle_id": "veh-9", "hardware_class": "cpu"}],
    "POST /v1/rollouts/{rollout_id}/{action}": [{"reason": "fuzz"}],
}


def test_no_request_gets_a_5xx(tmp_path: Path) -> None:
    with start_server(tmp_path, require_release=False) as srv:
        tokens = {v: httpx.post(f"{srv.url}/v1/vehicles", json={"vehicle_id": v}, headers=admin()).json()["token"]
                  for v in ("veh-1", "veh-2")}
        r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": PLAN},
                       headers=admin())
        assert r.status_code == 201, r.text
        fuzzer = ApiFuzzer(srv.url, srv.app.openapi(), credentials=[tokens["veh-1"], ADMIN, "wrong-token", None],
                           known={"vehicle_id": ["veh-1"], "vehicle": ["veh-1"], "rollout_id": [1],
                                  "version": ["2"], "previous_version": ["1"], "model_version": ["1", "2"]},
                           seeds=SEEDS, max_examples=EXAMPLES)
        report = fuzzer.run()
        assert srv.app.state.service.store.verify_audit().ok
    print("fleet server fuzz:", report.summary())
    assert report.server_errors == []
    assert len(report.per_operation) >= 9 and report.requests >= 9 * EXAMPLES // 2
    assert 200 in report.statuses and 422 in report.statuses
