"""``driveloop demo``: the README's main job."""

from __future__ import annotations

import logging

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.demo import DemoConfig

logger = logging.getLogger(__name__)


@app.command()
def demo(
    iterations: int = typer.Option(3, "--iterations", min=1, help="Loop iterations."),
    vehicles: int = typer.Option(8, "--vehicles", min=2, max=64, help="Fleet size."),
    drive_s: float = typer.Option(DemoConfig.drive_s, "--drive-s", min=1.0, help="Seconds each vehicle drives per iteration."),
    window_s: float = typer.Option(20.0, "--window-s", min=1.0, help="Rollout health window per vehicle [s]."),
    inject_bad_model: bool = typer.Option(False, "--inject-bad-model",
                                          help="Add an iteration that ships a deliberately worse model."),
    port: int = typer.Option(8700, "--port", min=0, max=65535, help="Fleet server port (0: any free port)."),
    seed: int = typer.Option(0, "--seed", min=0),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run the whole closed loop on embedded defaults: drive, upload, learn, gate, sign, roll out, repeat."""
    from driveloop.demo import Demo
    from driveloop.settings import load_settings

    config = DemoConfig(iterations=iterations, vehicles=vehicles, drive_s=drive_s, window_s=window_s,
                        inject_bad_model=inject_bad_model, seed=seed, port=port)
    report = Demo(load_settings(), config, say=lambda m: typer.echo(m, err=True)).run()
    if as_json:
        typer.echo(dumps(report))
        return
    typer.echo(f"report: {report['report_html']}")
    for it in report["iterations"]:
        typer.echo(f"iteration {it['index']} ({it['kind']}): model v{it['model']}  "
                   f"{it['interventions_per_hour']:.1f} interventions/h  {it['collisions']} collisions  "
                   f"progress {it['progress']:.2f}  rollout {it['rollout_outcome']}")
    f = report["final_drive"]
    typer.echo(f"final drive: {f['interventions_per_hour']:.1f} interventions/h, {f['collisions']} collisions, "
               f"fleet {f['versions']}")
