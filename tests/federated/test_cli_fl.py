"""``driveloop fl run`` through the real CLI: simulation, DP wrapper, gate, registry with lineage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from driveloop.cli import main
from driveloop.federated.dp import epsilon
from tests.federated.conftest import EPISODE_S, VEHICLES


def test_fl_run_json_registers_a_gated_candidate_with_lineage(fl_home: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(fl_home))
    code = main(["fl", "run", "--rounds", "1", "--vehicles", str(VEHICLES), "--strategy", "fedavg", "--dp",
                 "--dp-noise", "0.05", "--dp-clip", "5.0", "--dp-delta", "1e-4", "--clip-factor", "0", "--quorum", "0.5",
                 "--episodes", "2", "--episode-s", str(EPISODE_S),
                 "--local-epochs", "1", "--suite-classes", "ccrs", "--suite-duration", "4", "--json"])
    out, err = capfd.readouterr()  # at the file descriptors: what Flower's and Ray's processes print too
    assert code == 0, out
    r = json.loads(out)
    assert r["strategy"] == "fedavg" and r["rounds"] == 1 and r["participants_per_round"] == [VEHICLES]
    # Flower's processes logged into the run's folder, nothing reached the terminal but ours, and no
    # deprecated Flower feature was used (Flower names one "deprecated" in its notice)
    run_logs = fl_home / "federated" / r["run"] / "logs"
    assert {p.name for p in run_logs.iterdir()} == {"superlink.log", "superexec.log", "simulation.log"}
    assert "Starting Flower Simulation" in (run_logs / "simulation.log").read_text()
    assert not re.search(r"flwr|flower|ray::|raylet|worker\.py", err, re.IGNORECASE), err
    for path in [*run_logs.iterdir(), *(fl_home / "logs").glob("*")]:
        assert "deprecated" not in path.read_text(errors="replace").lower(), path
    assert "deprecated" not in (out + err).lower()
    assert r["round_log"][0]["rejected"] == []
    dp = r["dp"]  # every round released a noised aggregate of all vehicles: one round's budget
    assert {k: dp[k] for k in ("delta", "noise_multiplier", "clip_norm", "rounds", "sample_rate")} == {
        "delta": 1e-4, "noise_multiplier": 0.05, "clip_norm": 5.0, "rounds": 1, "sample_rate": 1.0}
    assert dp["epsilon"] == pytest.approx(epsilon(0.05, 1, 1e-4)) and dp["epsilon"] > 0
    assert dp["num_sampled_clients"] == VEHICLES and dp["noise_stdev"] == pytest.approx(0.05 * 5.0 / VEHICLES)
    gate = r["gate"]
    for side in ("baseline", "candidate"):
        assert {"interventions_per_hour", "collisions", "progress"} <= set(gate[side])
    assert isinstance(gate["passed"], bool)
    assert r["candidate_stage"] == ("validated" if gate["passed"] else "rejected")

    from driveloop.cloud.registry import Registry

    with Registry(fl_home / "registry") as reg:
        art = reg.get(r["candidate"])
        history = reg.history(r["candidate"])
    m = art.manifest
    assert m.parent_version == r["base_version"]
    assert m.lineage["kind"] == "federated" and m.lineage["strategy"] == "fedavg"
    assert m.lineage["rounds"] == 1 and m.lineage["participants_per_round"] == [VEHICLES]
    assert m.lineage["dp"] == dp
    assert m.lineage["server_optimizer"] == {"kind": "adam", "lr": 3e-4}
    assert m.metrics["gate"]["passed"] == gate["passed"]
    assert [e.to_stage for e in history][-1] == r["candidate_stage"]


@pytest.mark.parametrize("argv,needle", [
    (["--strategy", "bogus"], "unknown strategy"),
    (["--suite-classes", "nope"], "unknown scenario classes"),
    (["--server-opt", "sgd"], "unknown server optimizer"),
    (["--dp"], "--clip-factor 0"),  # the default median clipping is outside the DP accountant's assumptions
    (["--dp", "--clip-factor", "0", "--strategy", "krum"], "strategy 'krum' is not covered"),
    (["--dp", "--clip-factor", "0", "--dp-noise", "0"], "gives epsilon = infinity"),
])
def test_fl_run_bad_flags_fail_with_one_line(argv, needle, fl_home: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(fl_home))
    code = main(["fl", "run", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (fl_home / "federated" / "vehicles" / "fl009").exists()


def test_human_report_shows_rounds_rejections_dp_and_gate(capsys, monkeypatch) -> None:
    from driveloop._cli_fl import _print_report

    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich does not fold the table cells

    side = {"interventions_per_hour": 120.0, "collisions": 0, "progress": 0.9}
    report = {
        "run": "run-x", "strategy": "fedmedian", "vehicles": 4, "candidate": 7, "candidate_stage": "rejected",
        "dp": {"epsilon": 12.345678, "delta": 1e-5, "noise_multiplier": 0.1, "clip_norm": 1.0, "rounds": 2,
               "sample_rate": 0.5, "accountant": "dp-accounting RDP"},
        "round_log": [{"round": 1, "sampled": 4, "replied": 4, "failed": 0, "accepted": 3, "clipped": 1, "wall_s": 2.0,
                       "rejected": [{"vehicle": "fl001", "reason": "non_finite"}], "closed": "complete", "skipped": False},
                      {"round": 2, "sampled": 4, "replied": 1, "failed": 3, "accepted": 1, "clipped": 0, "wall_s": 1.0,
                       "rejected": [], "closed": "skipped", "skipped": True}],
        "gate": {"passed": False, "baseline": side, "candidate": {**side, "interventions_per_hour": 60.0},
                 "reasons": ["highway: comfort_kept failed"]},
    }
    _print_report(report)
    out = capsys.readouterr().out
    assert "fl001:non_finite" in out and "skipped" in out and "epsilon=12.35 at delta=1e-05 after 2 released rounds" in out
    assert "FAILED" in out and "120.0 -> 60.0" in out and "highway: comfort_kept failed" in out
    assert "v7: rejected" in out
