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
    report = {"cases": 0, "avoided": 0, "avoidable_collisions": 0, "nominal_collisions": 0,
              "false_activations": sum(not r["justified"] for r in log.rows)}
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
    """Every avoidable (required) case avoided; a collision the ground truth calls unavoidable is no failure."""
    from driveloop._cli_safety import suite_passed

    good = {"cases": 65, "avoidable": 51, "avoided": 51, "avoidable_collisions": 0, "false_activations": 0,
            "nominal_collisions": 0}
    assert suite_passed(good)
    assert not suite_passed({**good, "avoided": 50, "avoidable_collisions": 1})
    assert not suite_passed({**good, "false_activations": 1})
    assert not suite_passed({**good, "nominal_collisions": 1})


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--fallback-only", "--case", "ccrs-4"], 2, "scenario 'ccrs-4': ego speed 4 km/h is outside 5..130 km/h"),
    (["--fallback-only", "--case", "ccrb-12-11"], 2, "target deceleration 11 m/s2 is outside 1..10 m/s2"),
    (["--fallback-only", "--case", "ccrx-50"], 2, "unknown scenario 'ccrx-50'"),
    (["--fallback-only", "--case", "highway"], 2, "not CCR or cut-in cases: ['highway']"),
    (["--fallback-only", "--noise", "-1"], 2, "Invalid value for '--noise'"),
    (["--fallback-only", "--model-never-brakes"], 2, "--model-never-brakes needs the model to drive"),
    (["--fallback-only", "--family", "ccrx"], 2, "--family must be one of ccr, cut-in, all, got 'ccrx'"),
    (["--family", "ccrx"], 2, "--family must be one of ccr, cut-in, all, got 'ccrx'"),
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


def test_families_pick_their_cases() -> None:
    from driveloop._cli_safety import family_cases
    from driveloop.sim.scenarios import CCR_CASES, CUTIN_CASES

    assert family_cases("ccr") == list(CCR_CASES) and len(CCR_CASES) == 30  # the default stays the NCAP grid
    assert family_cases("cut-in") == list(CUTIN_CASES)
    assert family_cases("all") == list(CCR_CASES) + list(CUTIN_CASES)


def test_never_brakes_drops_only_the_braking() -> None:
    """The model's steering and throttle pass; a negative acceleration becomes 0; what the watchdog must judge
    (NaN, a wrong shape, no reply) passes unchanged."""
    import numpy as np

    from driveloop._cli_safety import NeverBrakes
    from driveloop.edge.fleet import BatchResult

    class Scripted:
        def __init__(self, result: BatchResult) -> None:
            self.result, self.injected = result, []

        def infer(self, batch: dict, deadline_s: float) -> BatchResult:
            return self.result

        def inject(self, kind: str, count: int | None = 1) -> None:
            self.injected.append((kind, count))

    actions = np.array([[-6.0, 0.1], [1.5, -0.2], [np.nan, 0.0]], np.float32)
    inner = Scripted(BatchResult(actions, np.full((3, 1), 0.9, np.float32), 0.01, alive=True))
    got = NeverBrakes(inner).infer({}, 0.05)
    assert got.actions[:2].ravel().tolist() == pytest.approx([0.0, 0.1, 1.5, -0.2])
    assert np.isnan(got.actions[2, 0]) and got.latency_s == 0.01 and got.alive
    assert actions[0, 0] == -6.0  # the model's own array is untouched
    for passthrough in (BatchResult(None, None, 0.06, alive=True), BatchResult(np.zeros((2, 5), np.float32), None,
                                                                               0.0, alive=True)):
        assert NeverBrakes(Scripted(passthrough)).infer({}, 0.05) is passthrough
    wrapped = NeverBrakes(inner)
    wrapped.inject("kill", None)
    assert inner.injected == [("kill", None)]


def test_cut_in_family_with_a_model_that_never_brakes() -> None:
    """The AEB alone must avoid every cut-in the ground truth calls avoidable (braking at the vehicle's limits
    from the first frame the car's side is over the marking). Before the cut-in rule and full braking at the
    vehicle's limit, cutin-6-20-1 and cutin-10-40-1 collided (the AEB saw the car only once its centre was in
    the 1.8 m corridor, and braked at 8 m/s^2); cutin-3-20-2 cannot be avoided by anyone."""
    from driveloop._cli_safety import run_suite, suite_passed
    from driveloop.edge.fleet import InProcessInference
    from tests.fakes.runner import FakeRunner

    cases = ["cutin-6-20-1", "cutin-10-40-1", "cutin-3-20-2"]
    report = run_suite({"default": InProcessInference(FakeRunner())}, fallback_only=False, noise=0.0, cases=cases,
                       nominal=2, nominal_duration_s=2.0, never_brakes=True)
    assert report["mode"] == "model-never-brakes" and report["families"] == ["cut-in"]
    assert report["nominal_episodes"] == 0  # a model without brakes drives no nominal episodes
    rows = {r["case"]: r for r in report["rows"]}
    assert [rows[c]["avoidable"] for c in cases] == [True, True, False]
    assert [rows[c]["avoided"] for c in cases] == [True, True, False]
    assert (report["cases"], report["avoidable"], report["avoided"], report["avoidable_collisions"]) == (3, 2, 2, 0)
    assert report["collisions"] >= 1 and suite_passed(report)
    for case in cases:
        row = rows[case]
        assert row["aeb_ticks"] > 0 and row["detected_at_s"] > 1.0 and row["gap_at_detection_m"] > 0
        assert (row["ideal_min_gap_m"] > 0) == row["avoidable"]
    assert rows["cutin-10-40-1"]["ideal_min_gap_m"] < 0.1  # a near thing even at the vehicle's limits


def test_ccr_with_a_model_that_never_brakes() -> None:
    """Euro NCAP's driver who does not brake: the model drives, every avoided case is the AEB's doing."""
    from driveloop._cli_safety import run_suite
    from driveloop.edge.fleet import InProcessInference
    from tests.fakes.runner import FakeRunner

    runner = FakeRunner()
    report = run_suite({"default": InProcessInference(runner)}, fallback_only=False, noise=0.5,
                       cases=["ccrs-80", "ccrm-50", "ccrb-12-6"], nominal=0, nominal_duration_s=1.0, never_brakes=True)
    assert runner.calls > 0 and report["mode"] == "model-never-brakes"
    assert (report["cases"], report["avoidable"], report["avoided"], report["collisions"]) == (3, 3, 3, 0)
    assert all(r["aeb_ticks"] > 0 and r["avoidable"] is None for r in report["rows"])  # required, not judged


def test_cli_cut_in_json_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``driveloop safety-suite --family cut-in --model-never-brakes --json`` (a fake model in place of the
    registry's; two cases via --case to stay fast)."""
    from types import SimpleNamespace

    import driveloop._cli_edge as cli_edge
    import driveloop.edge.drive as drive
    from driveloop.edge.fleet import InProcessInference
    from tests.fakes.runner import FakeRunner

    monkeypatch.setattr(cli_edge, "resolve_model", lambda root, ref: SimpleNamespace(manifest=SimpleNamespace(version=7)))
    monkeypatch.setattr(drive, "open_client", lambda *a: (InProcessInference(FakeRunner()), None))
    code, out, _ = _cli(["safety-suite", "--family", "cut-in", "--model-never-brakes", "--case", "cutin-20-30-1",
                         "--case", "cutin-3-30-2", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["model"] == 7 and report["mode"] == "model-never-brakes"
    assert (report["cases"], report["avoidable"], report["avoided"], report["avoidable_collisions"]) == (2, 1, 1, 0)
    assert report["collisions"] >= 1  # the unavoidable one
    assert [r["aeb_ticks"] > 0 for r in report["rows"]] == [True, True]
