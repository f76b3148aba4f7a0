"""Sensors on hand-built snapshots: shapes, units, frames, noise and dropout statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from driveloop.contracts.observation import (
    GRID_CHANNELS,
    GRID_H,
    GRID_W,
    INPUTS,
    KIN_DIM,
    LIDAR_RANGE_M,
)
from driveloop.sim.scenarios import parse_scenario
from driveloop.sim.sensors import (
    SensorConfig,
    SensorFrame,
    SensorSuite,
    observe,
    observe_suites,
)
from driveloop.sim.simulator import Simulator
from driveloop.sim.world import VehicleState, WorldSnapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from driveloop.core.exceptions import ConfigError

EGO_V = 20.0


def snap(*others: VehicleState, heading: float = 0.0, t_s: float = 0.0) -> WorldSnapshot:
    ego = VehicleState(0, 0.0, 0.0, EGO_V * math.cos(heading), EGO_V * math.sin(heading), heading)
    return WorldSnapshot(t_s, ego, EGO_V, -0.5, 0.01, 0.02, 0.3, 25.0, 4.0, tuple(others))


def car(i: int, x: float, y: float, vx: float, vy: float = 0.0, heading: float = 0.0) -> VehicleState:
    return VehicleState(i, x, y, vx, vy, heading)


def clean(s: WorldSnapshot):
    return observe(s, np.random.default_rng(0)).observation


def rows(obs) -> np.ndarray:
    return obs.kinematics[6:].reshape(6, 5)


def test_shapes_and_dtypes_match_the_contract() -> None:
    obs = clean(snap(car(1, 20.0, 0.0, 15.0)))
    for spec in INPUTS:
        arr = getattr(obs, spec.name)
        assert arr.shape == spec.shape and arr.dtype == np.float32, spec.name
    assert obs.kinematics.shape == (KIN_DIM,) and obs.grid.shape == (GRID_CHANNELS, GRID_H, GRID_W)


def test_ego_block() -> None:
    obs = clean(snap())
    np.testing.assert_allclose(obs.kinematics[:6], [EGO_V, -0.5, 0.02, 0.3, 0.01, 25.0], rtol=1e-6)


def test_vehicle_twenty_metres_ahead() -> None:
    obs = clean(snap(car(1, 20.0, 0.0, 15.0)))
    np.testing.assert_allclose(rows(obs)[0], [1.0, 20.0, 0.0, -5.0, 0.0])
    assert not rows(obs)[1:].any()
    # Lidar cell 0 (straight ahead): 20 m centre to centre minus both half lengths; closing at 5 m/s.
    assert obs.lidar[0, 0] == pytest.approx(15.0, abs=0.01)
    assert obs.lidar[1, 0] == pytest.approx(5.0, abs=0.01)
    assert np.all(obs.lidar[0, 1:] == LIDAR_RANGE_M) and not obs.lidar[1, 1:].any()
    # Grid: x 17.5..22.5 m → columns 12..14 (x from −20 m, 3 m cells); y −1..1 → rows 7, 8 (row 0 at +12 m).
    occ = obs.grid[0]
    assert set(map(tuple, np.argwhere(occ > 0))) == {(r, c) for r in (7, 8) for c in (12, 13, 14)}
    assert occ[7, 13] == pytest.approx(1.0 / 1.5, abs=0.01)  # 1 m of the 1.5 m band, full 3 m length
    assert occ.sum() * 4.5 == pytest.approx(10.0)  # 5 m × 2 m of car
    np.testing.assert_allclose(obs.grid[1][occ > 0], -5.0)
    assert not obs.grid[1][occ == 0].any()


def test_left_and_rear_vehicles() -> None:
    obs = clean(snap(car(1, 0.0, 4.0, 20.0), car(2, -15.0, 0.0, 25.0)))
    assert obs.lidar[0, 8] == pytest.approx(4.0 - 1.0 - 1.0, abs=0.01)  # 90° left: half widths
    assert obs.lidar[1, 8] == pytest.approx(0.0, abs=1e-6)
    assert obs.lidar[0, 16] == pytest.approx(10.0, abs=0.01)  # straight behind
    assert obs.lidar[1, 16] == pytest.approx(5.0, abs=0.01)  # catching up at 5 m/s
    occ = obs.grid[0]
    left_rows = np.nonzero(occ[:, 6])[0]  # column 6: x −2..1 m, beside the ego
    assert left_rows.max() < GRID_H // 2  # the left vehicle lies in the upper (left) rows
    np.testing.assert_allclose(rows(obs)[0], [1.0, 0.0, 4.0, 0.0, 0.0], atol=1e-6)


def test_ego_frame_rotation() -> None:
    # Ego heading +90°: a car 30 m further along +y is straight ahead.
    s = snap(car(1, 0.0, 30.0, 0.0, 15.0, heading=math.pi / 2), heading=math.pi / 2)
    obs = clean(s)
    np.testing.assert_allclose(rows(obs)[0], [1.0, 30.0, 0.0, -5.0, 0.0], atol=1e-5)
    assert obs.lidar[0, 0] == pytest.approx(25.0, abs=0.01)


def test_empty_world_and_out_of_range() -> None:
    obs = clean(snap(car(1, 150.0, 0.0, 20.0)))  # beyond the 100 m neighbour range and the lidar
    assert not obs.kinematics[6:].any()
    assert np.all(obs.lidar[0] == LIDAR_RANGE_M) and not obs.lidar[1].any()
    assert not obs.grid.any()


def test_neighbours_nearest_first_and_truncated() -> None:
    cars = [car(i, 10.0 * i * (-1) ** i, 0.0 if i % 2 else 4.0, 20.0) for i in range(1, 10)]
    obs = clean(snap(*cars))
    r = rows(obs)
    assert np.all(r[:, 0] == 1.0)
    dist = np.hypot(r[:, 1], r[:, 2])
    assert np.all(np.diff(dist) >= 0)
    np.testing.assert_allclose(np.abs(r[:, 1]), [10, 20, 30, 40, 50, 60])  # the 7th..9th car are dropped


def test_lidar_keeps_nearest_per_cell_and_sees_narrow_far_targets() -> None:
    obs = clean(snap(car(1, 30.0, 0.0, 20.0), car(2, 60.0, 0.0, 0.0)))
    assert obs.lidar[0, 0] == pytest.approx(25.0, abs=0.01)  # nearer car occludes the farther one
    far = clean(snap(car(1, 70.0, 6.5, 20.0)))  # 5.3° off axis, between beam centres
    assert far.lidar[0, 0] < LIDAR_RANGE_M


def test_same_seed_same_output() -> None:
    s = snap(car(1, 20.0, 0.0, 15.0), car(2, -8.0, -4.0, 22.0))
    cfg = SensorConfig.uniform(0.5, 0.2)
    a = [SensorSuite(cfg, seed=9) for _ in range(2)]
    for _ in range(5):
        fa, fb = a[0].observe(s), a[1].observe(s)
        for name in ("kinematics", "lidar", "grid"):
            np.testing.assert_array_equal(getattr(fa.observation, name), getattr(fb.observation, name))
        assert fa.stale == fb.stale


def test_noise_statistics() -> None:
    s = snap(car(1, 20.0, 0.0, 15.0))
    cfg = SensorConfig.uniform(0.5)
    rng = np.random.default_rng(1)
    frames = [observe(s, rng, cfg).observation for _ in range(2000)]
    kin = np.stack([f.kinematics for f in frames])
    lidar = np.stack([f.lidar for f in frames])
    dx, dvx = kin[:, 7], kin[:, 9]
    assert dx.mean() == pytest.approx(20.0, abs=0.05) and dx.std() == pytest.approx(0.5, rel=0.1)
    assert dvx.mean() == pytest.approx(-5.0, abs=0.05) and dvx.std() == pytest.approx(0.5, rel=0.1)
    assert kin[:, 0].std() == pytest.approx(0.05, rel=0.15)  # ego speed: 0.1 m/s per sigma
    assert np.all(kin[:, 6] == 1.0) and not kin[:, 11:].any()  # present flag exact, absent rows stay zero
    assert np.all(kin[:, 4:6] == kin[0, 4:6])  # steering and set speed are known exactly
    assert lidar[:, 0, 0].std() == pytest.approx(0.5, rel=0.1)
    assert np.all(lidar[:, 0, 1:] == LIDAR_RANGE_M) and not lidar[:, 1, 1:].any()  # no phantom returns
    grid = np.stack([f.grid for f in frames])
    assert grid[:, 0].min() >= 0.0 and grid[:, 0].max() <= 1.0
    assert grid[:, 0, 0, 0].std() == pytest.approx(0.05 * math.sqrt(1 - 2 / math.pi), rel=0.2)  # clipped at 0


def test_dropout_repeats_the_last_frame_and_marks_it_stale() -> None:
    cfg = SensorConfig(kinematics_dropout_p=0.3, lidar_dropout_p=0.1, grid_dropout_p=0.0)
    suite = SensorSuite(cfg, seed=3)
    stale_counts = {"kinematics": 0, "lidar": 0, "grid": 0}
    prev: SensorFrame | None = None
    n = 2000
    for i in range(n):
        s = snap(car(1, 20.0 + 0.01 * i, 0.0, 15.0), t_s=0.1 * i)
        frame = suite.observe(s)
        if i == 0:
            assert not any(frame.stale.values())  # nothing to repeat yet
        for name, stale in frame.stale.items():
            if stale:
                stale_counts[name] += 1
                np.testing.assert_array_equal(getattr(frame.observation, name), getattr(prev.observation, name))
                assert frame.stamp_s[name] == prev.stamp_s[name] < s.t_s
            else:
                assert frame.stamp_s[name] == s.t_s
        prev = frame
    assert stale_counts["kinematics"] / n == pytest.approx(0.3, abs=0.04)
    assert stale_counts["lidar"] / n == pytest.approx(0.1, abs=0.03)
    assert stale_counts["grid"] == 0
    suite.reset()
    assert not any(suite.observe(snap()).stale.values())


@pytest.mark.parametrize(
    "kwargs",
    [{"kinematics_sigma": -0.1}, {"lidar_sigma": math.nan}, {"grid_sigma": 11.0}, {"kinematics_dropout_p": 1.0},
     {"lidar_dropout_p": -0.1}, {"grid_dropout_p": math.inf}, {"neighbour_range_m": 0.0}],
)
def test_sensor_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SensorConfig(**kwargs)


def test_real_simulator_snapshot() -> None:
    sim = Simulator(parse_scenario("dense"), 2)
    s = sim.reset()
    frame = SensorSuite(SensorConfig.uniform(0.5, 0.1), seed=0).observe(s)
    obs = frame.observation
    assert all(np.isfinite(getattr(obs, n)).all() for n in ("kinematics", "lidar", "grid"))
    assert rows(obs)[:, 0].sum() == min(6, sum(1 for v in s.others if math.hypot(v.x_m - s.ego.x_m,
                                                                                   v.y_m - s.ego.y_m) <= 100))
    assert obs.grid[0].sum() > 0 and (obs.lidar[0] < LIDAR_RANGE_M).any()
    sim.close()


# -- properties: any world gives a well-formed observation ------------------------------------------------
_finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def worlds(draw: st.DrawFn) -> WorldSnapshot:
    n = draw(st.integers(0, 12))
    others = tuple(
        VehicleState(
            i + 1,
            draw(st.floats(-150, 150, **_finite)),
            draw(st.floats(-20, 20, **_finite)),
            draw(st.floats(0, 40, **_finite)),
            draw(st.floats(-3, 3, **_finite)),
            draw(st.floats(-math.pi, math.pi, **_finite)),
            draw(st.floats(3, 12, **_finite)),
            draw(st.floats(1.5, 2.6, **_finite)),
        )
        for i in range(n)
    )
    return snap(*others, heading=draw(st.floats(-math.pi, math.pi, **_finite)))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(world=worlds(), sigma=st.sampled_from([0.0, 0.5, 3.0]), seed=st.integers(0, 2**32 - 1))
def test_observation_always_well_formed(world: WorldSnapshot, sigma: float, seed: int) -> None:
    obs = observe(world, np.random.default_rng(seed), SensorConfig.uniform(sigma)).observation
    for spec in INPUTS:
        arr = getattr(obs, spec.name)
        assert arr.shape == spec.shape and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert obs.lidar[0].min() >= 0.0 and obs.lidar[0].max() <= LIDAR_RANGE_M
    assert obs.grid[0].min() >= 0.0 and obs.grid[0].max() <= 1.0
    rows_ = rows(obs)
    assert set(np.unique(rows_[:, 0])) <= {0.0, 1.0}
    assert not rows_[rows_[:, 0] == 0].any()  # absent rows are all zero
    if sigma == 0.0:
        present = int(rows_[:, 0].sum())
        in_range = sum(math.hypot(v.x_m, v.y_m) <= 100.0 for v in world.others)
        assert present == min(6, in_range)
        # Lidar never reports a return farther than the nearest vehicle outline could be.
        if world.others:
            nearest = min(math.hypot(v.x_m, v.y_m) - math.hypot(v.length_m, v.width_m) / 2 for v in world.others)
            assert obs.lidar[0].min() >= max(nearest, 0.0) - math.hypot(2.5, 1.0) - 1e-3


# -- the batched sensors give the reference implementation's values ---------------------------------------
def _random_world(g: np.random.Generator, t_s: float) -> WorldSnapshot:
    h = g.uniform(-math.pi, math.pi)
    ego = VehicleState(0, g.uniform(-50, 50), g.uniform(-5, 5), 20 * math.cos(h), 20 * math.sin(h), h,
                       g.uniform(4, 6), g.uniform(1.8, 2.2))
    others = tuple(
        VehicleState(i + 1, ego.x_m + g.uniform(-120, 120), ego.y_m + g.uniform(-20, 20), g.uniform(0, 40),
                     g.uniform(-3, 3), g.uniform(-math.pi, math.pi), g.uniform(3, 12), g.uniform(1.5, 2.6))
        for i in range(int(g.integers(0, 25)))
    )
    return WorldSnapshot(t_s, ego, g.uniform(0, 40), g.uniform(-5, 3), g.uniform(-0.3, 0.3), g.uniform(-0.2, 0.2),
                         g.uniform(-1, 1), 25.0, 4.0, others)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()  # bit for bit: -0.0 differs from 0.0 here, unlike ==


@pytest.mark.parametrize("sigma,dropout_p", [(0.0, 0.0), (0.5, 0.0), (3.0, 0.3)])
def test_batched_sensors_equal_the_reference_implementation(sigma: float, dropout_p: float, backend: str) -> None:
    """300 random worlds in fleets of 1..8: the same bits, stale flags and stamps as one reference call each."""
    _compare_with_reference([SensorConfig.uniform(sigma, dropout_p)] * 8, int(sigma * 10) + 1)


def test_mixed_configs_in_one_batch_equal_the_reference(backend: str) -> None:
    """Each vehicle its own range, noise and dropout (the per-vehicle paths): still the reference's bits."""
    configs = [SensorConfig(neighbour_range_m=30.0), SensorConfig.uniform(0.5),
               SensorConfig(lidar_sigma=1.0, grid_dropout_p=0.3, neighbour_range_m=60.0), SensorConfig(),
               SensorConfig.uniform(0.0, 0.2), SensorConfig(kinematics_sigma=2.0, neighbour_range_m=15.0),
               SensorConfig.uniform(3.0, 0.3), SensorConfig(neighbour_range_m=120.0)]
    _compare_with_reference(configs, 7)


def test_backend_falls_back_to_numpy_without_the_compiled_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from driveloop.sim import _sensor_geometry as geometry

    monkeypatch.setattr(geometry, "_backend", None)
    monkeypatch.setattr(geometry, "_kernels", None)
    monkeypatch.setitem(sys.modules, "driveloop.sim._sensor_kernels", None)  # as if numba were not installed
    assert geometry.backend() == "numpy"
    with pytest.raises(ImportError):
        geometry.set_backend("compiled")
    with pytest.raises(ConfigError):
        geometry.set_backend("fortran")


def test_a_sensor_suite_loads_the_backend_before_the_first_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    from driveloop.sim import _sensor_geometry as geometry

    monkeypatch.setattr(geometry, "_backend", None)
    SensorSuite(seed=1)
    assert geometry._backend in geometry.BACKENDS


def _compare_with_reference(configs: list[SensorConfig], seed: int) -> None:
    from driveloop.sim._sensors_ref import observe_reference

    g = np.random.default_rng(seed)
    worlds = [_random_world(g, 0.1 * i) for i in range(300)]
    assert sum(len(w.others) for w in worlds) > 3000  # crowded enough that every sensor sees something
    suites = [SensorSuite(cfg, seed=100 + i) for i, cfg in enumerate(configs)]
    reference = [SensorSuite(cfg, seed=100 + i) for i, cfg in enumerate(configs)]
    hits = 0
    start = 0
    while start < len(worlds):
        n = int(g.integers(1, 9))
        group = worlds[start:start + n]
        batch = observe_suites(suites[: len(group)], group)
        for i, world in enumerate(group):
            ref = reference[i]
            expected = observe_reference(world, ref._rng, ref.config, ref._last)
            ref._last = expected
            got = batch.frames[i]
            for name in ("kinematics", "lidar", "grid"):
                want = getattr(expected.observation, name)
                np.testing.assert_array_equal(getattr(got.observation, name), want)
                assert _bits(getattr(got.observation, name)) == _bits(want)
                assert _bits(batch.arrays[name][i]) == _bits(want)
            assert got.stale == expected.stale and got.stamp_s == expected.stamp_s
            hits += int((expected.observation.lidar[0] < LIDAR_RANGE_M).sum())
        start += n
    assert hits > 1000


def test_observe_batch_rejects_mismatched_inputs() -> None:
    from driveloop.sim.sensors import observe_batch

    with pytest.raises(ConfigError):
        observe_batch([snap()], [], [None], [None])


def test_sensor_batch_is_the_stacked_model_input() -> None:
    from driveloop.contracts.observation import stack

    worlds = [snap(car(1, 20.0 + i, 0.0, 15.0)) for i in range(3)]
    batch = observe_suites([SensorSuite(seed=i) for i in range(3)], worlds)
    expected = stack([f.observation for f in batch.frames])
    for name, arr in batch.arrays.items():
        assert arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(arr, expected[name])


def test_fleet_sensing_batch_equals_each_vehicle_alone_and_keeps_frozen_frames() -> None:
    """sense_fleet on real agents: row i is what agent i's own sensors give; a stale fault repeats its frame."""
    from driveloop.edge.agent import AgentConfig, FaultSpec, VehicleAgent, sense_fleet

    cfg = AgentConfig(sensors=SensorConfig.uniform(0.5, 0.1))
    fleet = [VehicleAgent(f"v{i}", "dense", i, cfg, fault=FaultSpec("stale", 0.1, 1.0) if i == 2 else None)
             for i in range(3)]
    alone = [VehicleAgent(f"v{i}", "dense", i, cfg) for i in range(3)]
    previous: list[object] = [None] * 3
    try:
        for tick in range(3):
            batch = sense_fleet(fleet)
            for i, (a, b) in enumerate(zip(fleet, alone)):
                obs = b.sense()
                frozen = i == 2 and tick >= 1
                for name in ("kinematics", "lidar", "grid"):
                    row = batch[name][i]
                    np.testing.assert_array_equal(row, getattr(a.observation, name))
                    if not frozen:
                        np.testing.assert_array_equal(row, getattr(obs, name))
                if frozen:
                    assert a.observation is previous[i]
                assert a.metrics.sense_s > 0
            previous = [a.observation for a in fleet]
            for a, b in zip(fleet, alone):
                a.act(None)
                b.act(None)
    finally:
        for a in fleet + alone:
            a.close()
