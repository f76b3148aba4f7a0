"""The demo fleet's health reports: each vehicle reports what it measured itself (its own inference
latency, its own shadow comparisons), so the rollout gates can tell canary from control."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from driveloop._demo_fleet import DemoFleet, SimVehicle
from driveloop.cloud.fleet_shards import FleetShardPool
from driveloop.contracts.fleet import HealthReport
from driveloop.edge.health_window import HealthWindowResult
from driveloop.edge.ota_client import ActiveModel
from tests.fakes.runner import StubClient


class _FakeOta:
    """The OtaClient surface ``drive_window`` uses; ``report`` builds the wire model the server would get."""

    def __init__(self, vehicle_id: str, version: str, shadow: str | None = None) -> None:
        self.vehicle_id = vehicle_id
        self.active = ActiveModel(version, Path("unused.onnx"), {"sha256": version}, trial=False)
        self.shadow = None if shadow is None else ActiveModel(shadow, Path("unused.onnx"), {"sha256": shadow}, False)
        self.reports: list[HealthReport] = []

    def start(self) -> ActiveModel:
        return self.active

    def close_window(self, result: HealthWindowResult) -> None:
        raise AssertionError("no vehicle is on trial here")

    def report(self, model_version: str, window_start_s: float, window_end_s: float, metrics: Any,
               inference_p99_ms: float, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        self.reports.append(HealthReport(
            vehicle_id=self.vehicle_id, model_version=model_version, window_start_s=window_start_s,
            window_end_s=window_end_s, seq=len(self.reports), ticks=metrics.ticks,
            fallback_interventions=metrics.interventions, collisions=metrics.collisions,
            deadline_misses=metrics.watchdog.get("deadline", 0), inference_p99_ms=inference_p99_ms, crashes=0,
            shadow=shadow))
        return {}


def test_each_vehicle_reports_its_own_latency_and_shadow_comparisons() -> None:
    # car000 runs v1 (10 ms a call); car001 and car002 run v2 (20 ms) with v3 in shadow, which
    # disagrees on batch row 0 of their group only: car001.
    clients = {"1": StubClient(latency_s=0.010), "2": StubClient(latency_s=0.020),
               "3": StubClient(latency_s=0.030, accel_offset_by_row={0: 2.0})}
    otas = [_FakeOta("car000", "1"), _FakeOta("car001", "2", shadow="3"), _FakeOta("car002", "2", shadow="3")]
    fleet = object.__new__(DemoFleet)  # no fleet server: the vehicles' OTA sessions are fakes
    fleet.vehicles = [SimVehicle(o.vehicle_id, o, route_seed=i) for i, o in enumerate(otas)]  # type: ignore[arg-type]
    fleet._runtimes, fleet._active, fleet.pool = {}, {}, FleetShardPool(1)  # one shard: these stubs, in this thread
    fleet._client = lambda model: clients[model.version]  # type: ignore[method-assign]
    fleet.drive_window(0.0, 1.0, "highway", window_seed=0)
    reports = [o.reports[0] for o in otas]
    assert [r.inference_p99_ms for r in reports] == [10.0, 20.0, 20.0]
    assert reports[0].shadow is None
    s1, s2 = reports[1].shadow, reports[2].shadow
    assert s1 is not None and s2 is not None
    assert (s1.compared_ticks, s1.disagreements, s2.compared_ticks, s2.disagreements) == (10, 10, 10, 0)
    assert abs(s1.mean_abs_diff - 2.0) < 1e-5 and s2.mean_abs_diff == 0.0
