"""Vehicle-side commands: ``driveloop bootstrap`` and ``driveloop drive``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError, RegistryError

logger = logging.getLogger(__name__)

SPOOL_QUOTA_BYTES = 2 * 2**30


@app.command()
def bootstrap(
    episodes: int = typer.Option(24, min=1, help="Expert demonstration episodes."),
    episode_s: float = typer.Option(30.0, min=1.0, help="Length of each demonstration episode [s]."),
    epochs: int = typer.Option(12, min=1, help="Behaviour-cloning epochs."),
    seed: int = typer.Option(0, min=0),
    force: bool = typer.Option(False, "--force", help="Train a new version even if the registry has one."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train model v1 by behaviour cloning the IDM/MOBIL expert, export ONNX, register it."""
    from driveloop.cloud.bootstrap import BootstrapConfig
    from driveloop.cloud.bootstrap import bootstrap as run_bootstrap
    from driveloop.settings import load_settings

    settings = load_settings()
    cfg = BootstrapConfig(episodes=episodes, episode_s=episode_s, epochs=epochs, seed=seed,
                          workers=min(2, settings.num_cpus))
    say = (lambda m: logger.info(m)) if as_json else (lambda m: typer.echo(m, err=True))
    from driveloop.cloud.sim_exec import executor_from

    # expert episodes as Ray tasks when RAY_ADDRESS (or DRIVELOOP_SIM_BACKEND=ray) asks for it
    result = run_bootstrap(settings.registry_dir, cfg, force=force, progress=say, executor=executor_from(settings))
    if as_json:
        typer.echo(dumps(result))
    else:
        typer.echo(f"model v{result['version']} ({result['stage']}) in {settings.registry_dir}")


def resolve_model(registry_root: Path, ref: str | None) -> Any:
    """The registry artifact for ``ref`` (default: newest released, else newest validated)."""
    from driveloop.cloud.registry import Registry

    if not (registry_root / "registry.db").exists():
        raise RegistryError(f"no model registry at {registry_root}: run `driveloop bootstrap` first")
    with Registry(registry_root) as reg:
        return reg.resolve(ref)


@app.command()
def drive(
    scenario: str = typer.Option("highway", "--scenario", "-s", help="Scenario name, or 'mix'."),
    vehicles: int = typer.Option(1, "--vehicles", "-n", min=1, max=256),
    duration: float = typer.Option(60.0, "--duration", "-d", min=0.1, help="Simulated seconds per vehicle."),
    model: str | None = typer.Option(None, "--model", help="Registry ref: version, 'released', 'validated'."),
    seed: int = typer.Option(0, "--seed", min=0),
    video: Path | None = typer.Option(None, "--video", help="Write vehicle 0's drive to an .mp4 or .gif."),
    isolate: bool = typer.Option(False, "--isolate", help="Run the model in its own process."),
    fault: str | None = typer.Option(None, "--fault", help="Inject kill|hang|nan|garbage|late|error|stale."),
    fault_at: float = typer.Option(5.0, "--fault-at", min=0.0, help="When to inject the fault [s]."),
    noise: float = typer.Option(0.0, "--noise", min=0.0, help="Sensor noise sigma (all sensors)."),
    dropout: float = typer.Option(0.0, "--dropout", min=0.0, max=0.9, help="Sensor frame dropout probability."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    record: bool = typer.Option(True, "--record/--no-record", help="Record MCAP segments into the spool."),
    upload: bool = typer.Option(True, "--upload/--no-upload", help="Upload recorded segments afterwards."),
    sim_deadline: bool = typer.Option(False, "--sim-deadline", help="Judge model replies on simulated time: a "
                                      "loaded host's stalls are then no deadline misses (reproducible comparisons)."),
    hazards: str = typer.Option("off", "--hazards", help="on: live stream to the cloud, road hazards pushed back "
                                "as advisories (embedded broker + hazard service unless DRIVELOOP_NATS_URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Drive N vehicles in the simulator with the ONNX policy behind the safety supervisor."""
    from driveloop.edge.agent import AgentConfig, FaultSpec
    from driveloop.sim.scenarios import MIX, parse_scenario
    from driveloop.sim.sensors import SensorConfig
    from driveloop.sim.video import check_video_path
    from driveloop.settings import load_settings

    # Validate everything before anything is written.
    if scenario != MIX:
        parse_scenario(scenario)
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if hazards not in ("on", "off"):
        raise ConfigError(f"--hazards must be on or off, got {hazards!r}")
    fault_spec = FaultSpec(fault, at_s=fault_at) if fault else None
    if video is not None:
        check_video_path(video)
    settings = load_settings()
    artifact = resolve_model(settings.registry_dir, model)
    config = AgentConfig(sensors=SensorConfig.uniform(noise, dropout))
    from driveloop.edge.drive import DriveRequest, drive_fleet

    request = DriveRequest(scenario=scenario, vehicles=vehicles, duration_s=duration, seed=seed,
                           isolate=isolate, fault=fault_spec, device=device, record=record, video=video,
                           simulated_deadline=sim_deadline)
    campaigns = []
    if record:
        from driveloop.wiring import fetch_campaigns

        campaigns = fetch_campaigns(settings, f"{request.vehicle_prefix}000")
    from driveloop._vehicle_logs import ship_vehicle_logs, vehicle_log_spools
    from driveloop.core.logfmt import log_context

    live: dict[str, Any] = {"hazards_received": 0, "hazard_latency_ms_p99": None}
    with vehicle_log_spools(settings) as log_spools, log_context(model_version=artifact.manifest.version):
        # the live data plane (broker + hazard service for the drive, stopped after it) with --hazards on; the
        # logs ride the vehicles' streams when there is one (--hazards on, or DRIVELOOP_NATS_URL) and --upload
        if hazards == "on" or (upload and settings.nats_url):
            from driveloop._drive_hazards import drive_data_plane
            from driveloop.edge.drive import plan_fleet

            ids = [p.vehicle_id for p in plan_fleet(scenario, vehicles, seed, request.vehicle_prefix)]
            with drive_data_plane(settings, ids, str(artifact.manifest.version),
                                  config.supervisor.aeb.full_decel_mps2, hazards == "on",
                                  log_spools if upload else None) as link:
                assert link is not None
                report = drive_fleet(request, artifact, config, spool_dir=settings.spool_dir,
                                     quota_bytes=SPOOL_QUOTA_BYTES, show_progress=not as_json, campaigns=campaigns,
                                     data_plane=link.plane)
                live.update(link.finish())
        else:
            report = drive_fleet(request, artifact, config, spool_dir=settings.spool_dir,
                                 quota_bytes=SPOOL_QUOTA_BYTES, show_progress=not as_json, campaigns=campaigns)
    summary: dict[str, Any] = report.summary()
    summary.update(hazards=hazards, **live)
    summary.update(model=artifact.manifest.version, scenario=scenario, seed=seed, campaigns=len(campaigns))
    if fault_spec is not None:
        summary["faults"] = report.faults
    if record and upload:
        summary["upload"] = _upload(settings)
    if upload:  # the vehicles' log lines follow their segments to the cloud (or wait in their spools)
        summary["logs"] = ship_vehicle_logs(settings)
    if as_json:
        typer.echo(dumps(summary))
    else:
        _print_table(report, summary)


def _upload(settings: Any) -> dict[str, Any]:
    """Drain the spool to the configured cloud (embedded local cloud when none is configured)."""
    from driveloop.wiring import upload_spool

    return upload_spool(settings)


def _print_table(report: Any, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"drive: {summary['scenario']} × {summary['vehicles']} (model v{summary['model']})")
    for col in ("vehicle", "episodes", "km", "collisions", "interventions", "per hour", "min gap m"):
        table.add_column(col, justify="right")
    for v in report.vehicles:
        table.add_row(v.vehicle_id, str(v.episodes), f"{v.distance_m / 1000:.2f}", str(v.collisions),
                      str(v.interventions), f"{v.interventions_per_hour:.1f}", f"{v.min_gap_m:.1f}")
    console = Console(file=sys.stdout)
    console.print(table)
    keys = ("ticks", "distance_km", "collisions", "interventions", "interventions_per_hour", "aeb_activations",
            "peak_decel_mps2", "tick_ms_p50", "tick_ms_p99", "segments", "hazards_received")
    console.print("  ".join(f"{k}={summary[k]}" for k in keys))
