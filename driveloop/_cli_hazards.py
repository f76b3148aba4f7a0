"""Road-hazard commands: ``driveloop hazards list [--json]``.

The list is what the hazard service last wrote (``<home>/cloud/hazards/active.json``, atomically, after every
change), with hazards whose validity has run out left out; it needs no broker.
"""

from __future__ import annotations

import sys
import time

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app

hazards_app = typer.Typer(help="Road hazards the cloud pushes to vehicles (DENM-shaped, signed).",
                          no_args_is_help=True)
app.add_typer(hazards_app, name="hazards")


@hazards_app.command("list")
def list_hazards(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """The active hazards: action, cause, where, relevance area, advisory, how long still valid."""
    from driveloop.cloud.hazard_service import hazard_dir, read_active
    from driveloop.contracts.hazard import CAUSES
    from driveloop.settings import load_settings

    now = time.time()
    rows = read_active(hazard_dir(load_settings().cloud_dir), now)
    if as_json:
        typer.echo(dumps({"hazards": rows, "count": len(rows)}))
        return
    from rich.console import Console
    from rich.table import Table

    names = {code: name for name, code in CAUSES.items()}
    table = Table(title=f"active hazards ({len(rows)})")
    for col in ("action", "cause", "road", "x m", "area m", "cells", "advice", "valid s"):
        table.add_column(col)
    for h in rows:
        area, advice = h["relevance"], h["advisory"]
        said = ", ".join(f"{k} {v:g}" for k, v in (("speed m/s", advice.get("speed_mps")),
                                                    ("gap s", advice.get("time_gap_s"))) if v is not None)
        table.add_row(f"{h['action_id']['station_id']}#{h['action_id']['sequence_number']}",
                      f"{names.get(h['cause'], h['cause'])}/{h['sub_cause']}", h["road"], f"{h['x_m']:.0f}",
                      f"{area['from_x_m']:.0f}..{area['to_x_m']:.0f}", f"{area['cells'][0]}..{area['cells'][-1]}",
                      said, f"{h['reference_time'] + h['validity_s'] - now:.0f}")
    Console(file=sys.stdout).print(table)
