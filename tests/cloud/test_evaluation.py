"""Closed-loop gate: verdict table per scenario class and the suite-level reduction."""

from __future__ import annotations

import dataclasses

import pytest

from driveloop.cloud.evaluation import ClassMetrics, GateTolerances, gate, judge_class
from driveloop.core.exceptions import ConfigError, PipelineError

BASE = ClassMetrics(episodes=4, hours=0.1, collisions=0, interventions=10, progress=1.0, jerk_mps3=1.0)
TOL = GateTolerances()


def _c(**changes: object) -> ClassMetrics:
    return dataclasses.replace(BASE, **changes)


VERDICTS = [
    # name, baseline, candidate, failing checks
    ("better everywhere", BASE, _c(interventions=5), set()),
    ("a collision", BASE, _c(interventions=5, collisions=1), {"collisions_zero"}),
    ("interventions equal: no class gets worse", BASE, _c(), set()),
    ("interventions rise", BASE, _c(interventions=11), {"interventions_kept"}),
    ("baseline clean, candidate clean", _c(interventions=0), _c(interventions=0), set()),
    ("baseline clean, candidate intervenes", _c(interventions=0), _c(interventions=1), {"interventions_kept"}),
    ("progress within 10%", BASE, _c(interventions=5, progress=0.91), set()),
    ("progress exactly at 10%", BASE, _c(interventions=5, progress=0.90), set()),
    ("progress regresses 11%", BASE, _c(interventions=5, progress=0.89), {"progress_kept"}),
    ("jerk within tolerance", BASE, _c(interventions=5, jerk_mps3=1.19), set()),
    ("jerk regresses", BASE, _c(interventions=5, jerk_mps3=1.25), {"comfort_kept"}),
    ("smooth baseline: imperceptible jerk rise", _c(jerk_mps3=0.1), _c(interventions=5, jerk_mps3=0.2), set()),
    ("smooth baseline: still comfortable", _c(jerk_mps3=0.1), _c(interventions=5, jerk_mps3=0.5), set()),
    ("smooth baseline: above the comfort floor", _c(jerk_mps3=0.1), _c(interventions=5, jerk_mps3=0.51), {"comfort_kept"}),
    ("everything wrong", BASE, _c(interventions=20, collisions=2, progress=0.5, jerk_mps3=3.0),
     {"collisions_zero", "interventions_kept", "progress_kept", "comfort_kept"}),
]


@pytest.mark.parametrize(("name", "base", "cand", "failing"), VERDICTS, ids=[v[0] for v in VERDICTS])
def test_class_verdict_table(name: str, base: ClassMetrics, cand: ClassMetrics, failing: set[str]) -> None:
    v = judge_class("ccrb", base, cand, TOL)
    assert {k for k, ok in v.checks.items() if not ok} == failing, name
    assert v.passed == (not failing)


@pytest.mark.parametrize(("highway_progress", "passed"), [(0.95, True), (0.93, False)])
def test_suite_progress_within_5_percent_even_when_each_class_is_within_10(highway_progress: float, passed: bool) -> None:
    base = {"highway": BASE, "ccrb": BASE}
    cand = {"highway": _c(interventions=5, progress=highway_progress), "ccrb": _c(interventions=5, progress=0.95)}
    r = gate(base, cand, TOL)
    assert all(v.passed for v in r.classes.values())  # each class alone is within its 10 %
    assert r.passed == passed and r.as_dict()["suite_progress_ok"] == passed
    assert any("suite progress" in x for x in r.reasons) == (not passed)


def test_one_failing_class_fails_the_gate_and_says_why() -> None:
    base = {"highway": BASE, "ccrb": BASE}
    cand = {"highway": _c(interventions=2), "ccrb": _c(interventions=2, collisions=1)}
    r = gate(base, cand, TOL)
    assert not r.passed
    assert r.classes["highway"].passed and not r.classes["ccrb"].passed
    assert r.reasons == ["ccrb: collisions_zero failed"]
    d = r.as_dict()
    assert d["baseline"]["interventions_per_hour"] == pytest.approx(100.0)
    assert d["candidate"]["interventions_per_hour"] == pytest.approx(20.0)
    assert d["candidate"]["collisions"] == 1
    assert "progress" in d["candidate"]


@pytest.mark.parametrize(("cand_interventions", "passed"), [(7, True), (8, False)])
def test_suite_reduction_threshold(cand_interventions: int, passed: bool) -> None:
    tol = GateTolerances(min_suite_iph_reduction_frac=0.3)
    r = gate({"dense": BASE}, {"dense": _c(interventions=cand_interventions)}, tol)
    assert r.suite_iph_reduction_frac == pytest.approx(1 - cand_interventions / 10)
    assert r.passed is passed


def test_a_class_that_holds_passes_when_the_suite_falls_and_the_gate_fails_when_nothing_falls() -> None:
    """No class may get worse and the suite must get better: a class held at what no model can avoid (a cut-in's
    interventions) does not block an improvement elsewhere, and a candidate that improves nothing is no candidate."""
    base = {"cut-in": _c(interventions=2), "ccrs": BASE}
    better = gate(base, {"cut-in": _c(interventions=2), "ccrs": _c(interventions=9)}, TOL)
    assert better.passed and better.reasons == []
    assert better.suite_iph_reduction_frac == pytest.approx(1 / 12)
    same = gate(base, {"cut-in": _c(interventions=2), "ccrs": BASE}, TOL)
    assert all(v.passed for v in same.classes.values()) and not same.passed
    assert same.reasons == ["suite interventions/h fell 0.0%, need > 0 and >= 0%"]
    traded = gate(base, {"cut-in": _c(interventions=3), "ccrs": _c(interventions=2)}, TOL)  # better suite, one worse
    assert not traded.passed and traded.reasons == ["cut-in: interventions_kept failed"]
    clean = {"highway": _c(interventions=0)}
    assert gate(clean, clean, TOL).passed  # nothing to improve and nothing worse (the suite had none)


def test_gate_refuses_mismatched_or_empty_suites() -> None:
    with pytest.raises(PipelineError, match="different classes"):
        gate({"merge": BASE}, {"cut-in": BASE}, TOL)
    with pytest.raises(PipelineError, match="empty"):
        gate({}, {}, TOL)


@pytest.mark.parametrize(
    "bad",
    [{"progress_tolerance_frac": -0.1}, {"jerk_tolerance_frac": 1.0}, {"min_suite_iph_reduction_frac": float("nan")},
     {"jerk_tolerance_abs_mps3": -1.0}],
)
def test_tolerances_validated(bad: dict) -> None:
    with pytest.raises(ConfigError):
        GateTolerances(**bad)


def test_metrics_validated() -> None:
    with pytest.raises(PipelineError):
        _c(hours=0.0)
    with pytest.raises(PipelineError):
        _c(collisions=-1)


def test_held_out_metrics_do_not_depend_on_host_stalls(random_home, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs on simulated time: a host stall longer than the vehicle's inference deadline (which,
    on a vehicle's wall clock, is a missed reply and a fallback intervention) leaves the metrics unchanged."""
    import time

    from driveloop.cloud.evaluation import EvalSuite, evaluate_model
    from driveloop.cloud.registry import Registry
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
    from driveloop.edge.runtime import ModelRuntime

    with Registry(random_home / "registry") as reg:
        art = reg.get("validated")
    suite = EvalSuite(classes={"ccrs": ("ccrs-30",)}, vehicles_per_scenario=2, duration_s=3.0)
    calm = evaluate_model(art.onnx_path, art.manifest, suite)

    run, calls = ModelRuntime.run, [0]

    def stalling(self: ModelRuntime, batch: dict) -> tuple:  # every 10th call stalls past the deadline
        calls[0] += 1
        if calls[0] % 10 == 0:
            time.sleep(AgentConfig().deadline_s + 0.02)
        return run(self, batch)

    monkeypatch.setattr(ModelRuntime, "run", stalling)
    # the stall is real: on the vehicle's wall clock it is a missed deadline
    wall = run_fleet([VehiclePlan("v", "ccrs-30", 1)], {"default": InProcessInference(
        ModelRuntime(art.onnx_path, art.manifest, device="cpu"))}, duration_s=3.0)
    assert wall.deadline_misses >= 2
    calls[0] = 0
    assert evaluate_model(art.onnx_path, art.manifest, suite) == calm
    assert calls[0] >= 20  # 30 ticks, one batched call each: the suite met (and ignored) 3 stalls
