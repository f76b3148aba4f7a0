"""``driveloop ota …``: staged OTA — rollouts, the fleet server, the fleet simulation, Grafana.

The release engineer registers ``release`` and ``keys`` on :data:`ota_app` from their own module.
Heavy imports (fastapi, uvicorn, sqlalchemy, grafana) happen inside the commands.
"""

from __future__ import annotations

import typer

from driveloop.cli import app

ota_app = typer.Typer(help="Staged OTA: releases, rollouts, fleet server", no_args_is_help=True)
rollout_app = typer.Typer(help="Start, watch and steer a staged rollout.", no_args_is_help=True)
ota_app.add_typer(rollout_app, name="rollout")
app.add_typer(ota_app, name="ota")
