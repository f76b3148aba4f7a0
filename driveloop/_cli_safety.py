"""``driveloop safety-suite``: case families (the 30 Euro NCAP car-to-car rear cases, the parametric cut-in
grid) and nominal episodes in the real simulator, through the real control loop (edge/agent.py: sensors →
perception → supervisor → actuators).

- ``--family ccr|cut-in|all`` picks the cases (default ``ccr``; ``--case`` names them one by one). Each case
  runs as its own one-vehicle drive for the scenario's duration; it is *avoided* when the ego never touches
  another vehicle.
- Modes: ``--fallback-only`` kills the model at t = 0 (the fallback's minimal-risk stop starts at once);
  ``--model-never-brakes`` lets the registry model drive (steer, accelerate) but drops its braking commands
  (Euro NCAP's driver who does not brake), so every avoided case is the AEB's doing (``aeb_ticks`` per
  case); by default the model drives behind the supervisor.
- Cut-in cases are judged on ground truth (``driveloop.sim.truth.cut_in_truth``): *avoidable* when braking at
  the vehicle's own limits from the first frame on which the cutting car's side is over the lane marking
  avoids it. A CCR case has no such check: every one is required. ``avoidable`` counts the required cases,
  ``avoidable_collisions`` the required cases that were not avoided.
- Nominal episodes (seeded ``highway`` drives, one episode per vehicle) are driven by the model. Each
  fallback activation there is listed (``nominal_activations``) with its kind, reason and the ground
  truth the car decided on (lane offset, true gap and TTC to the real lead), and judged on that ground
  truth by ``driveloop.sim.truth`` (TTC/headway for AEB, time to line crossing for the lane guard,
  thresholds from the ADAS norms, not the rules'): *justified* when a real hazard was there (the model
  drove badly and the layer caught it), *false* when not (the layer acted for nothing). They need a
  whole model, so ``--fallback-only`` and ``--model-never-brakes`` skip them.
- ``--noise SIGMA`` adds Gaussian noise to every sensor (SensorConfig.uniform).
The exit code is 0 only when every required case was avoided and nominal driving had no false activation
and no collision.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import typer

from driveloop._jsonout import dumps
from driveloop.sim.truth import BrakingLimits, CutInTruth, HazardCriteria, cut_in_truth, cutting_in, judge_activation
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

NOMINAL_SCENARIO = "highway"
NOMINAL_FLEET_SIZE = 16  # nominal vehicles driven together (one batched inference call per tick)
FAMILY_CHOICES = ("ccr", "cut-in", "all")


class NeverBrakes:
    """An inference client whose model drives (steers, accelerates) but whose braking is dropped.

    Euro NCAP assumes a driver who does not brake: a negative acceleration becomes 0 (coasting), so any
    braking in the case is the safety layer's. Anything that is not a floating [n, 2] batch goes through
    unchanged, for the watchdog to judge; NaN stays NaN.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> Any:
        result = self.inner.infer(batch, deadline_s)
        actions = result.actions
        if not (isinstance(actions, np.ndarray) and actions.dtype.kind == "f" and actions.ndim == 2
                and actions.shape[1] == 2):
            return result
        coasting = actions.copy()
        coasting[:, 0] = np.maximum(coasting[:, 0], 0.0)  # maximum keeps NaN
        return dataclasses.replace(result, actions=coasting)

    def inject(self, kind: str, count: int | None = 1) -> None:
        self.inner.inject(kind, count)


class CutInWitness:
    """``run_fleet`` tick hook: the first frame of the first episode on which a car is cutting in."""

    def __init__(self) -> None:
        self.frame: tuple[Any, Any] | None = None  # (WorldSnapshot, the cutting car's VehicleState)

    def __call__(self, tick: int, total: int, agents: Sequence[Any]) -> None:
        agent = agents[0]
        if self.frame is not None or agent.metrics.episodes != 1:
            return  # seen already, or the first episode ended (a collision starts another)
        snap = agent.snapshot
        cutter = next((o for o in snap.others if cutting_in(snap, o)), None)
        if cutter is not None:
            self.frame = (snap, cutter)


def braking_limits(config: Any) -> BrakingLimits:
    """The vehicle's own braking limits (the simulator's, not the safety layer's) for the ground truth."""
    sim = config.sim
    return BrakingLimits(-sim.accel_min_mps2, sim.brake_lag_s, 1.0 / sim.sim_frequency_hz)


def _case_row(name: str, metrics: Any, truth: CutInTruth | None = None, judged: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "case": name,
        "avoided": metrics.collisions == 0,
        "collisions": int(metrics.collisions),
        "min_gap_m": round(float(metrics.min_gap_m), 3),
        "interventions": int(metrics.interventions),
        "fcw_ticks": int(metrics.fcw),
        "aeb_ticks": int(metrics.aeb_ticks),
        "avoidable": None,  # not judged on ground truth: the case is required
    }
    if judged:  # a cut-in: judged, or required when no cut-in frame was seen (nothing to judge it on)
        row.update(avoidable=None if truth is None else truth.avoidable,
                   ideal_min_gap_m=None if truth is None else round(truth.min_gap_m, 3),
                   detected_at_s=None if truth is None else round(truth.detected_at_s, 3),
                   gap_at_detection_m=None if truth is None else round(truth.gap_at_detection_m, 3))
    return row


def _required(row: Mapping[str, Any]) -> bool:
    return row["avoidable"] is not False


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


def family_cases(family: str) -> list[str]:
    """The case names of a ``--family`` (``all``: every family); ConfigError for an unknown one."""
    from driveloop.sim.scenarios import FAMILY_CASES

    if family not in FAMILY_CHOICES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILY_CHOICES)}, got {family!r}")
    return [name for key, names in FAMILY_CASES.items() if family in (key, "all") for name in names]


def check_request(noise: float, cases: Sequence[str], fallback_only: bool = False,
                  never_brakes: bool = False) -> list[Any]:
    """The cases' ScenarioSpecs; ConfigError/ScenarioError before anything runs or prints."""
    from driveloop.sim.scenarios import parse_scenario

    if not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"--noise must be a finite sigma >= 0, got {noise}")
    if fallback_only and never_brakes:
        raise ConfigError("--model-never-brakes needs the model to drive: it cannot go with --fallback-only")
    specs = [parse_scenario(name) for name in cases]
    if not all(spec.family for spec in specs):
        raise ConfigError(f"not CCR or cut-in cases: {[s.name for s in specs if not s.family]}")
    return specs


@dataclass(frozen=True)
class ClientSource:
    """How a unit of the suite gets its inference clients: the caller's own (in-process), or built in the
    worker from the model's bytes (Ray: clients do not travel, the model does; verified on load)."""

    given: Mapping[str, Any] | None = None
    payload: Any = None  # cloud.sim_exec.ModelPayload
    device: str = "cpu"

    def clients(self, never_brakes: bool = False) -> Mapping[str, Any]:
        if self.given is not None:
            clients = self.given
        else:  # wall-clock deadlines, as the in-process suite's open_client
            clients = {} if self.payload is None else {"default": self.payload.client(self.device,
                                                                                      simulated_deadline=False)}
        return {key: NeverBrakes(c) for key, c in clients.items()} if never_brakes else clients


def case_unit(source: ClientSource, index: int, name: str, seed: int, config: Any, never_brakes: bool,
              limits: BrakingLimits) -> dict[str, Any]:
    """One case as its own one-vehicle drive, wherever it runs; its report row."""
    from driveloop.edge.fleet import VehiclePlan, run_fleet
    from driveloop.sim.scenarios import parse_scenario

    spec = parse_scenario(name)
    witness = CutInWitness()
    report = run_fleet([VehiclePlan(f"case{index:03d}", spec.name, seed, "default")], source.clients(never_brakes),
                       spec.duration_s, config, on_tick=witness)
    truth = None if witness.frame is None else cut_in_truth(*witness.frame, limits)
    return _case_row(spec.name, report.vehicles[0], truth, judged=spec.family == "cut-in")


def nominal_unit(source: ClientSource, plans: list[Any], duration_s: float,
                 config: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """One batch of nominal vehicles driven together: their metrics and the activations they saw."""
    from driveloop.edge.fleet import run_fleet

    log = ActivationLog()
    return run_fleet(plans, source.clients(), duration_s, config, on_tick=log).vehicles, log.rows


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
    never_brakes: bool = False,
    executor: Any = None,
    model: Any = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the cases and nominal episodes; returns the report (plain data, JSON-ready).

    Each case, and each batch of nominal vehicles, is a unit of ``executor`` (``cloud.sim_exec``; default
    in-process with ``clients``). On Ray the units run across the cluster with clients built on the
    workers from ``model`` (a ``ModelPayload``; not needed with ``fallback_only``); every row names the
    node it ran on, and ``execution`` says where the suite ran.
    """
    from driveloop.cloud.sim_exec import Execution, SimExecutor
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.fleet import VehiclePlan
    from driveloop.sim.scenarios import parse_scenario
    from driveloop.sim.sensors import SensorConfig

    specs = check_request(noise, cases, fallback_only, never_brakes)
    executor = executor or SimExecutor()
    if executor.use_ray and not fallback_only and model is None:
        raise ConfigError("the suite on Ray needs the model itself (its bytes), not in-process clients")
    source = ClientSource(payload=model, device=device) if executor.use_ray else ClientSource(given=clients)
    config = AgentConfig(sensors=SensorConfig.uniform(noise), model_enabled=not fallback_only)
    limits = braking_limits(config)

    step = (lambda label: on_step(label)) if on_step is not None else (lambda label: None)
    units = [(i, spec.name, seed, config, never_brakes, limits) for i, spec in enumerate(specs)]
    cases_run = executor.map(case_unit, units, shared=(source,), on_result=lambda i: step(specs[i].name),
                             what="safety-suite case")
    rows = cases_run.results
    for row, where in zip(rows, cases_run.placements):
        row["node"] = where.node
    placements = list(cases_run.placements)

    nominal_metrics: list[Any] = []
    activations: list[dict[str, Any]] = []
    if not (fallback_only or never_brakes) and nominal > 0:
        duration = min(nominal_duration_s, parse_scenario(NOMINAL_SCENARIO).duration_s)
        batches = [[VehiclePlan(f"nom{i:04d}", NOMINAL_SCENARIO, seed * 100_000 + i, "default")
                    for i in range(start, min(start + NOMINAL_FLEET_SIZE, nominal))]
                   for start in range(0, nominal, NOMINAL_FLEET_SIZE)]
        nominal_run = executor.map(nominal_unit, [(plans, duration, config) for plans in batches], shared=(source,),
                                   on_result=lambda i: step(f"nominal batch {i + 1}/{len(batches)}"),
                                   what="nominal episodes")
        for (metrics, rows_seen), where in zip(nominal_run.results, nominal_run.placements):
            nominal_metrics.extend(metrics)
            activations.extend({**row, "node": where.node} for row in rows_seen)
        placements.extend(nominal_run.placements)

    mode = "fallback-only" if fallback_only else "model-never-brakes" if never_brakes else "model"
    return {
        "mode": mode,
        "families": sorted({spec.family for spec in specs}),
        "noise": noise,
        "seed": seed,
        "cases": len(rows),
        "avoidable": sum(_required(r) for r in rows),
        "avoided": sum(r["avoided"] for r in rows),
        "collisions": sum(r["collisions"] for r in rows),
        "avoidable_collisions": sum(r["collisions"] for r in rows if _required(r)),
        "min_gap_m": min((r["min_gap_m"] for r in rows), default=None),
        "nominal_episodes": len(nominal_metrics),
        "false_activations": sum(not row["justified"] for row in activations),
        "justified_activations": sum(bool(row["justified"]) for row in activations),
        "nominal_collisions": sum(int(m.collisions) for m in nominal_metrics),
        "activations_by_kind": dict(Counter(row["kind"] for row in activations)),
        "nominal_activations": activations,
        "rows": rows,
        "execution": Execution.of(executor.backend, placements).to_dict(),
    }


def suite_passed(report: Mapping[str, Any]) -> bool:
    """Every required case avoided; nominal driving without a false activation or a collision."""
    return (report["avoidable_collisions"] == 0 and report["false_activations"] == 0
            and report["nominal_collisions"] == 0)


@app.command("safety-suite")
def safety_suite(
    fallback_only: bool = typer.Option(False, "--fallback-only", help="Kill the model from the start: "
                                       "fallback + AEB alone must avoid every case."),
    never_brakes: bool = typer.Option(False, "--model-never-brakes", help="The model drives but its braking "
                                      "is dropped: every avoided case is the AEB's doing."),
    family: str = typer.Option("ccr", "--family", help="Cases to run: ccr (Euro NCAP), cut-in or all."),
    noise: float = typer.Option(0.0, "--noise", min=0.0, help="Sensor noise sigma on every sensor."),
    case: list[str] | None = typer.Option(None, "--case", help="Run only this case (repeatable; overrides "
                                          "--family)."),
    nominal: int = typer.Option(20, "--nominal", min=0, help="Nominal seeded episodes (model only)."),
    nominal_duration: float = typer.Option(30.0, "--nominal-duration", min=0.1, help="Seconds per nominal episode."),
    model: str | None = typer.Option(None, "--model", help="Registry ref (default: newest released/validated)."),
    seed: int = typer.Option(0, "--seed", min=0),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """CCR and cut-in cases + nominal episodes through the real control loop; fails on any avoidable collision."""
    from driveloop.cloud.sim_exec import ModelPayload, executor_from
    from driveloop.settings import load_settings

    names = list(case) if case else family_cases(family)
    check_request(noise, names, fallback_only, never_brakes)
    settings = load_settings()
    executor = executor_from(settings)
    clients: dict[str, Any] = {}
    closeable = None
    version = None
    payload = None
    if not fallback_only:
        from driveloop._cli_edge import resolve_model
        from driveloop.edge.drive import open_client

        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
        artifact = resolve_model(settings.registry_dir, model)
        version = artifact.manifest.version
        if executor.use_ray:  # the workers load the model themselves, verified against its manifest
            payload = ModelPayload.read(artifact.onnx_path, artifact.manifest)
        else:
            clients["default"], closeable = open_client(artifact, False, None, device)
    total = len(names) + (0 if fallback_only or never_brakes else -(-nominal // NOMINAL_FLEET_SIZE))
    kwargs: dict[str, Any] = dict(fallback_only=fallback_only, noise=noise, cases=names, nominal=nominal,
                                  nominal_duration_s=nominal_duration, seed=seed, never_brakes=never_brakes,
                                  executor=executor, model=payload, device=device)
    try:
        if as_json:
            report = run_suite(clients, **kwargs)
        else:
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                task = progress.add_task("safety suite", total=total)
                report = run_suite(clients, **kwargs,
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
    for column in ("case", "avoidable", "avoided", "min gap m", "interventions", "FCW ticks", "AEB ticks"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in report["rows"]:
        avoidable = {None: "required", True: "yes", False: "no"}[r["avoidable"]]
        missed = "[red]NO[/red]" if _required(r) else "no"
        table.add_row(r["case"], avoidable, "yes" if r["avoided"] else missed, f"{r['min_gap_m']:.2f}",
                      str(r["interventions"]), str(r["fcw_ticks"]), str(r["aeb_ticks"]))
    console = Console()
    console.print(table)
    console.print(f"avoided {report['avoided']}/{report['cases']} (avoidable {report['avoidable']}, collisions in "
                  f"avoidable cases {report['avoidable_collisions']}), min gap {report['min_gap_m']} m; "
                  f"nominal episodes {report['nominal_episodes']}, false activations {report['false_activations']} "
                  f"(justified {report['justified_activations']}), nominal collisions {report['nominal_collisions']}")
    for row in report["nominal_activations"]:
        verdict = "justified" if row["justified"] else "[red]FALSE[/red]"
        console.print(f"  {row['vehicle']} seed {row['seed']} tick {row['tick']}: {row['reason']} — {verdict}: "
                      f"{row['why']} (true lane offset {row['lane_offset_m']} m, gap {row['gap_m']} m, TTC {row['ttc_s']} s)")
