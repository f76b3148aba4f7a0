"""The control loop and fleet runner: batching, supervision between model and actuators, faults, records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driveloop.edge.agent import AgentConfig, FaultSpec
from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
from driveloop.edge.faults import FaultyRunner
from driveloop.core.exceptions import ConfigError
from tests.fakes.runner import FakeRunner


def _plans(n: int, scenario: str = "highway", seed: int = 0) -> list[VehiclePlan]:
    return [VehiclePlan(f"v{i}", scenario, seed * 1000 + i) for i in range(n)]


def _timeless(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.endswith("_ms_p50") and not k.endswith("_ms_p99")}


def test_one_batched_inference_call_per_tick() -> None:
    runner = FakeRunner()
    report = run_fleet(_plans(3), {"default": InProcessInference(runner)}, duration_s=2.0)
    assert runner.calls == 20
    assert set(runner.batch_sizes) == {3}
    assert report.summary()["ticks"] == 60


def test_vehicles_on_different_models_are_batched_per_model() -> None:
    a, b = FakeRunner(version=1), FakeRunner(version=2)
    plans = [VehiclePlan("v0", "highway", 1, "a"), VehiclePlan("v1", "highway", 2, "b"),
             VehiclePlan("v2", "highway", 3, "a")]
    run_fleet(plans, {"a": InProcessInference(a), "b": InProcessInference(b)}, duration_s=1.0)
    assert set(a.batch_sizes) == {2} and set(b.batch_sizes) == {1}


def test_same_seed_same_drive() -> None:
    first = run_fleet(_plans(2, seed=3), {"default": InProcessInference(FakeRunner())}, duration_s=5.0)
    second = run_fleet(_plans(2, seed=3), {"default": InProcessInference(FakeRunner())}, duration_s=5.0)
    assert _timeless(first.summary()) == _timeless(second.summary())
    other = run_fleet(_plans(2, seed=4), {"default": InProcessInference(FakeRunner())}, duration_s=5.0)
    assert _timeless(other.summary()) != _timeless(first.summary())


def test_garbage_model_never_reaches_the_actuators() -> None:
    # Every call returns NaN: the simulator raises SafetyError on a non-finite command, so finishing the
    # drive proves the supervisor replaced every output; all ticks are fallback, one activation each.
    runner = FakeRunner(faults={i: "nan" for i in range(1000)})
    report = run_fleet(_plans(2), {"default": InProcessInference(runner)}, duration_s=3.0)
    s = report.summary()
    assert s["fallback_ticks"] == s["ticks"] == 60
    assert s["interventions"] == 2
    assert s["collisions"] == 0


@pytest.mark.parametrize("kind", ["kill", "nan", "garbage", "late", "hang", "stale"])
def test_injected_fault_is_detected_and_braked_for(kind: str) -> None:
    fault = FaultSpec(kind, at_s=2.0, duration_s=1.0)
    runner = FaultyRunner(FakeRunner(), late_s=0.06, hang_s=0.2)
    report = run_fleet(_plans(1, scenario="dense"), {"default": InProcessInference(runner)}, duration_s=5.0,
                       fault=fault)
    log = report.faults["v0"]
    dt = AgentConfig().sim.dt_s
    assert log["injected_at_s"] == pytest.approx(2.0)
    assert log["detected_at_s"] is not None and log["detected_at_s"] - log["injected_at_s"] <= 2 * dt + 1e-9
    assert log["brake_at_s"] is not None and log["brake_at_s"] - log["detected_at_s"] <= dt + 1e-9
    assert report.summary()["collisions"] == 0


def test_fallback_only_brakes_to_a_stop_without_a_model() -> None:
    config = AgentConfig(model_enabled=False)
    report = run_fleet(_plans(1), {}, duration_s=8.0, config=config)
    v = report.vehicles[0]
    assert v.fallback_ticks == v.ticks
    assert v.collisions == 0


def test_shadow_model_is_compared_never_actuated() -> None:
    main, shadow = FakeRunner(), FakeRunner(max_brake_mps2=3.0, gain_per_s=5.0)
    report = run_fleet(_plans(2), {"default": InProcessInference(main)}, duration_s=2.0,
                       shadows={"default": InProcessInference(shadow)})
    stats = report.shadow["default"]
    assert stats.compared_ticks == 40
    assert stats.mean_abs_diff > 0
    same = run_fleet(_plans(2), {"default": InProcessInference(FakeRunner())}, duration_s=2.0)
    assert _timeless(same.summary())["distance_km"] == _timeless(report.summary())["distance_km"]


def test_recorded_segments_validate(tmp_path) -> None:
    from driveloop.edge.drive import recorder_factory
    from driveloop.contracts.segment import read_ticks, validate_segment

    factory = recorder_factory(tmp_path / "spool", 10**9, "1")
    report = run_fleet(_plans(2), {"default": InProcessInference(FakeRunner())}, duration_s=3.0,
                       recorder_factory=factory)
    assert len(report.segments) == 2
    infos = [validate_segment(p) for p in report.segments]
    assert sorted(i.meta.vehicle for i in infos) == ["v0", "v1"]
    assert sum(i.meta.n_ticks for i in infos) == 60
    ticks = list(read_ticks(report.segments[0]))
    assert ticks[0].expert_action is not None and ticks[0].state["ego"]["x_m"] < ticks[-1].state["ego"]["x_m"]
    assert all(t.source == "model" for t in ticks)


def test_bad_fleet_requests_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        run_fleet([], {"default": InProcessInference(FakeRunner())}, duration_s=1.0)
    with pytest.raises(ConfigError):
        run_fleet(_plans(1), {"default": InProcessInference(FakeRunner())}, duration_s=-1.0)
    with pytest.raises(ConfigError):
        run_fleet(_plans(1), {}, duration_s=1.0)
    with pytest.raises(ConfigError):
        FaultSpec("meteor")


def test_metrics_are_consistent() -> None:
    report = run_fleet(_plans(2), {"default": InProcessInference(FakeRunner())}, duration_s=4.0)
    s = report.summary()
    assert s["driven_s"] == pytest.approx(8.0)
    assert 0 < s["progress"] <= 1.2
    assert s["distance_km"] > 0.1
    assert math.isfinite(s["tick_ms_p99"]) and s["tick_ms_p99"] >= s["tick_ms_p50"] > 0
    assert np.isclose(s["interventions_per_hour"], s["interventions"] / (8.0 / 3600))
