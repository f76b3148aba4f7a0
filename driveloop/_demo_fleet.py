"""The demo's fleet: simulated vehicles that boot from their A/B slots, ask the fleet server's director
what to run, drive a window in the simulator, and report health — the real OTA path, end to end.

Each window is one "start" of every vehicle: a vehicle with a pending update boots it on trial, and the
window's outcome commits or reverts it (the health window of the A/B updater). Vehicles running the
same model are batched together; a vehicle told to shadow a release runs it beside its active model.

Given a ``FleetShardPool`` of several shards, the vehicles are driven over that many cores
(``cloud.fleet_shards``: the first shard in this thread, the others in worker processes kept for the demo's
life). Each vehicle drives and records exactly as in one thread; the OTA side (starts, trial windows, health
reports to the fleet server) stays in this process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from driveloop.cloud.fleet_shards import FleetShardPool, Recording
from driveloop.cloud.sim_exec import ModelPayload
from driveloop.core.atomic import write_atomic
from driveloop.edge.health_window import HealthWindowResult
from driveloop.edge.agent import AgentConfig
from driveloop.edge.fleet import FleetReport, InferenceClient, InProcessInference, VehiclePlan, run_fleet
from driveloop.edge.ota_client import ActiveModel, OtaClient
from driveloop.edge.updater import VehicleUpdater

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimVehicle:
    vehicle_id: str
    client: OtaClient
    route_seed: int


def _manifest(data: dict[str, Any]) -> Any:
    from driveloop.contracts.manifest import ModelManifest

    return ModelManifest.model_validate(data)


class DemoFleet:
    """Vehicles enrolled at the fleet server and provisioned with the factory model (v1)."""

    def __init__(self, fleet_dir: Path, server_url: str, admin_token: str, vehicles: int, seed: int,
                 http: httpx.Client, pool: FleetShardPool | None = None) -> None:
        self.fleet_dir, self.server_url, self.http, self.seed = fleet_dir, server_url, http, seed
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.vehicles = [self._vehicle(i) for i in range(vehicles)]
        self._runtimes: dict[str, Any] = {}
        self._payloads: dict[str, ModelPayload] = {}  # sha256 -> the model's bytes, for the shards' processes
        self._active: dict[str, ActiveModel] = {}  # what each vehicle ran in the last window
        # The caller's pool (its owner closes it); none: one shard, this thread alone.
        self.pool = pool or FleetShardPool(1, device="auto")

    # -- enrolment and factory provisioning ----------------------------------------------------------
    def _vehicle(self, i: int) -> SimVehicle:
        vid = f"car{i:03d}"
        vdir = self.fleet_dir / vid
        cred_file = vdir / "credential.json"
        if not cred_file.exists():
            r = self.http.post(f"{self.server_url}/v1/vehicles", json={"vehicle_id": vid, "hardware_class": "cpu"},
                               headers=self.admin)
            r.raise_for_status()
            write_atomic(cred_file, json.dumps(r.json()).encode(), mode=0o600)
        token = json.loads(cred_file.read_text())["token"]
        return SimVehicle(vid, OtaClient(vid, self.server_url, token, vdir, http=self.http), self.seed * 1000 + i)

    def provision(self, trusted_root: bytes, factory_model: Path, manifest: dict[str, Any],
                  director_root: bytes | None = None) -> None:
        """Factory setup of every vehicle not yet provisioned (idempotent: a resumed demo keeps slots);
        with ``director_root`` each installs only what the director signs for it (Uptane)."""
        for v in self.vehicles:
            if not (self.fleet_dir / v.vehicle_id / "boot.json").exists():
                VehicleUpdater.provision(self.fleet_dir / v.vehicle_id, trusted_root, factory_model, manifest,
                                         director_root=director_root, vehicle_id=v.vehicle_id)

    # -- one window --------------------------------------------------------------------------------------
    def _client(self, model: ActiveModel) -> InferenceClient:
        from driveloop.edge.runtime import ModelRuntime

        key = model.manifest["sha256"]
        if key not in self._runtimes:
            rt = ModelRuntime(model.path, _manifest(model.manifest), device="auto")
            rt.warmup()
            self._runtimes[key] = InProcessInference(rt, simulated_deadline=True)  # host stalls are not model faults
        return self._runtimes[key]

    def _payload(self, model: ActiveModel) -> ModelPayload:
        key = model.manifest["sha256"]
        if key not in self._payloads:
            self._payloads[key] = ModelPayload.read(model.path, _manifest(model.manifest))
        return self._payloads[key]

    def recording(self, spool_dir: Path, quota_bytes: int, campaigns: Any = ()) -> Recording:
        """What the next window's vehicles record into: segments name the model each one runs in it."""
        return Recording(spool_dir, quota_bytes, {}, Recording.trigger_fields(campaigns))

    def versions(self) -> dict[str, int]:
        """How many vehicles run each version right now (what their next start boots)."""
        out: dict[str, int] = {}
        for v in self.vehicles:
            version = str(v.client.updater.state().slot(v.client.updater.state().running).version)
            out[version] = out.get(version, 0) + 1
        return out

    def sync(self) -> dict[str, int]:
        """Every vehicle asks the director and installs what it is told (boots it on its next start)."""
        actions: dict[str, int] = {}
        for v in self.vehicles:
            if v.vehicle_id not in self._active:  # never started yet: its first start asks the slots
                self._active[v.vehicle_id] = v.client.start()
            action = v.client.sync(self._active[v.vehicle_id])["action"]
            actions[action] = actions.get(action, 0) + 1
        return actions

    def drive_window(self, t0_s: float, duration_s: float, scenario: str, window_seed: int,
                     config: AgentConfig | None = None, recording: Recording | None = None,
                     report_health: bool = True) -> FleetReport:
        """Start every vehicle, drive ``duration_s`` (recording into ``recording`` when given), close trial
        windows, send health reports."""
        self._active = {v.vehicle_id: v.client.start() for v in self.vehicles}
        models: dict[str, ActiveModel] = {}
        shadows: dict[str, ActiveModel] = {}
        plans: list[VehiclePlan] = []
        for v in self.vehicles:
            active = self._active[v.vehicle_id]
            shadow = v.client.shadow
            key = active.version if shadow is None else f"{active.version}|shadow:{shadow.version}"
            models.setdefault(key, active)
            if shadow is not None:
                shadows.setdefault(key, shadow)
            plans.append(VehiclePlan(v.vehicle_id, scenario, v.route_seed + window_seed, key))
        if recording is not None:  # mid-rollout each vehicle's segments name the model that drove it
            recording = replace(recording, versions={vid: a.version for vid, a in self._active.items()})
        if self.pool.shards > 1:
            report = self.pool.drive(plans, {k: self._payload(m) for k, m in models.items()}, duration_s,
                                     {k: self._payload(m) for k, m in shadows.items()}, config, recording)
        else:
            clients: dict[str, InferenceClient] = {k: self._client(m) for k, m in models.items()}
            beside: dict[str, InferenceClient] = {k: self._client(m) for k, m in shadows.items()}
            report = run_fleet(plans, clients, duration_s, config, recording.factory() if recording else None,
                               shadows=beside)
        for v, metrics in zip(self.vehicles, report.vehicles):
            active = self._active[v.vehicle_id]
            if active.trial:
                v.client.close_window(HealthWindowResult(
                    model_loaded=True, ticks=metrics.ticks, deadline_misses=metrics.watchdog.get("deadline", 0),
                    watchdog_trips=sum(n for k, n in metrics.watchdog.items() if k != "deadline"),
                    collisions=metrics.collisions))
            if report_health:  # what this vehicle measured itself: the gates compare canary with control
                s = metrics.shadow
                shadow = None if s is None or v.client.shadow is None else {
                    "compared_ticks": s.compared_ticks, "disagreements": s.disagreements,
                    "mean_abs_diff": s.mean_abs_diff}
                v.client.report(active.version, t0_s, t0_s + duration_s, metrics, metrics.inference_p99_ms, shadow)
        return report
