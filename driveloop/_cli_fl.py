"""``driveloop fl …``: federated fine-tuning with Flower.

- ``fl run``: a whole federated fine-tune on Flower's simulation runtime (a local simulation-mode SuperLink
  and its ``flwr-simulation`` process, Ray backend; their logs in ``<run dir>/logs``), then the cloud
  pipeline's closed-loop gate and registry; live per-round progress on stderr, ``--json`` on stdout.
- ``fl serve``: the aggregation server for a real deployment (``flower-superlink``, insecure, 127.0.0.1).
- ``fl vehicle --id N``: one vehicle (``flower-supernode`` with node config ``vehicle-id``) against it.
- ``fl start``: submit the same ServerApp/ClientApp to a running SuperLink (``flwr run``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app

logger = logging.getLogger(__name__)

fl_app = typer.Typer(help="Federated fine-tuning (Flower)", no_args_is_help=True)
app.add_typer(fl_app, name="fl")


def _print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"federated run {r['run']} — {r['strategy']}, {r['vehicles']} vehicles")
    for col in ("round", "sampled", "replied", "failed", "accepted", "clipped", "rejected", "closed", "wall s"):
        table.add_column(col)
    for rec in r["round_log"]:
        rejected = ", ".join(f"{x['vehicle']}:{x['reason']}" for x in rec["rejected"]) or "-"
        table.add_row(str(rec["round"]), str(rec["sampled"]), str(rec["replied"]), str(rec["failed"]), str(rec["accepted"]),
                      str(rec["clipped"]), rejected, rec["closed"] + (" (skipped)" if rec["skipped"] else ""),
                      f"{rec['wall_s']:.1f}")
    console.print(table)
    dp = r["dp"]
    if dp:
        console.print(f"DP: epsilon={dp['epsilon']:.4g} at delta={dp['delta']:g} after {dp['rounds']} released rounds "
                      f"(noise multiplier {dp['noise_multiplier']:g}, clip norm {dp['clip_norm']:g}, "
                      f"sample rate {dp['sample_rate']:g}; {dp['accountant']})")
    gate = r["gate"]
    if gate:
        b, c = gate["baseline"], gate["candidate"]
        console.print(f"gate {'PASSED' if gate['passed'] else 'FAILED'}: interventions/h {b['interventions_per_hour']:.1f} -> "
                      f"{c['interventions_per_hour']:.1f}, collisions {c['collisions']}, progress {b['progress']:.3f} -> "
                      f"{c['progress']:.3f}")
        for reason in gate.get("reasons", []):
            console.print(f"  {reason}")
    console.print(f"candidate v{r['candidate']}: {r['candidate_stage']}")


def _suite(classes: str, duration_s: float) -> Any:
    """The held-out suite, optionally restricted to some scenario classes (ConfigError on unknown ones)."""
    from driveloop.cloud.evaluation import DEFAULT_SUITE, EvalSuite
    from driveloop.core.exceptions import ConfigError

    names = [c.strip() for c in classes.split(",") if c.strip()]
    unknown = [c for c in names if c not in DEFAULT_SUITE]
    if unknown:
        raise ConfigError(f"unknown scenario classes {unknown}; valid: {', '.join(DEFAULT_SUITE)}")
    chosen = {c: DEFAULT_SUITE[c] for c in names} if names else dict(DEFAULT_SUITE)
    return EvalSuite(classes=chosen, duration_s=duration_s)


@fl_app.command("run")
def run(
    rounds: int = typer.Option(100, "--rounds", min=1, help="Federated rounds (each vehicle: one gradient step per round)."),
    vehicles: int = typer.Option(10, "--vehicles", min=1, help="Virtual vehicles (each trains on its own spool)."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox | fedmedian | trimmedavg | krum"),
    dp: bool = typer.Option(False, "--dp", help="Central DP: Flower's server-side fixed-clipping Gaussian wrapper; "
                            "reports (epsilon, delta). Needs fedavg|fedprox and --clip-factor 0 (federated/dp.py: why)."),
    dp_noise: float = typer.Option(0.1, "--dp-noise", min=0.0, help="DP noise multiplier z (noise std z*clip/n)."),
    dp_clip: float = typer.Option(1.0, "--dp-clip", min=1e-9, help="DP clipping norm of an update."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", min=0.0, max=1.0, help="DP delta the budget epsilon is reported at."),
    fraction: float = typer.Option(1.0, "--fraction", min=1e-6, max=1.0, help="Share of vehicles sampled per round."),
    dropout: float = typer.Option(0.0, "--dropout", min=0.0, max=0.99, help="Share of vehicles dropping out mid-round (a fresh draw each round)."),
    dropout_mode: str = typer.Option("dropout", "--dropout-mode", help="dropout (error mid-round) | straggle (reply after the deadline)."),
    poison: float = typer.Option(0.0, "--poison", min=0.0, max=0.99, help="Share of vehicles sending poisoned updates."),
    quorum: float = typer.Option(0.6, "--quorum", min=0.01, max=1.0, help="Share of sampled vehicles that makes a round."),
    deadline_s: float = typer.Option(300.0, "--deadline", min=0.1, help="Round deadline in seconds."),
    close_at_quorum: bool = typer.Option(False, "--close-at-quorum", help="Close a round as soon as the quorum replied."),
    clip_factor: float = typer.Option(3.0, "--clip-factor", min=0.0, help="Clip updates to this x the round's median norm (0: off)."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local full-batch steps per vehicle per round (>1 drifts)."),
    server_opt: str = typer.Option("adam", "--server-opt", help="adam (FedAdam over the aggregate) | none (plain FedAvg)."),
    server_lr: float = typer.Option(3e-4, "--server-lr", min=1e-9, help="Server Adam step per weight and round."),
    episodes: int = typer.Option(3, "--episodes", min=1, help="Episodes a vehicle with an empty spool drives first."),
    episode_s: float = typer.Option(20.0, "--episode-s", min=1.0, help="Simulated seconds per such episode."),
    suite_duration_s: float = typer.Option(30.0, "--suite-duration", min=1.0, help="Simulated seconds per held-out vehicle."),
    suite_classes: str = typer.Option("", "--suite-classes", help="Comma-separated scenario classes of the gate (default: all)."),
    base: str = typer.Option("", "--base", help="Registry ref of the model to fine-tune (default: newest released, else validated)."),
    run_name: str = typer.Option("", "--run", help="Run name (default: a digest of the settings); reruns resume it."),
    seed: int = typer.Option(0, "--seed", help="Seed of fault assignment and local data."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Fine-tune the current model federatedly on Flower's simulation runtime, then gate and register it."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from driveloop.federated.client import VehicleSettings
    from driveloop.federated.run import FlRunConfig, run_federated
    from driveloop.federated.server import ServerSettings
    from driveloop.settings import load_settings

    settings = load_settings()
    server = ServerSettings(  # validated here, before any vehicle prepares its data
        vehicles=vehicles, rounds=rounds, strategy=strategy, fraction=fraction, dp=dp, dp_noise_multiplier=dp_noise,
        dp_clipping_norm=dp_clip, dp_delta=dp_delta, quorum_frac=quorum, round_deadline_s=deadline_s, close_at_quorum=close_at_quorum,
        clip_median_factor=clip_factor, server_opt=server_opt, server_lr=server_lr)
    vehicle = VehicleSettings(
        home=str(Path(settings.home)), registry_dir=str(Path(settings.registry_dir)), episodes=episodes, episode_s=episode_s,
        local_epochs=local_epochs, data_seed=seed, straggle_s=deadline_s * 2, dropout_frac=dropout, dropout_mode=dropout_mode)
    cfg = FlRunConfig(vehicle=vehicle, server=server, base_ref=base or None, poison=poison, num_cpus=settings.num_cpus,
                      run_name=run_name or None, suite=_suite(suite_classes, suite_duration_s))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        prep = progress.add_task("vehicles preparing local data", total=vehicles)
        task = progress.add_task("federated rounds", total=rounds)

        def on_vehicle(_vid: str) -> None:
            progress.advance(prep)

        def on_round(rec: dict[str, Any]) -> None:
            status = "skipped" if rec["skipped"] else f"{rec['accepted']}/{rec['sampled']} aggregated"
            progress.console.print(f"round {rec['round']}: {status}, {rec['failed']} failed, "
                                   f"{len(rec['rejected'])} rejected, {rec['clipped']} clipped ({rec['closed']}, {rec['wall_s']:.1f} s)")
            progress.advance(task)

        report = run_federated(cfg, on_round=on_round, on_vehicle=on_vehicle)
    if as_json:
        typer.echo(dumps(report))
    else:
        _print_report(report)


def _foreground(managed: Any) -> None:
    """Wait on a started Flower process; Ctrl-C stops it (and its children) cleanly."""
    typer.echo(f"{managed.name} running (pid {managed.proc.pid}), log: {managed.log_path}; Ctrl-C stops it", err=True)
    try:
        code = managed.proc.wait()
    except KeyboardInterrupt:
        managed.stop()
        return
    if code:
        from driveloop.core.exceptions import FederatedError

        raise FederatedError(f"{managed.name} exited with {code} (see {managed.log_path})")


@fl_app.command("serve")
def serve(
    port: int = typer.Option(9093, "--port", min=1, max=65535, help="SuperLink HTTP port (Runtime, Control, Fleet APIs)."),
) -> None:
    """Start the aggregation server: a Flower SuperLink on 127.0.0.1 (insecure), in the foreground."""
    from driveloop.federated.deploy import start_superlink
    from driveloop.settings import load_settings

    home = Path(load_settings().home)
    _foreground(start_superlink(port, home / "federated" / "logs", home / "federated" / "superlink.db"))


@fl_app.command("vehicle")
def vehicle(
    vehicle_id: int = typer.Option(..., "--id", min=0, help="Vehicle number N (vehicle id flNNN)."),
    superlink_port: int = typer.Option(9093, "--superlink-port", min=1, max=65535, help="Port of `fl serve`."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="This SuperNode's ClientApp port (0: 9200 + N)."),
) -> None:
    """Run one vehicle's ClientApp: a Flower SuperNode with node config vehicle-id, in the foreground."""
    from driveloop.federated.client import vehicle_id_for
    from driveloop.federated.deploy import start_supernode
    from driveloop.settings import load_settings

    home = Path(load_settings().home)
    _foreground(start_supernode(vehicle_id_for(vehicle_id), superlink_port, port or 9200 + vehicle_id,
                                home / "federated" / "logs"))


@fl_app.command("start")
def start(
    superlink_port: int = typer.Option(9093, "--superlink-port", min=1, max=65535, help="Port of `fl serve`."),
    rounds: int = typer.Option(100, "--rounds", min=1),
    vehicles: int = typer.Option(3, "--vehicles", min=1, help="Vehicles fl000… expected to be connected."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg | fedprox | fedmedian | trimmedavg | krum"),
    quorum: float = typer.Option(0.6, "--quorum", min=0.01, max=1.0),
    deadline_s: float = typer.Option(300.0, "--deadline", min=0.1),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1),
    episodes: int = typer.Option(3, "--episodes", min=1),
    episode_s: float = typer.Option(20.0, "--episode-s", min=1.0),
    suite_duration_s: float = typer.Option(30.0, "--suite-duration", min=1.0),
    suite_classes: str = typer.Option("", "--suite-classes"),
    timeout_s: float = typer.Option(3600.0, "--timeout", min=1.0, help="Give up waiting for the run after this long."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Submit a federated run to `fl serve` (flwr run), wait for it, then gate and register the result."""
    from driveloop.federated.client import VehicleSettings
    from driveloop.federated.run import FlRunConfig, run_deployed
    from driveloop.federated.server import ServerSettings
    from driveloop.settings import load_settings

    settings = load_settings()
    server = ServerSettings(vehicles=vehicles, rounds=rounds, strategy=strategy, quorum_frac=quorum, round_deadline_s=deadline_s)
    vehicle = VehicleSettings(home=str(Path(settings.home).resolve()), registry_dir=str(Path(settings.registry_dir).resolve()),
                              local_epochs=local_epochs, episodes=episodes, episode_s=episode_s)
    cfg = FlRunConfig(vehicle=vehicle, server=server, suite=_suite(suite_classes, suite_duration_s))
    report = run_deployed(cfg, superlink_port, timeout_s)
    if as_json:
        typer.echo(dumps(report))
    else:
        _print_report(report)
