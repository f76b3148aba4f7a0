"""`ota simulate`: the acceptance scenarios through the real controller, director and audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driveloop.cli import main
from driveloop.core.exceptions import ConfigError
from driveloop.ota.audit import JsonlAuditLog
from driveloop.ota.simulate import SimConfig, simulate

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_good_model_reaches_100_percent(seed: int) -> None:
    r = simulate(SimConfig(vehicles=1000, seed=seed))
    assert (r.outcome, r.final_stage) == ("completed", "100%")
    assert r.still_on_new == 1000 and r.reverted == 0 and r.windows_to_abort is None
    assert [d["action"] for d in r.decisions].count("abort") == 0
    assert r.replay_ok and r.audit_ok


@pytest.mark.parametrize("kind", ["interventions", "crash"])
@pytest.mark.parametrize("seed", SEEDS)
def test_bad_model_is_aborted_in_the_canary(kind: str, seed: int) -> None:
    r = simulate(SimConfig(vehicles=1000, bad_model=True, bad_kind=kind, seed=seed))
    assert (r.outcome, r.final_stage) == ("aborted", "canary")
    assert r.windows_to_abort is not None and 1 <= r.windows_to_abort <= 3
    assert r.exposed_outside_canary == 0
    assert r.exposed_vehicles == r.canary_cohort > 0
    assert r.reverted == r.exposed_vehicles and r.still_on_new == 0
    failed = {c["name"] for c in r.decisions[-1]["gate"]["checks"] if c["verdict"] == "fail"}
    assert failed == ({"interventions_per_h"} if kind == "interventions" else {"crashes_per_h"})


def test_fleet_too_small_for_a_canary_holds_and_never_grows() -> None:
    r = simulate(SimConfig(vehicles=60, seed=0, max_windows=12))
    # 1 % of 60 vehicles is no cohort at all: the gate never has evidence, so nothing is promoted
    assert r.outcome == "stalled" and r.final_stage == "shadow" and r.windows == 12
    assert all(d["reason"].startswith("inconclusive: too few") for d in r.decisions)
    assert r.exposed_vehicles == r.canary_cohort == 0 and r.reverted == 0


def test_stalled_shadow_vehicles_are_not_counted_as_reverted() -> None:
    r = simulate(SimConfig(vehicles=300, seed=0, bad_model=True, max_windows=6))
    assert r.outcome == "stalled" and r.final_stage == "shadow"
    assert r.exposed_vehicles == r.canary_cohort > 0  # they run it in shadow, never actuating
    assert r.reverted == 0 and r.still_on_new == 0


def test_same_seed_same_run() -> None:
    a = simulate(SimConfig(vehicles=300, seed=7, bad_model=True))
    b = simulate(SimConfig(vehicles=300, seed=7, bad_model=True))
    assert a == b


def test_audit_log_written_and_verifiable(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    r = simulate(SimConfig(vehicles=1000, bad_model=True, seed=3), audit_path=p)
    entries = JsonlAuditLog(p).entries()
    assert len(entries) == 1 + len(r.decisions)
    assert entries[-1].payload["action"] == "abort" and JsonlAuditLog(p).verify().ok


@pytest.mark.parametrize("kw", [{"vehicles": 0}, {"bad_kind": "meteor"}, {"max_windows": 0}])
def test_bad_config_rejected(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SimConfig(**kw)  # type: ignore[arg-type]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ota", "simulate", "--vehicles", "1000", "--bad-model", "--json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("outcome", "final_stage", "windows_to_abort", "exposed_vehicles", "exposed_outside_canary",
                "reverted"):
        assert key in out
    assert out["outcome"] == "aborted" and out["exposed_outside_canary"] == 0
    assert out["reverted"] == out["exposed_vehicles"]


def test_cli_text_and_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ota", "simulate", "--vehicles", "1000"]) == 0
    assert "completed" in capsys.readouterr().out
    assert main(["ota", "simulate", "--bad-kind", "meteor"]) == 2
    assert "bad_kind" in capsys.readouterr().err
