"""``driveloop fl run`` on a fixture built for one outcome: the federated candidate is better than its base
on the held-out suite (not merely "its stage matches its gate", which tests/federated/test_cli_fl.py checks).

The fixture: v1 (the reduced bootstrap of tests/conftest.py: cloned on nominal traffic only, it brakes late
for a stationary target) fills each vehicle's spool with CCRs approaches where the AEB has to step in. Every
vehicle's hindsight labels then brake earlier than v1 did, so the fleet's rounds move the model toward
braking earlier, and on the held-out CCRs suite (ccrs-30/50/70 at held-out seeds) the candidate must need
the fallback less often than v1, never collide, and keep progress and comfort: the gate passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from driveloop.cli import main
from tests.cloud.test_pipeline_cli import check_candidate_beats_base

pytestmark = pytest.mark.slow

VEHICLES = 4
EPISODE_S = 12.0
# (scenario, seed) per spool episode; vehicle i drives all of them with seeds offset by 10 * i
CCRS_EPISODES = (("ccrs-30", 700), ("ccrs-45", 701), ("ccrs-60", 702), ("ccrs-75", 703))


def _fill_spools(home: Path) -> int:
    """Each vehicle's own CCRs drives with v1, recorded into its spool; returns the AEB interventions."""
    from driveloop.cloud.registry import Registry
    from driveloop.edge.drive import open_client, recorder_factory
    from driveloop.edge.fleet import VehiclePlan, run_fleet
    from driveloop.federated.client import vehicle_id_for

    with Registry(home / "registry") as reg:
        art = reg.get(1)
    client, _ = open_client(art, isolate=False, fault=None, device="cpu")
    interventions = 0
    for i in range(VEHICLES):
        vid = vehicle_id_for(i)
        factory = recorder_factory(home / "federated" / "vehicles" / vid / "spool", 1 << 28, str(art.manifest.version))
        for scenario, seed in CCRS_EPISODES:
            report = run_fleet([VehiclePlan(vid, scenario, seed + 10 * i)], {"default": client}, EPISODE_S,
                               recorder_factory=factory)
            interventions += int(report.summary()["interventions"])
    return interventions


def test_fl_run_makes_a_candidate_better_than_its_base(trained_home: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:

    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    assert _fill_spools(home) > 0  # the premise: v1 needs the AEB on these approaches

    code = main(["fl", "run", "--json", "--vehicles", str(VEHICLES), "--rounds", "20", "--strategy", "fedavg",
                 "--suite-classes", "ccrs", "--suite-duration", "12", "--base", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    r = json.loads(out)
    assert r["base_version"] == 1 and r["rounds_aggregated"] == r["rounds"]
    art = check_candidate_beats_base(r, home)
    assert art.manifest.lineage["kind"] == "federated"
