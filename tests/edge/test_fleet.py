"""The control loop and fleet runner: batching, supervision between model and actuators, faults, records."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

from driveloop.edge.agent import AgentConfig, FaultSpec, VehicleAgent
from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
from driveloop.edge.faults import FAULTS, FaultyRunner
from driveloop.core.exceptions import ConfigError
from tests.fakes.runner import FakeRunner, StubClient

DT_S = AgentConfig().sim.dt_s


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


@pytest.mark.parametrize("kind", list(FAULTS))
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


class _Decisions:
    """``on_tick`` hook: each tick's (source, watchdog verdict) per vehicle."""

    def __init__(self) -> None:
        self.ticks: list[list[tuple[str, str | None]]] = []

    def __call__(self, tick: int, total: int, agents: Sequence[VehicleAgent]) -> None:
        decisions = [a.last_decision for a in agents]
        self.ticks.append([(d.source, d.watchdog) for d in decisions])  # type: ignore[union-attr]


# What a model call can raise besides ModelError: ONNX Runtime's untyped errors, numpy's shape error, no memory.
MODEL_PATH_ERRORS: list[tuple[str, Callable[[], BaseException]]] = [
    ("ort-fail", lambda: Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Gemm")),
    ("ort-runtime-exception", lambda: RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad alloc")),
    ("shape-error", lambda: ValueError("cannot reshape array of size 6 into shape (2,2)")),
    ("memory-error", MemoryError),
]


@pytest.mark.parametrize("make", [m for _, m in MODEL_PATH_ERRORS], ids=[n for n, _ in MODEL_PATH_ERRORS])
def test_model_exception_mid_drive_is_no_output_braked_counted_and_logged_once(
        make: Callable[[], BaseException], caplog: pytest.LogCaptureFixture) -> None:
    first, failing = 20, 5  # calls 20..24 raise: t = 2.0 .. 2.4 s, one call per tick (one model group)
    runner = FakeRunner(errors={i: make for i in range(first, first + failing)})
    decisions = _Decisions()
    with caplog.at_level(logging.WARNING, logger="driveloop.edge"):
        client = InProcessInference(runner, clock=lambda: 0.0)  # calls take no time: host speed cannot matter
    with caplog.at_level(logging.WARNING, logger="driveloop.edge"):
        report = run_fleet(_plans(2, scenario="dense"), {"default": client}, duration_s=5.0, on_tick=decisions)
    assert runner.calls == len(decisions.ticks) == 50  # the loop went on, one call per tick
    for tick in range(first, first + failing):  # no model output on those ticks: the fallback drives
        assert decisions.ticks[tick] == [("fallback", "dead")] * 2
    assert decisions.ticks[first - 1] == decisions.ticks[-1] == [("model", None)] * 2  # before and after: the model
    assert [v.model_errors for v in report.vehicles] == [failing, failing]
    assert report.summary()["model_errors"] == 2 * failing and report.summary()["collisions"] == 0
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "model call failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None and logged[0].exc_info[0] is type(make())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupts_from_the_model_call_are_not_swallowed(interrupt: type[BaseException]) -> None:
    runner = FakeRunner(errors={3: interrupt})
    with pytest.raises(interrupt):
        run_fleet(_plans(1), {"default": InProcessInference(runner)}, duration_s=2.0)
    assert runner.calls == 4


class _Latencies:
    """Recorder factory that keeps each vehicle's recorded ``model_latency_ms`` per tick."""

    def __init__(self) -> None:
        self.by_vehicle: dict[str, list[float]] = {}

    def __call__(self, vehicle_id: str, scenario: str, seed: int) -> object:
        series = self.by_vehicle.setdefault(vehicle_id, [])

        class _Rec:
            closed: tuple = ()

            def record(self, tick: object) -> None:
                series.append(tick.model_latency_ms)  # type: ignore[attr-defined]

            def close(self) -> None:
                pass

        return _Rec()


def test_each_vehicle_is_charged_its_own_groups_inference_latency() -> None:
    # Group "a" is called first each tick: a vehicle of group "b" must not be charged a's call as well.
    clients = {"a": StubClient(latency_s=0.010), "b": StubClient(latency_s=0.020)}
    plans = [VehiclePlan("v0", "highway", 1, "a"), VehiclePlan("v1", "highway", 2, "b"),
             VehiclePlan("v2", "highway", 3, "a")]
    recorded = _Latencies()
    report = run_fleet(plans, clients, duration_s=1.0, recorder_factory=recorded)
    assert recorded.by_vehicle == {"v0": [10.0] * 10, "v1": [20.0] * 10, "v2": [10.0] * 10}
    assert [v.inference_ms for v in report.vehicles] == [[10.0] * 10, [20.0] * 10, [10.0] * 10]
    assert [v.inference_p99_ms for v in report.vehicles] == [10.0, 20.0, 10.0]


def test_shadow_comparisons_are_each_vehicles_own() -> None:
    # The shadow disagrees (+2 m/s², over the 1 m/s² threshold) on batch row 0 only, i.e. vehicle v0.
    main, shadow = StubClient(), StubClient(accel_offset_by_row={0: 2.0})
    report = run_fleet(_plans(2), {"default": main}, duration_s=2.0, shadows={"default": shadow})
    v0, v1 = (v.shadow for v in report.vehicles)
    assert v0 is not None and v1 is not None
    assert (v0.compared_ticks, v0.disagreements, v1.compared_ticks, v1.disagreements) == (20, 20, 20, 0)
    assert v0.mean_abs_diff == pytest.approx(2.0, abs=1e-5) and v1.mean_abs_diff == 0.0
    group = report.shadow["default"]
    assert (group.compared_ticks, group.disagreements) == (40, 20)


def test_no_shadow_stats_for_a_vehicle_without_a_shadow() -> None:
    clients = {"a": StubClient(), "b": StubClient()}
    plans = [VehiclePlan("v0", "highway", 1, "a"), VehiclePlan("v1", "highway", 2, "b")]
    report = run_fleet(plans, clients, duration_s=1.0, shadows={"b": StubClient()})
    assert report.vehicles[0].shadow is None
    assert report.vehicles[1].shadow is not None and report.vehicles[1].shadow.compared_ticks == 10


class _SlowRunner:
    """A runner whose call takes ``call_s`` on the injected clock (a host stall, seen by the loop)."""

    def __init__(self, clock: list[float], call_s: float) -> None:
        self.clock, self.call_s = clock, call_s

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.clock[0] += self.call_s
        n = len(batch["kinematics"])
        return np.zeros((n, 2), np.float32), np.ones(n, np.float32)


@pytest.mark.parametrize(("simulated_deadline", "replied"), [(False, False), (True, True)],
                         ids=["vehicle-deadline-drops-the-late-reply", "simulated-deadline-keeps-it"])
def test_a_host_stall_is_a_miss_only_on_the_vehicles_clock(simulated_deadline: bool, replied: bool) -> None:
    clock = [0.0]
    deadline_s = AgentConfig().deadline_s
    client = InProcessInference(_SlowRunner(clock, 2 * deadline_s), clock=lambda: clock[0],
                                simulated_deadline=simulated_deadline)
    result = client.infer({"kinematics": np.zeros((3, 1), np.float32)}, deadline_s)
    assert (result.actions is not None) is replied
    assert result.latency_s == pytest.approx(2 * deadline_s)  # measured and reported either way
