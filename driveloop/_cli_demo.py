"""``driveloop demo``: the README's main job."""

from __future__ import annotations

import logging

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.demo import DEFAULT_SHIFT, DemoConfig
from driveloop.sim.scenarios import ENVIRONMENTS

logger = logging.getLogger(__name__)


@app.command()
def demo(
    iterations: int = typer.Option(DemoConfig.iterations, "--iterations", min=1, help="Loop iterations."),
    vehicles: int = typer.Option(8, "--vehicles", min=2, max=64, help="Fleet size."),
    drive_s: float = typer.Option(DemoConfig.drive_s, "--drive-s", min=1.0, help="Seconds each vehicle drives per iteration."),
    window_s: float = typer.Option(20.0, "--window-s", min=1.0, help="Rollout health window per vehicle [s]."),
    inject_bad_model: bool = typer.Option(False, "--inject-bad-model",
                                          help="Add an iteration that ships a deliberately worse model."),
    port: int = typer.Option(8700, "--port", min=0, max=65535, help="Fleet server port (0: any free port)."),
    seed: int = typer.Option(0, "--seed", min=0),
    shift: str = typer.Option(DEFAULT_SHIFT, "--shift", help="Environment the fleet's world gains after iteration 1: "
                              f"{', '.join(ENVIRONMENTS)}, or 'none'."),
    auto_approve: str = typer.Option(None, "--auto-approve", help="Classes whose shift campaigns are approved "
                                     "without a person ('*': any; default DRIVELOOP_CAMPAIGN_AUTO_APPROVE, else '*')."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run the whole closed loop on embedded defaults: drive, upload, learn, gate, sign, roll out, repeat."""
    from driveloop.demo import Demo
    from driveloop.settings import load_settings

    settings = load_settings()
    env = shift.strip().lower()
    policy = auto_approve if auto_approve is not None else (settings.campaign_auto_approve or "*")
    config = DemoConfig(iterations=iterations, vehicles=vehicles, drive_s=drive_s, window_s=window_s,
                        inject_bad_model=inject_bad_model, seed=seed, port=port, shift=None if env == "none" else env,
                        auto_approve=policy)
    from driveloop._progress import StageProgress

    progress = StageProgress()  # short lines and a bar per long stage on stderr; the log lines go to <home>/logs
    runner = Demo(settings, config, say=progress.say)
    runner.progress = progress
    report = runner.run()
    if as_json:
        typer.echo(dumps(report))
        return
    typer.echo(f"report: {report['report_html']}")
    for it in report["iterations"]:
        typer.echo(f"iteration {it['index']} ({it['kind']}): model v{it['model']}  "
                   f"{it['interventions_per_hour']:.1f} interventions/h  {it['collisions']} collisions  "
                   f"progress {it['progress']:.2f}  rollout {it['rollout_outcome']}")
        if it.get("timings_s"):  # rows of a run resumed from an older state file have none
            typer.echo(f"  time: {_stages(it['timings_s'])}")
    f = report["final_drive"]
    fleet = ", ".join(f"{n} on v{v}" for v, n in sorted(f["versions"].items()))
    typer.echo(f"final drive: {f['interventions_per_hour']:.1f} interventions/h, {f['collisions']} collisions, "
               f"fleet: {fleet}")
    typer.echo(f"whole demo: {report['seconds']:.0f} s ({_stages(report.get('timings_s') or {})})")
    sh = report.get("shift")
    if sh:
        typer.echo(f"shift to {sh['environment']}: detected after {_secs(sh['detected_after_s'])}, candidate "
                   f"validated after {_secs(sh['validated_after_s'])}, whole fleet on it after "
                   f"{_secs(sh['adapted_after_s'])}; {sh['environment']} interventions/h {_rate(sh['before_per_hour'])}"
                   f" -> {_rate(sh['after_per_hour'])}; old classes {'ok' if sh['old_classes_ok'] else 'NOT ok'}")


def _stages(timings_s: dict[str, float]) -> str:
    """``pipeline 140 s, federated 61 s, …``: the stages of a demo row, as they are named in its JSON."""
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings_s.items()) or "no stage times"


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} s"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"
