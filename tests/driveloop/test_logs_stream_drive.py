"""`driveloop drive --hazards on`: the vehicles' log lines ride their streams while they drive, the LOGS consumer
indexes them before the command returns, and `driveloop logs search` finds the drive's safety activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driveloop.cli import main

pytestmark = pytest.mark.slow


def test_drive_ships_its_logs_over_the_stream(home: Path, capsys) -> None:
    # a closing-in target at 50 km/h (AEB, FCW) and a model that hangs at 12 s (watchdog)
    code = main(["drive", "--scenario", "ccrs-50", "--vehicles", "2", "--duration", "20", "--fault", "hang",
                 "--fault-at", "12", "--hazards", "on", "--no-record", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    stream = summary["log_stream"]
    assert stream["errors"] == {} and stream["all_indexed"] is True
    assert stream["shipped"]["rejected"] == 0 and stream["shipped"]["accepted"] > 0
    assert stream["consumer"]["dropped_batches"] == {} and stream["consumer"]["rejected_lines"] == 0
    assert stream["consumer"]["indexed"] == stream["shipped"]["accepted"]  # every line the broker took, indexed
    assert summary["logs"]["errors"] == {} and summary["logs"]["pending"] == 0  # nothing left behind

    assert main(["logs", "search", "aeb OR fcw OR watchdog", "--json", "--limit", "1000"]) == 0
    events = [x for x in json.loads(capsys.readouterr()[0])["lines"] if "event.action" in x]
    assert {x["event.action"] for x in events} == {"aeb", "fcw", "watchdog"}
    assert {x["vehicle.id"] for x in events} == {"veh000", "veh001"}
    assert all(x["model.version"] == str(summary["model"]) and len(x["trace.id"]) == 32 for x in events)
