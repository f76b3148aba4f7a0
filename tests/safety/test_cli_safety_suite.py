"""``driveloop safety-suite`` through the real simulator and control loop (edge/agent.py).

Integration tests (highway-env): skipped under mutation testing, where only the pure tests count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ._harness import UNDER_MUTMUT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(UNDER_MUTMUT, reason="simulator integration test")]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("driveloop.safety").setLevel(logging.ERROR)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from driveloop.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_fallback_only_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(["safety-suite", "--fallback-only", "--case", "ccrs-80", "--case", "ccrb-12-6",
                         "--noise", "0.5", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    for key in ("cases", "avoided", "collisions", "min_gap_m", "false_activations", "nominal_episodes", "rows"):
        assert key in report
    assert (report["cases"], report["avoided"], report["collisions"]) == (2, 2, 0)
    assert report["mode"] == "fallback-only" and report["noise"] == 0.5 and report["model"] is None
    assert report["nominal_episodes"] == 0  # nominal driving needs a model
    assert [r["case"] for r in report["rows"]] == ["ccrs-80", "ccrb-12-6"]
    assert report["min_gap_m"] == min(r["min_gap_m"] for r in report["rows"]) > 0
    assert all(r["interventions"] == 1 for r in report["rows"])  # one activation: the model is dead from t=0
    assert report["rows"][0]["aeb_ticks"] > 0  # at 80 km/h AEB brakes harder than the comfort fallback


def test_all_30_cases_fallback_only_with_noise() -> None:
    """Acceptance 1 in the real simulator: 30/30 avoided with the model dead, sensor noise sigma 0.5."""
    from driveloop._cli_safety import run_suite
    from driveloop.sim.scenarios import CCR_CASES

    report = run_suite({}, fallback_only=True, noise=0.5, cases=CCR_CASES, nominal=0, nominal_duration_s=1.0)
    assert report["cases"] == 30
    assert [r["case"] for r in report["rows"] if not r["avoided"]] == []
    assert report["min_gap_m"] > 1.0


def test_model_mode_with_a_blind_cruise_model() -> None:
    """A cruise controller that ignores the lead (tests/fakes FakeRunner): AEB must take over in time."""
    from driveloop._cli_safety import run_suite, suite_passed
    from driveloop.edge.fleet import InProcessInference
    from tests.fakes.runner import FakeRunner

    runner = FakeRunner()
    report = run_suite({"default": InProcessInference(runner)}, fallback_only=False, noise=0.0,
                       cases=["ccrs-50", "ccrm-80"], nominal=2, nominal_duration_s=3.0, seed=1)
    assert report["mode"] == "model" and runner.calls > 0
    assert report["avoided"] == 2
    assert all(r["aeb_ticks"] > 0 and r["interventions"] >= 1 for r in report["rows"])
    assert report["nominal_episodes"] == 2
    assert suite_passed(report) == (report["false_activations"] == 0 and report["nominal_collisions"] == 0)


def test_nominal_activations_are_listed_with_their_ground_truth() -> None:
    """A model that steers steadily left drifts out of its lane: every nominal activation is listed as a
    lane departure, with the true lane offset the vehicle had when the guard fired, and judged justified
    by the ground truth (the car was about to cross the lane marking: the model drove badly)."""
    from dataclasses import dataclass

    import numpy as np

    from driveloop._cli_safety import run_suite, suite_passed
    from driveloop.edge.fleet import InProcessInference
    from driveloop.safety import LaneConfig
    from tests.fakes.runner import FakeRunner

    @dataclass
    class DriftingRunner(FakeRunner):
        def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            action, conf = super().run(batch)
            action[:, 1] = 0.02  # rad, left, whatever the lane offset
            return action, conf

    report = run_suite({"default": InProcessInference(DriftingRunner())}, fallback_only=False, noise=0.0, cases=[],
                       nominal=3, nominal_duration_s=6.0, seed=2)
    rows = report["nominal_activations"]
    assert report["nominal_episodes"] == 3 and report["cases"] == 0
    assert len(rows) == report["justified_activations"] >= 3 and report["false_activations"] == 0
    assert suite_passed(report)  # no case ran, no collision, no activation for nothing
    assert report["activations_by_kind"] == {"lane": len(rows)}
    assert {r["vehicle"] for r in rows} == {"nom0000", "nom0001", "nom0002"}
    assert next(r["seed"] for r in rows if r["vehicle"] == "nom0001") == 200_001
    for r in rows:
        assert r["reason"].startswith("lane departure: offset +")
        # fired on the way out, before the car body crossed into the next lane's centre
        assert 0.5 < r["lane_offset_m"] < LaneConfig().max_offset_m + 0.5
        assert r["tick"] > 0 and r["speed_mps"] > 10.0
        assert r["justified"] and ("line crossing" in r["why"] or "over the lane marking" in r["why"])


def test_an_activation_without_a_true_hazard_is_false() -> None:
    """The log judges each activation on the state the supervisor saw (the previous tick's snapshot)."""
    from types import SimpleNamespace

    from driveloop._cli_safety import ActivationLog, suite_passed
    from driveloop.sim.world import VehicleState, WorldSnapshot

    def snap(lead_gap: float | None) -> WorldSnapshot:
        others = () if lead_gap is None else (VehicleState(1, lead_gap + 5.0, 0.0, 20.0, 0.0, 0.0),)
        return WorldSnapshot(0.0, VehicleState(0, 0.0, 0.0, 25.0, 0.0, 0.0), 25.0, 0.0, 0.0, 0.0, 0.0, 25.0, 4.0, others)

    log = ActivationLog()
    quiet = SimpleNamespace(vehicle_id="v", seed=1, last_decision=None, snapshot=snap(None))
    log(0, 3, [quiet])  # remembers the free road the next decision is made on
    phantom = SimpleNamespace(decision=SimpleNamespace(activation=True, reason="aeb partial: ttc=1.20 s"))
    log(1, 3, [SimpleNamespace(vehicle_id="v", seed=1, last_decision=phantom.decision, snapshot=snap(8.0))])
    log(2, 3, [SimpleNamespace(vehicle_id="v", seed=1, last_decision=phantom.decision, snapshot=snap(8.0))])
    first, second = log.rows
    assert (first["justified"], first["why"]) == (False, "no aeb hazard in the ground truth")  # braked for nothing
    assert second["justified"] and "TTC" in second["why"]  # 8 m closing at 5 m/s: a real hazard
    report = {"cases": 0, "avoided": 0, "nominal_collisions": 0, "false_activations": sum(not r["justified"] for r in log.rows)}
    assert not suite_passed(report)


@pytest.mark.parametrize(("reason", "kind"), [
    ("aeb partial: ttc=1.40 s, required decel 3.10 m/s^2", "aeb"),
    ("lane departure: offset +1.45 m predicted", "lane"),
    ("watchdog deadline: reply 0.150 s late", "watchdog"),
    ("model disabled", "disabled"),
    ("", "unknown"),
    (None, "unknown"),
])
def test_activation_kind(reason: str | None, kind: str) -> None:
    from driveloop._cli_safety import _kind

    assert _kind(reason) == kind


def test_suite_verdict() -> None:
    from driveloop._cli_safety import suite_passed

    good = {"cases": 30, "avoided": 30, "false_activations": 0, "nominal_collisions": 0}
    assert suite_passed(good)
    assert not suite_passed({**good, "avoided": 29})
    assert not suite_passed({**good, "false_activations": 1})
    assert not suite_passed({**good, "nominal_collisions": 1})


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--fallback-only", "--case", "ccrs-7"], 2, "unknown scenario 'ccrs-7'"),
    (["--fallback-only", "--case", "highway"], 2, "not CCR cases: ['highway']"),
    (["--fallback-only", "--noise", "-1"], 2, "Invalid value for '--noise'"),
    (["--bogus"], 2, "No such option"),
])
def test_bad_input_is_one_line(args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = _cli(["safety-suite", *args], capsys)
    assert got == code and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_model_mode_without_a_registry_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    code, out, err = _cli(["safety-suite", "--case", "ccrs-30"], capsys)
    assert code == 4 and out == ""
    assert err.strip().splitlines() == [f"driveloop: error: no model registry at {tmp_path / 'home' / 'registry'}: "
                                        "run `driveloop bootstrap` first"]
    assert not (tmp_path / "home").exists()  # nothing written
