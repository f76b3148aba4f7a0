"""A drive as a user asks for it: load and verify the model, plan the fleet, record, show progress.

``drive_fleet`` is what ``driveloop drive``, the safety suite and the demo call; the loop itself lives
in :mod:`driveloop.edge.fleet`. The model is verified (sha256 against its manifest, I/O against the
contract) before the spool is touched, so a bad model writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driveloop.edge.agent import AgentConfig, FaultSpec, VehicleAgent
from driveloop.edge.transport import UploadTransport
from driveloop.edge.fleet import (
    DataPlane,
    FleetReport,
    InferenceClient,
    InProcessInference,
    IsolatedInference,
    VehiclePlan,
    run_fleet,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriveRequest:
    scenario: str
    vehicles: int
    duration_s: float
    seed: int = 0
    isolate: bool = False
    fault: FaultSpec | None = None
    device: str = "auto"
    record: bool = True
    video: Path | None = None
    vehicle_prefix: str = "veh"
    simulated_deadline: bool = False  # judge replies on simulated time (see InProcessInference)


def plan_fleet(scenario: str, vehicles: int, seed: int, prefix: str = "veh", model: str = "default") -> list[VehiclePlan]:
    """Vehicle i gets seed ``seed * 1000 + i``: distinct per vehicle, stable across runs. On a shared road
    (``jam-tail``) vehicle i starts further back (``sim.scenarios.jam_tail_name``): it meets the jam later."""
    from driveloop.sim.scenarios import jam_tail_name

    return [VehiclePlan(f"{prefix}{i:03d}", jam_tail_name(scenario, i), seed * 1000 + i, model)
            for i in range(vehicles)]


def open_client(artifact: Any, isolate: bool, fault: FaultSpec | None, device: str,
                simulated_deadline: bool = False) -> tuple[InferenceClient, Any]:
    """(client, closeable) for a registry artifact; the model's integrity and I/O are checked here.
    ``simulated_deadline``: see ``InProcessInference`` (for simulated vehicles sharing one host)."""
    from driveloop.edge.runtime import ModelRuntime

    if isolate:
        from driveloop.edge.isolated import IsolatedRuntime

        ModelRuntime(artifact.onnx_path, artifact.manifest, device="cpu")  # verify before spawning
        rt = IsolatedRuntime(artifact.onnx_path, artifact.manifest, device=device)
        rt.wait_ready()
        return IsolatedInference(rt), rt
    runtime = ModelRuntime(artifact.onnx_path, artifact.manifest, device=device)
    runtime.warmup()  # first-call allocations must not be mistaken for a deadline miss
    if fault is not None:
        from driveloop.edge.faults import FaultyRunner

        return InProcessInference(FaultyRunner(runtime)), None
    return InProcessInference(runtime, simulated_deadline=simulated_deadline), None


def recorder_factory(spool_dir: Path, quota_bytes: int, model_version: str | Callable[[str], str],
                     campaigns: Sequence[Any] = ()) -> Any:
    """Recorders into one spool; ``campaigns`` (cloud collection campaigns as TriggerSpecs) run beside
    the built-in triggers. ``model_version`` is the version every vehicle runs, or a function of the
    vehicle id for a fleet mid-rollout (each segment names the model that drove it)."""
    from driveloop.edge.recorder import Recorder
    from driveloop.edge.spool import Spool

    spool = Spool(spool_dir, quota_bytes)

    def make(vehicle_id: str, scenario: str, seed: int) -> Recorder:
        version = model_version(vehicle_id) if callable(model_version) else model_version
        rec = Recorder(spool, vehicle_id, scenario, seed, version)
        if campaigns:
            rec.set_campaign_triggers(campaigns)
        return rec

    return make


def fetch_campaigns(transport: UploadTransport) -> list[Any]:
    """The approved, unexpired collection campaigns ``transport``'s cloud serves, as recorder triggers
    (the transport is closed afterwards)."""
    from driveloop.edge.transport import campaign_triggers

    try:
        return campaign_triggers(transport.campaigns())
    finally:
        transport.close()


def drive_fleet(request: DriveRequest, artifact: Any, config: AgentConfig, spool_dir: Path, quota_bytes: int,
                show_progress: bool = False, plans: Sequence[VehiclePlan] | None = None,
                campaigns: Sequence[Any] = (), data_plane: DataPlane | None = None) -> FleetReport:
    """Run the request; records into ``spool_dir`` when asked; ``data_plane``: the live stream (road hazards in,
    telemetry and events out). Returns the fleet report."""
    client, closeable = open_client(artifact, request.isolate, request.fault, request.device,
                                    simulated_deadline=request.simulated_deadline)
    plans = list(plans) if plans is not None else plan_fleet(request.scenario, request.vehicles, request.seed,
                                                              request.vehicle_prefix)
    factory = (recorder_factory(spool_dir, quota_bytes, str(artifact.manifest.version), campaigns)
               if request.record else None)
    video = None
    if request.video is not None:
        from driveloop.sim.video import VideoWriter

        video = VideoWriter(request.video)
    try:
        with _Progress(show_progress, request.duration_s) as progress:
            def on_tick(tick: int, total: int, agents: Sequence[VehicleAgent]) -> None:
                progress.update(tick + 1, total)
                if video is not None:
                    a = agents[0]
                    d = a.last_decision
                    video.add(a.render(), d.source, d.fcw, d.reason, a.t_s, a.snapshot.speed_mps)

            report = run_fleet(plans, {"default": client}, request.duration_s, config, factory, request.fault,
                               on_tick=on_tick, data_plane=data_plane)
    finally:
        if closeable is not None:
            closeable.close()
    if video is not None:
        video.close()
    return report


class _Progress:
    """A rich progress bar on stderr (or nothing, for --json)."""

    def __init__(self, enabled: bool, duration_s: float) -> None:
        self.enabled, self.duration_s = enabled, duration_s
        self._p: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress("[progress.description]{task.description}", BarColumn(),
                               "{task.completed}/{task.total} ticks", TimeElapsedColumn(), TimeRemainingColumn(),
                               console=Console(stderr=True), transient=True)
            self._p.__enter__()
            self._task = self._p.add_task(f"driving {self.duration_s:g} s", total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self._p is not None and (done % 10 == 0 or done == total):
            self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
