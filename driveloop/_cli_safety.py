"""``driveloop safety-suite``: the 30 Euro NCAP car-to-car rear cases and nominal episodes in the real
simulator, through the real control loop (edge/agent.py: sensors → perception → supervisor → actuators).

- Each CCR case runs as its own one-vehicle drive for the scenario's duration; it is *avoided* when the
  ego never touches the target. With ``--fallback-only`` the model is dead from the first tick, so the
  fallback and AEB alone must avoid every case; otherwise the registry model drives behind the supervisor.
- Nominal episodes (seeded ``highway`` drives, one episode per vehicle) are driven by the model. Each
  fallback activation there is listed (``nominal_activations``) with its kind, reason and the ground
  truth the car decided on (lane offset, true gap and TTC to the real lead), and judged on that ground
  truth by ``driveloop.sim.truth`` (TTC/headway for AEB, time to line crossing for the lane guard,
  thresholds from the ADAS norms, not the rules'): *justified* when a real hazard was there (the model
  drove badly and the layer caught it), *false* when not (the layer acted for nothing). They need a
  model, so ``--fallback-only`` skips them.
- ``--noise SIGMA`` adds Gaussian noise to every sensor (SensorConfig.uniform).
The exit code is 0 only when every case was avoided and nominal driving had no false activation and no
collision.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.sim.truth import HazardCriteria, judge_activation
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

NOMINAL_SCENARIO = "highway"
NOMINAL_FLEET_SIZE = 16  # nominal vehicles driven together (one batched inference call per tick)


def _case_row(name: str, metrics: Any) -> dict[str, Any]:
    return {
        "case": name,
        "avoided": metrics.collisions == 0,
        "collisions": int(metrics.collisions),
        "min_gap_m": round(float(metrics.min_gap_m), 3),
        "interventions": int(metrics.interventions),
        "fcw_ticks": int(metrics.fcw),
        "aeb_ticks": int(metrics.aeb_ticks),
    }


def _kind(reason: str | None) -> str:
    """The rule behind an activation reason: aeb, lane, watchdog or disabled."""
    head = (reason or "").split(" ", 1)[0]
    return {"aeb": "aeb", "lane": "lane", "watchdog": "watchdog", "model": "disabled"}.get(head, head or "unknown")


class ActivationLog:
    """``run_fleet`` tick hook: every activation with its reason and the ground truth it was decided on.

    ``on_tick`` runs after the step, so the state the supervisor saw is the previous tick's snapshot
    (kept per vehicle); a vehicle's first tick has none recorded (ground-truth fields are then None).
    """

    def __init__(self, criteria: HazardCriteria | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self._seen: dict[str, Any] = {}
        self.criteria = criteria or HazardCriteria()

    def __call__(self, tick: int, total: int, agents: Sequence[Any]) -> None:
        from driveloop.sim.world import gap_m, ttc_s

        for agent in agents:
            decision, seen = agent.last_decision, self._seen.get(agent.vehicle_id)
            if decision is not None and decision.activation:
                row: dict[str, Any] = {"vehicle": agent.vehicle_id, "seed": agent.seed, "tick": tick,
                                       "kind": _kind(decision.reason), "reason": decision.reason,
                                       "lane_offset_m": None, "speed_mps": None, "gap_m": None, "ttc_s": None}
                if seen is not None:
                    row.update(lane_offset_m=round(seen.lane_offset_m, 3), speed_mps=round(seen.speed_mps, 3),
                               gap_m=round(gap_m(seen), 3), ttc_s=round(ttc_s(seen), 3))
                row["justified"], row["why"] = judge_activation(row["kind"], seen, self.criteria)
                self.rows.append(row)
            self._seen[agent.vehicle_id] = agent.snapshot


def check_request(noise: float, cases: Sequence[str]) -> list[Any]:
    """The cases' ScenarioSpecs; ConfigError/ScenarioError before anything runs or prints."""
    from driveloop.sim.scenarios import parse_scenario

    if not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"--noise must be a finite sigma >= 0, got {noise}")
    specs = [parse_scenario(name) for name in cases]
    if not all(spec.is_ccr for spec in specs):
        raise ConfigError(f"not CCR cases: {[s.name for s in specs if not s.is_ccr]}")
    return specs


def run_suite(
    clients: Mapping[str, Any],
    *,
    fallback_only: bool,
    noise: float,
    cases: Sequence[str],
    nominal: int,
    nominal_duration_s: float,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the cases and nominal episodes; returns the report (plain data, JSON-ready)."""
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.fleet import VehiclePlan, run_fleet
    from driveloop.sim.scenarios import parse_scenario
    from driveloop.sim.sensors import SensorConfig

    specs = check_request(noise, cases)
    config = AgentConfig(sensors=SensorConfig.uniform(noise), model_enabled=not fallback_only)

    rows = []
    for i, spec in enumerate(specs):
        report = run_fleet([VehiclePlan(f"ccr{i:02d}", spec.name, seed, "default")], clients, spec.duration_s, config)
        rows.append(_case_row(spec.name, report.vehicles[0]))
        if on_step is not None:
            on_step(spec.name)

    nominal_metrics: list[Any] = []
    log = ActivationLog()
    if not fallback_only and nominal > 0:
        duration = min(nominal_duration_s, parse_scenario(NOMINAL_SCENARIO).duration_s)
        for start in range(0, nominal, NOMINAL_FLEET_SIZE):
            plans = [VehiclePlan(f"nom{i:04d}", NOMINAL_SCENARIO, seed * 100_000 + i, "default")
                     for i in range(start, min(start + NOMINAL_FLEET_SIZE, nominal))]
            nominal_metrics.extend(run_fleet(plans, clients, duration, config, on_tick=log).vehicles)
            if on_step is not None:
                on_step(f"nominal {min(start + NOMINAL_FLEET_SIZE, nominal)}/{nominal}")

    avoided = sum(r["avoided"] for r in rows)
    return {
        "mode": "fallback-only" if fallback_only else "model",
        "noise": noise,
        "seed": seed,
        "cases": len(rows),
        "avoided": avoided,
        "collisions": sum(r["collisions"] for r in rows),
        "min_gap_m": min((r["min_gap_m"] for r in rows), default=None),
        "nominal_episodes": len(nominal_metrics),
        "false_activations": sum(not row["justified"] for row in log.rows),
        "justified_activations": sum(bool(row["justified"]) for row in log.rows),
        "nominal_collisions": sum(int(m.collisions) for m in nominal_metrics),
        "activations_by_kind": dict(Counter(row["kind"] for row in log.rows)),
        "nominal_activations": log.rows,
        "rows": rows,
    }


def suite_passed(report: Mapping[str, Any]) -> bool:
    """Every case avoided; nominal driving without a false activation or a collision."""
    return (report["avoided"] == report["cases"] and report["false_activations"] == 0
            and report["nominal_collisions"] == 0)


@app.command("safety-suite")
def safety_suite(
    fallback_only: bool = typer.Option(False, "--fallback-only", help="Kill the model from the start: "
                                       "fallback + AEB alone must avoid every case."),
    noise: float = typer.Option(0.0, "--noise", min=0.0, help="Sensor noise sigma on every sensor."),
    case: list[str] | None = typer.Option(None, "--case", help="Run only this CCR case (repeatable)."),
    nominal: int = typer.Option(20, "--nominal", min=0, help="Nominal seeded episodes (model only)."),
    nominal_duration: float = typer.Option(30.0, "--nominal-duration", min=0.1, help="Seconds per nominal episode."),
    model: str | None = typer.Option(None, "--model", help="Registry ref (default: newest released/validated)."),
    seed: int = typer.Option(0, "--seed", min=0),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Euro NCAP CCR cases + nominal episodes through the real control loop; fails on any collision."""
    from driveloop.sim.scenarios import CCR_CASES

    names = list(case) if case else list(CCR_CASES)
    check_request(noise, names)
    clients: dict[str, Any] = {}
    closeable = None
    version = None
    if not fallback_only:
        from driveloop._cli_edge import resolve_model
        from driveloop.edge.drive import open_client
        from driveloop.settings import load_settings

        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
        artifact = resolve_model(load_settings().registry_dir, model)
        version = artifact.manifest.version
        clients["default"], closeable = open_client(artifact, False, None, device)
    total = len(names) + (0 if fallback_only else -(-nominal // NOMINAL_FLEET_SIZE))
    try:
        if as_json:
            report = run_suite(clients, fallback_only=fallback_only, noise=noise, cases=names, nominal=nominal,
                               nominal_duration_s=nominal_duration, seed=seed)
        else:
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                task = progress.add_task("safety suite", total=total)
                report = run_suite(clients, fallback_only=fallback_only, noise=noise, cases=names, nominal=nominal,
                                   nominal_duration_s=nominal_duration, seed=seed,
                                   on_step=lambda label: progress.update(task, advance=1, description=label))
    finally:
        if closeable is not None:
            closeable.close()
    report["model"] = version
    if as_json:
        typer.echo(dumps(report))
    else:
        _print(report)
    if not suite_passed(report):
        raise typer.Exit(1)


def _print(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"safety suite ({report['mode']}, noise {report['noise']})")
    for column in ("case", "avoided", "min gap m", "interventions", "FCW ticks", "AEB ticks"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in report["rows"]:
        table.add_row(r["case"], "yes" if r["avoided"] else "[red]NO[/red]", f"{r['min_gap_m']:.2f}",
                      str(r["interventions"]), str(r["fcw_ticks"]), str(r["aeb_ticks"]))
    console = Console()
    console.print(table)
    console.print(f"avoided {report['avoided']}/{report['cases']}, min gap {report['min_gap_m']} m; "
                  f"nominal episodes {report['nominal_episodes']}, false activations {report['false_activations']} "
                  f"(justified {report['justified_activations']}), nominal collisions {report['nominal_collisions']}")
    for row in report["nominal_activations"]:
        verdict = "justified" if row["justified"] else "[red]FALSE[/red]"
        console.print(f"  {row['vehicle']} seed {row['seed']} tick {row['tick']}: {row['reason']} — {verdict}: "
                      f"{row['why']} (true lane offset {row['lane_offset_m']} m, gap {row['gap_m']} m, TTC {row['ttc_s']} s)")
