"""``driveloop fleet run``: a simulated fleet at scale, cut into shards (``cloud.sim_exec``).

On Ray (``RAY_ADDRESS``, or ``--backend ray``) each shard is a Ray actor with its own model session and
one batched inference call per tick for its vehicles; in-process the whole fleet is one shard. Each
vehicle's result is its own (seeded per vehicle), so the per-vehicle rows are the same either way. The
report adds what the scale-out plan needs: wall time, vehicle-seconds simulated per CPU-second, and
resident memory per vehicle (what the shards' processes grew by while their vehicles were alive).
Nothing is recorded: this is the fleet as load, not as a data source (``driveloop drive`` records).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

fleet_app = typer.Typer(help="Simulated fleets at scale: shards of vehicles as Ray actors.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")

MAX_VEHICLES = 100_000


def fleet_report(mapped: Any, wall_s: float) -> dict[str, Any]:
    """The fleet's summary (as ``driveloop drive``'s) from its shards, plus cost and placement per shard."""
    from driveloop.edge.fleet import FleetReport

    shards = mapped.results
    vehicles = [v for shard in shards for v in shard.vehicles]
    summary = FleetReport(vehicles=vehicles, tick_ms=[], sim_ms=[], segments=[], faults={}, shadow={}).summary()
    summary = {k: v for k, v in summary.items() if not k.startswith(("tick_ms", "sim_ms", "inference_ms"))}
    cpu_s = sum(s.cpu_s for s in shards)
    driven_s = float(sum(v.driven_s for v in vehicles))
    summary.update(
        wall_s=round(wall_s, 3),
        cpu_s=round(cpu_s, 3),
        vehicle_s_per_cpu_s=round(driven_s / cpu_s, 3) if cpu_s > 0 else None,
        memory_per_vehicle_bytes=int(sum(s.rss_growth_bytes for s in shards) / max(1, len(vehicles))),
        shards=[{"vehicles": len(s.vehicles), "node": s.placement.node, "wall_s": round(s.wall_s, 3),
                 "cpu_s": round(s.cpu_s, 3)} for s in shards],
        execution=mapped.execution.to_dict(),
    )
    return summary


@fleet_app.command("run")
def run(
    vehicles: int = typer.Option(100, "--vehicles", "-n", min=1, max=MAX_VEHICLES),
    scenario: str = typer.Option("highway", "--scenario", "-s", help="Scenario name, or 'mix'."),
    duration: float = typer.Option(60.0, "--duration", "-d", min=0.1, max=3600.0, help="Simulated seconds."),
    seed: int = typer.Option(0, "--seed", min=0),
    shards: int = typer.Option(0, "--shards", min=0, help="Shards (Ray actors); 0: one per CPU of the cluster."),
    model: str | None = typer.Option(None, "--model", help="Registry ref (default: newest released/validated)."),
    fallback_only: bool = typer.Option(False, "--fallback-only", help="No model: the fallback drives (no registry "
                                       "needed)."),
    backend: str = typer.Option("auto", "--backend", help="auto (Ray when RAY_ADDRESS is set), ray or local."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Drive N simulated vehicles, sharded over Ray actors (batched inference per shard)."""
    from driveloop.cloud.sim_exec import ModelPayload, executor_from
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.drive import plan_fleet
    from driveloop.settings import load_settings
    from driveloop.sim.scenarios import MIX, parse_scenario

    if scenario != MIX:
        parse_scenario(scenario)
    settings = load_settings()
    executor = executor_from(settings, backend)
    payload = None
    version = None
    if not fallback_only:
        from driveloop._cli_edge import resolve_model

        artifact = resolve_model(settings.registry_dir, model)
        payload, version = ModelPayload.read(artifact.onnx_path, artifact.manifest), artifact.manifest.version
    elif model is not None:
        raise ConfigError("--model cannot go with --fallback-only")
    count = shards
    if count == 0:
        count = 1
        if executor.use_ray:
            from driveloop.cloud.ray_runtime import ensure_ray

            count = max(1, int(ensure_ray(executor.ray_address, executor.num_cpus).num_cpus))
    plans = plan_fleet(scenario, vehicles, seed, prefix="fleet")
    t0 = time.perf_counter()
    mapped = executor.drive_shards(payload, plans, duration, count, AgentConfig(model_enabled=not fallback_only))
    report = fleet_report(mapped, time.perf_counter() - t0)
    report.update(model=version, scenario=scenario, seed=seed, duration_s=duration)
    if as_json:
        typer.echo(dumps(report))
        return
    typer.echo(f"{report['vehicles']} vehicles × {duration:g} s ({scenario}, model {version or 'none'}): "
               f"{report['collisions']} collisions, {report['interventions']} interventions; "
               f"wall {report['wall_s']} s, {report['vehicle_s_per_cpu_s']} vehicle-s per CPU-s, "
               f"{report['memory_per_vehicle_bytes'] / 1e6:.2f} MB per vehicle")
    ex = report["execution"]
    typer.echo(f"execution: {ex['backend']}, {ex['nodes']} node(s), {ex['workers']} worker(s), "
               f"{len(report['shards'])} shard(s)")
