"""Forward-track perception: corridor filtering, the numbers the AEB uses, agreement with ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from driveloop.sim import world
from driveloop.contracts.observation import KIN_DIM, Observation, empty_batch
from driveloop.sim.perception import CORRIDOR_HALF_WIDTH_M, Track, forward_track, side_tracks
from driveloop.sim.truth import cutting_in
from driveloop.sim.scenarios import parse_scenario
from driveloop.sim.sensors import SensorConfig, SensorSuite
from driveloop.sim.simulator import Simulator
from hypothesis import given, settings
from hypothesis import strategies as st

from driveloop.core.exceptions import SafetyError


def kin(*neighbours: tuple[float, float, float, float], ego_speed: float = 20.0, present: float = 1.0,
        heading: float = 0.0, offset: float = 0.0) -> np.ndarray:
    """Kinematics vector with rows (dx, dy, dvx, dvy)."""
    k = np.zeros(KIN_DIM, dtype=np.float32)
    k[0], k[2], k[3] = ego_speed, heading, offset
    for i, (dx, dy, dvx, dvy) in enumerate(neighbours):
        k[6 + 5 * i: 11 + 5 * i] = (present, dx, dy, dvx, dvy)
    return k


def test_in_lane_vehicle_gives_track() -> None:
    track = forward_track(kin((25.0, 0.3, -4.0, 0.0)))
    assert track == Track(gap_m=20.0, closing_speed_mps=4.0, lead_speed_mps=16.0)


@pytest.mark.parametrize(
    ("dy", "expected"),
    [(0.0, True), (1.79, True), (-1.79, True), (1.81, False), (-1.81, False), (4.0, False), (-4.0, False)],
)
def test_corridor_threshold(dy: float, expected: bool) -> None:
    assert CORRIDOR_HALF_WIDTH_M == 1.8
    assert (forward_track(kin((30.0, dy, 0.0, 0.0))) is not None) == expected


def test_adjacent_lane_vehicle_is_not_a_forward_track() -> None:
    # Closer car in the next lane, farther car in ours: the track is ours.
    track = forward_track(kin((8.0, 4.0, -10.0, 0.0), (40.0, -0.2, -2.0, 0.0)))
    assert track is not None and track.gap_m == pytest.approx(35.0) and track.closing_speed_mps == 2.0
    assert forward_track(kin((8.0, 4.0, -10.0, 0.0), (12.0, -3.9, -10.0, 0.0))) is None


def test_vehicles_behind_and_absent_rows_are_ignored() -> None:
    assert forward_track(kin((-10.0, 0.0, 5.0, 0.0))) is None
    assert forward_track(kin((0.0, 0.0, 5.0, 0.0))) is None  # dx must be > 0
    assert forward_track(kin((20.0, 0.0, -5.0, 0.0), present=0.0)) is None
    assert forward_track(np.zeros(KIN_DIM, dtype=np.float32)) is None


def test_nearest_in_lane_wins_regardless_of_row_order() -> None:
    track = forward_track(kin((60.0, 0.0, 0.0, 0.0), (15.0, 0.5, -3.0, 0.0), (30.0, -0.5, -1.0, 0.0)))
    assert track is not None and track.gap_m == pytest.approx(10.0) and track.closing_speed_mps == 3.0


def test_gap_can_be_negative_and_lead_speed_not() -> None:
    track = forward_track(kin((4.0, 0.0, -25.0, 0.0), ego_speed=20.0))
    assert track is not None and track.gap_m == pytest.approx(-1.0) and track.lead_speed_mps == 0.0


def test_non_finite_rows_ignored_and_bad_shapes_refused() -> None:
    k = kin((math.nan, 0.0, 0.0, 0.0), (30.0, 0.0, -1.0, 0.0))
    track = forward_track(k)
    assert track is not None and track.gap_m == pytest.approx(25.0)
    assert forward_track(kin((20.0, 0.0, math.inf, 0.0))) is None
    for bad in (np.zeros(KIN_DIM - 1), np.zeros((1, KIN_DIM))):
        with pytest.raises(SafetyError):
            forward_track(bad)


def test_accepts_an_observation() -> None:
    batch = empty_batch(1)
    obs = Observation(kin((20.0, 0.0, -5.0, 0.0)), batch["lidar"][0], batch["grid"][0])
    assert forward_track(obs) == forward_track(obs.kinematics)


@pytest.mark.parametrize("name", ["ccrs-50", "ccrm-70", "ccrb-12-6"])
def test_matches_ground_truth_in_the_simulator(name: str) -> None:
    sim = Simulator(parse_scenario(name), 0)
    snap = sim.reset()
    sensors = SensorSuite(SensorConfig(), seed=0)
    for _ in range(30):
        track = forward_track(sensors.observe(snap).observation)
        assert track is not None
        assert track.gap_m == pytest.approx(world.gap_m(snap), abs=1e-3)
        assert track.closing_speed_mps == pytest.approx(world.closing_speed_mps(snap), abs=1e-3)
        assert track.lead_speed_mps == pytest.approx(world.lead_vehicle(snap).vx_mps, abs=1e-3)
        snap = sim.step(-2.0, 0.0)
    sim.close()


def test_noisy_gap_error_matches_sigma() -> None:
    sim = Simulator(parse_scenario("ccrs-80"), 0)
    snap = sim.reset()
    sensors = SensorSuite(SensorConfig.uniform(0.5), seed=4)
    errors = [forward_track(sensors.observe(snap).observation).gap_m - world.gap_m(snap) for _ in range(1000)]
    assert np.mean(errors) == pytest.approx(0.0, abs=0.05) and np.std(errors) == pytest.approx(0.5, rel=0.1)
    sim.close()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(values=st.lists(st.floats(width=32), min_size=KIN_DIM, max_size=KIN_DIM))
def test_any_kinematics_gives_none_or_a_finite_in_corridor_track(values: list[float]) -> None:
    k = np.array(values, dtype=np.float32)
    track = forward_track(k)
    if track is None:
        return
    assert all(math.isfinite(x) for x in (track.gap_m, track.closing_speed_mps)) and track.lead_speed_mps >= 0.0
    rows = k[6:].reshape(6, 5).astype(np.float64)
    ok = np.isfinite(rows).all(1) & (rows[:, 0] > 0.5) & (rows[:, 1] > 0) & (np.abs(rows[:, 2]) < 1.8)
    assert track.gap_m == pytest.approx(rows[ok, 1].min() - 5.0)


def _numpy_oracle(k: np.ndarray) -> tuple[float, float, float] | None:
    """The rule written as whole-array numpy (the implementation before the per-tick rewrite)."""
    rows = k[6:].astype(np.float64).reshape(6, 5)
    ok = np.isfinite(rows).all(axis=1) & (rows[:, 0] > 0.5) & (rows[:, 1] > 0) & (np.abs(rows[:, 2]) < 1.8)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    row = rows[idx[np.argmin(rows[idx, 1])]]
    speed = float(k[0]) if math.isfinite(k[0]) else 0.0
    return float(row[1] - 5.0), float(-row[3]), max(speed + float(row[3]), 0.0)


def test_matches_the_whole_array_rule_on_random_rows() -> None:
    g = np.random.default_rng(0)
    tracks = 0
    for _ in range(3000):
        k = np.zeros(KIN_DIM, dtype=np.float32)
        k[0] = g.uniform(-1, 40)
        rows = k[6:].reshape(6, 5)
        n = int(g.integers(0, 7))
        rows[:n, 0] = g.choice([0.0, 1.0, 0.6, 0.4], n)
        rows[:n, 1] = g.uniform(-20, 60, n)
        rows[:n, 2] = g.uniform(-3, 3, n)
        rows[:n, 3:] = g.uniform(-10, 10, (n, 2))
        if g.random() < 0.2:
            k[int(g.integers(0, KIN_DIM))] = g.choice([np.nan, np.inf, -np.inf])
        if g.random() < 0.2:
            rows[int(g.integers(0, 6)), 1:3] = rows[0, 1:3]  # equal distances: the first row wins
        track = forward_track(k)
        expected = _numpy_oracle(k)
        assert (None if track is None else (track.gap_m, track.closing_speed_mps, track.lead_speed_mps)) == expected
        tracks += track is not None
    assert 1000 < tracks < 2900


# Side tracks: everything ahead outside the corridor, placed across the ego's lane for the cut-in rule.
def test_side_tracks_are_the_rows_outside_the_corridor_nearest_first() -> None:
    rows = kin((30.0, 4.0, -2.0, -0.5), (10.0, -3.5, -5.0, 1.0), (20.0, 0.5, -1.0, 0.0), (-5.0, 4.0, 3.0, 0.0))
    got = side_tracks(rows)
    assert [t.gap_m for t in got] == pytest.approx([5.0, 25.0])  # the in-corridor and the rear rows are not
    assert got[0] == pytest.approx((5.0, 5.0, 15.0, -3.5, 1.0))
    for dy in (CORRIDOR_HALF_WIDTH_M - 0.01, CORRIDOR_HALF_WIDTH_M + 0.01):  # exactly one of the two sees it
        row = kin((30.0, dy, 0.0, 0.0))
        assert (len(side_tracks(row)), forward_track(row) is not None) == ((0, True) if dy < 1.8 else (1, False))
    assert side_tracks(kin((30.0, 4.0, 0.0, 0.0), present=0.0)) == ()


def test_side_tracks_are_placed_across_the_lane_not_the_heading() -> None:
    """The ego 0.3 m left of centre, yawed 0.03 rad left: a car 25 m ahead reads 0.75 m further right in the
    ego frame than it is, and the ego's own yaw reads as sideways motion: both turned back to the lane."""
    heading, offset, dx, dy, dvx, dvy = 0.03, 0.3, 25.0, -3.5, -5.0, 0.4
    track, = side_tracks(kin((dx, dy, dvx, dvy), heading=heading, offset=offset))
    assert track.lane_offset_m == pytest.approx(offset + dx * math.sin(heading) + dy * math.cos(heading), abs=1e-5)
    assert track.lane_offset_m == pytest.approx(-2.45, abs=0.01)
    assert track.lateral_speed_mps == pytest.approx((20.0 + dvx) * math.sin(heading) + dvy * math.cos(heading), abs=1e-5)


def test_side_tracks_skip_bad_rows_and_a_bad_ego_block() -> None:
    assert [t.gap_m for t in side_tracks(kin((math.nan, 4.0, 0.0, 0.0), (30.0, 4.0, 0.0, 0.0)))] == [25.0]
    assert side_tracks(kin((30.0, 4.0, 0.0, 0.0), heading=math.nan)) == ()
    for bad in (np.zeros(KIN_DIM - 1), np.zeros((1, KIN_DIM))):
        with pytest.raises(SafetyError):
            side_tracks(bad)


def test_side_track_of_a_cut_in_matches_ground_truth_in_the_simulator() -> None:
    """The parametric cut-in: the sensed offset and lateral speed are the true ones, tick by tick."""
    sim = Simulator(parse_scenario("cutin-15-20-1"), 0)
    snap = sim.reset()
    sensors = SensorSuite(SensorConfig(), seed=0)
    seen = 0
    for _ in range(30):
        cutter = snap.others[0]
        sides = side_tracks(sensors.observe(snap).observation)
        if sides:
            lane_centre = snap.ego.y_m - snap.lane_offset_m
            assert sides[0].lane_offset_m == pytest.approx(cutter.y_m - lane_centre, abs=1e-3)
            assert sides[0].lateral_speed_mps == pytest.approx(cutter.vy_mps, abs=1e-3)
            seen += cutting_in(snap, cutter)
        snap = sim.step(0.0, 0.0)
    assert seen > 0
    sim.close()
