"""Simulator adapter and ground-truth world: physics rules, determinism, avoidable scenes, rendering."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from driveloop.sim import world
from driveloop.sim.scenarios import CCR_CASES, parse_scenario
from driveloop.sim.simulator import SimConfig, Simulator
from driveloop.sim.world import VehicleState, WorldSnapshot

from driveloop.core.exceptions import ConfigError, SafetyError, ScenarioError, SegmentError


def _drive(name: str, seed: int, steps: int, policy=None, config: SimConfig | None = None) -> list[WorldSnapshot]:
    """Drive ``steps`` ticks with ``policy(sim, snapshot, i)`` (default: the expert)."""
    sim = Simulator(parse_scenario(name), seed, config)
    snap = sim.reset()
    out = [snap]
    try:
        for i in range(steps):
            a, s = policy(sim, snap, i) if policy else sim.expert_action()
            snap = sim.step(a, s)
            out.append(snap)
    finally:
        sim.close()
    return out


def _trajectory(snaps: list[WorldSnapshot]) -> np.ndarray:
    return np.array([[s.ego.x_m, s.ego.y_m, s.speed_mps] + [v.x_m for v in s.others] for s in snaps])


# -- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["highway", "cut-in", "merge", "ccrb-12-6"])
def test_same_seed_same_trajectory(name: str) -> None:
    a, b = _trajectory(_drive(name, 5, 60)), _trajectory(_drive(name, 5, 60))
    np.testing.assert_array_equal(a, b)
    c = _trajectory(_drive(name, 6, 60))
    assert a.shape != c.shape or not np.array_equal(a, c)


_REPLAY_SCRIPT = """
import hashlib, numpy as np
from driveloop.sim.scenarios import parse_scenario
from driveloop.sim.simulator import Simulator
h = hashlib.sha256()
for name in ("dense", "merge"):
    sim = Simulator(parse_scenario(name), 7)
    s = sim.reset()
    for _ in range(40):
        s = sim.step(*sim.expert_action())
        h.update(np.array([s.ego.x_m, s.ego.y_m, s.speed_mps] + [v.x_m for v in s.others]).tobytes())
print(h.hexdigest())
"""


def test_replay_is_identical_across_processes() -> None:
    """No hidden process state (hash seeds, global RNGs) leaks into a scenario."""
    digests = {
        subprocess.run([sys.executable, "-c", _REPLAY_SCRIPT], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hs}).stdout.strip()
        for hs in ("1", "2")
    }
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_reset_replays_the_scene() -> None:
    sim = Simulator(parse_scenario("dense"), 3)
    first = sim.reset()
    for _ in range(20):
        sim.step(*sim.expert_action())
    again = sim.reset()
    assert again == first and sim.t_s == 0.0 and sim.collisions == 0
    sim.close()


# -- physics -------------------------------------------------------------------------------------------
def test_no_reversing_under_full_brake() -> None:
    snaps = _drive("ccrs-30", 0, 80, policy=lambda sim, s, i: (-9.0, 0.0))
    speeds = np.array([s.speed_mps for s in snaps])
    xs = np.array([s.ego.x_m for s in snaps])
    assert speeds.min() >= 0.0 and speeds[-1] == 0.0
    assert np.all(np.diff(xs) >= -1e-9)  # never rolls backwards
    assert snaps[-1].accel_mps2 == 0.0  # held at standstill, no phantom deceleration


def test_speed_capped_at_max() -> None:
    # ccrs-80 starts at 22.2 m/s with 89 m to the target: room to hit a 25 m/s cap before it.
    cfg = SimConfig(max_speed_mps=25.0)
    snaps = _drive("ccrs-80", 0, 25, policy=lambda sim, s, i: (50.0, 0.0), config=cfg)  # clipped to accel_max
    speeds = np.array([s.speed_mps for s in snaps])
    assert speeds.max() <= 25.0 + 1e-9 and speeds[-1] == pytest.approx(25.0)
    assert not snaps[-1].crashed
    assert max(s.accel_mps2 for s in snaps) <= SimConfig().accel_max_mps2 + 1e-9


def test_brake_lag_first_order() -> None:
    # Control at 20 Hz so that 0.25 s is a whole number of ticks: 63 % of the step after one time constant.
    cfg = SimConfig(dt_s=0.05, sim_frequency_hz=20.0)
    snaps = _drive("ccrs-80", 0, 10, policy=lambda sim, s, i: (-8.0, 0.0), config=cfg)
    accel = np.array([s.accel_mps2 for s in snaps])
    t = np.array([s.t_s for s in snaps])
    assert accel[0] == 0.0
    np.testing.assert_allclose(accel[1:], -8.0 * (1 - np.exp(-t[1:] / 0.25)), rtol=1e-6)
    assert accel[5] / -8.0 == pytest.approx(0.632, abs=0.005) and t[5] == pytest.approx(0.25)
    # Speed integrates the lagged acceleration, not the command.
    assert snaps[1].speed_mps - snaps[0].speed_mps == pytest.approx(accel[1] * 0.05, rel=1e-6)


def test_brake_lag_default_control_period() -> None:
    snaps = _drive("ccrs-80", 0, 3, policy=lambda sim, s, i: (-8.0, 0.0))
    frac = [s.accel_mps2 / -8.0 for s in snaps[1:]]
    assert frac[1] < 0.632 < frac[2]  # crosses 63 % between 0.2 s and 0.3 s
    no_lag = _drive("ccrs-80", 0, 1, policy=lambda sim, s, i: (-8.0, 0.0), config=SimConfig(brake_lag_s=0.0))
    assert no_lag[1].accel_mps2 == pytest.approx(-8.0)


def test_positive_steering_turns_left() -> None:
    snaps = _drive("ccrs-80", 0, 10, policy=lambda sim, s, i: (0.0, 0.05))
    assert snaps[-1].ego.y_m > snaps[0].ego.y_m + 0.5
    assert snaps[-1].lane_offset_m > 0.5 and snaps[-1].heading_rel_rad > 0
    assert snaps[-1].steering_rad == pytest.approx(0.05)


def test_commands_clipped_and_non_finite_refused() -> None:
    sim = Simulator(parse_scenario("ccrs-50"), 0)
    with pytest.raises(ConfigError):
        sim.step(0.0, 0.0)  # before reset
    sim.reset()
    snap = sim.step(0.0, 3.0)
    assert snap.steering_rad == pytest.approx(SimConfig().max_steer_rad)
    for bad in [(math.nan, 0.0), (0.0, math.inf), (-math.inf, 0.0)]:
        with pytest.raises(SafetyError):
            sim.step(*bad)
    sim.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"dt_s": 0.0}, {"dt_s": 0.1, "sim_frequency_hz": 15.0}, {"brake_lag_s": -0.1}, {"accel_min_mps2": 1.0},
     {"accel_max_mps2": 0.0}, {"max_steer_rad": 2.0}, {"max_speed_mps": 0.0}, {"render_width_px": 4}],
)
def test_sim_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SimConfig(**kwargs)


def test_seed_and_name_validation() -> None:
    with pytest.raises(ConfigError):
        Simulator(parse_scenario("highway"), -1)
    with pytest.raises(ScenarioError):
        Simulator("ccrs-4", 0)
    by_name = Simulator("ccrs-20", 0)
    assert by_name.spec == parse_scenario("ccrs-20") and by_name.reset() == _drive("ccrs-20", 0, 0)[0]
    by_name.close()


# -- collisions, road --------------------------------------------------------------------------------------
def test_collision_is_reported_once() -> None:
    sim = Simulator(parse_scenario("ccrs-50"), 0)
    sim.reset()
    for _ in range(100):
        snap = sim.step(0.0, 0.0)
    assert snap.crashed and sim.crashed and sim.collisions == 1
    assert snap.speed_mps >= 0.0
    sim.close()


def test_off_road_flag() -> None:
    snaps = _drive("ccrs-30", 0, 40, policy=lambda sim, s, i: (0.0, 0.1 if i < 20 else 0.0))
    assert not snaps[0].off_road and snaps[-1].off_road


# -- the expert ----------------------------------------------------------------------------------------
def test_expert_keeps_lane_and_drives_nominal_traffic() -> None:
    for name in ("highway", "dense"):
        snaps = _drive(name, 11, 200)
        assert not any(s.crashed for s in snaps), name
        assert max(abs(s.lane_offset_m) for s in snaps) < 0.3
        lanes = {s.ego.lane_index for s in snaps}
        assert len(lanes) == 1  # the ego never changes lane


def test_expert_recentres_after_drift() -> None:
    sim = Simulator(parse_scenario("ccrs-80"), 0)
    sim.reset()
    for _ in range(5):
        snap = sim.step(0.0, 0.03)
    assert snap.lane_offset_m > 0.1
    _, steer = sim.expert_action()
    assert steer < 0  # steer right, back to the centre
    for _ in range(30):
        snap = sim.step(*sim.expert_action())
    assert abs(snap.lane_offset_m) < 0.05
    sim.close()


def test_expert_brakes_for_stationary_target() -> None:
    snaps = _drive("ccrs-60", 0, 150)
    assert min(s.accel_mps2 for s in snaps) < -2.0
    assert not any(s.crashed for s in snaps) and snaps[-1].speed_mps == 0.0
    assert 0.0 < world.gap_m(snaps[-1]) < 15.0


# -- scenes ----------------------------------------------------------------------------------------------
def test_ccr_scene_layout() -> None:
    for name in ("ccrs-50", "ccrm-60", "ccrb-40-2"):
        spec = parse_scenario(name)
        snap = _drive(name, 2, 0)[0]
        assert len(snap.others) == 1 and snap.speed_mps == pytest.approx(spec.ego_speed_mps)
        assert world.lead_vehicle(snap) is snap.others[0]
        tol = 0.5 if spec.kind == "ccrb" else 0.03 * spec.headway_m
        assert world.gap_m(snap) == pytest.approx(spec.headway_m, abs=tol + 1e-6)
        assert snap.others[0].vx_mps == pytest.approx(spec.target_speed_mps)


def test_ccrb_target_brakes_after_one_to_two_seconds() -> None:
    snaps = _drive("ccrb-40-6", 4, 40, policy=lambda sim, s, i: (-9.0, 0.0))
    speeds = np.array([s.others[0].vx_mps for s in snaps])
    t = np.array([s.t_s for s in snaps])
    onset = t[np.argmax(speeds < speeds[0] - 1e-6)]
    assert 1.0 <= onset <= 2.2
    decel = -np.diff(speeds) / 0.1
    assert decel.max() == pytest.approx(6.0, abs=1e-6)


def _ground_truth_aeb(sim: Simulator, s: WorldSnapshot, i: int) -> tuple[float, float]:
    """A deliberately simple braking rule on ground truth, to prove each CCR case is avoidable."""
    lead = world.lead_vehicle(s)
    if lead is None:
        return 0.0, 0.0
    need = s.speed_mps * 0.35 + s.speed_mps**2 / 16.0 - lead.vx_mps**2 / 18.0
    if s.accel_mps2 < -0.5 or world.ttc_s(s) < 1.5 or world.gap_m(s) < need + 1.0:
        return -9.0, 0.0
    return 0.0, 0.0


@pytest.mark.parametrize("name", CCR_CASES)
def test_every_ccr_case_is_avoidable_and_hazardous(name: str) -> None:
    spec = parse_scenario(name)
    steps = int(spec.duration_s / 0.1)
    braked = _drive(name, 1, steps, policy=_ground_truth_aeb)
    assert not any(s.crashed for s in braked)
    assert min(world.gap_m(s) for s in braked) > 0.5
    coasting = _drive(name, 1, steps, policy=lambda sim, s, i: (0.0, 0.0))
    assert any(s.crashed for s in coasting)  # without braking it is a real crash


@pytest.mark.parametrize("name", ["cut-in", "merge"])
def test_interactive_subject_enters_ego_lane_and_is_avoidable(name: str) -> None:
    for seed in (0, 1, 2):
        sim = Simulator(parse_scenario(name), seed)
        snap = sim.reset()
        subject = sim._ids[id(sim._scene.subject)]
        entered = None
        for _ in range(int(8.0 / 0.1)):
            snap = sim.step(*sim.expert_action())
            lead = world.lead_vehicle(snap)
            if entered is None and lead is not None and lead.id == subject:
                entered = (snap.t_s, world.gap_m(snap))
        assert entered is not None, f"{name} seed {seed}: subject never entered the ego lane"
        assert 0.0 < entered[1] < 40.0  # tight: it lands close ahead
        assert not sim.crashed
        sim.close()


@pytest.mark.parametrize("name", ["highway", "dense"])
def test_traffic_does_not_rear_end_a_hard_braking_ego(name: str) -> None:
    def brake_hard(sim: Simulator, s: WorldSnapshot, i: int) -> tuple[float, float]:
        a, steer = sim.expert_action()
        return (-9.0 if 20 <= i < 80 else a), steer

    for seed in (0, 1, 2):
        snaps = _drive(name, seed, 160, policy=brake_hard)
        assert min(s.speed_mps for s in snaps) == 0.0
        assert not any(s.crashed for s in snaps), f"{name} seed {seed}"


def test_nominal_traffic_stays_around_the_ego() -> None:
    """Traffic that falls behind or pulls away is recycled, so a long drive keeps its density."""
    spec = parse_scenario("highway")
    snaps = _drive("highway", 0, 600)
    last = snaps[-1]
    assert last.ego.x_m - snaps[0].ego.x_m > 1000.0
    near = [v for v in last.others if -150.0 <= v.x_m - last.ego.x_m <= 260.0]
    assert len(near) == len(last.others) == spec.traffic_vehicles


def test_render_gives_a_real_frame() -> None:
    from driveloop.sim._vehicles import CRASHED_RGB, EGO_RGB, SUBJECT_RGB

    def pixels(frame: np.ndarray, rgb: tuple[int, int, int]) -> int:
        return int((frame == rgb).all(axis=-1).sum())

    sim = Simulator(parse_scenario("ccrs-50"), 0)
    sim.reset()
    frame = sim.render()
    assert frame.shape == (150, 600, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # not a black (or blank) frame
    assert pixels(frame, EGO_RGB) > 50 and pixels(frame, SUBJECT_RGB) > 50 and pixels(frame, CRASHED_RGB) == 0
    while not sim.crashed:
        sim.step(0.0, 0.0)
    crashed = sim.render()
    assert pixels(crashed, CRASHED_RGB) > 100 and pixels(crashed, EGO_RGB) == 0
    sim.close()


# -- world snapshot and ground-truth helpers --------------------------------------------------------------
def _snap(*others: VehicleState, ego_v: float = 20.0) -> WorldSnapshot:
    ego = VehicleState(0, 0.0, 0.0, ego_v, 0.0, 0.0)
    return WorldSnapshot(0.0, ego, ego_v, 0.0, 0.0, 0.0, 0.0, 25.0, 4.0, tuple(others))


def test_world_lead_gap_ttc() -> None:
    lead = VehicleState(1, 30.0, 0.5, 15.0, 0.0, 0.0)
    far = VehicleState(2, 60.0, 0.0, 15.0, 0.0, 0.0)
    left = VehicleState(3, 10.0, 4.0, 10.0, 0.0, 0.0)
    behind = VehicleState(4, -10.0, 0.0, 30.0, 0.0, 0.0)
    s = _snap(far, left, lead, behind)
    assert world.lead_vehicle(s) is lead
    assert world.gap_m(s) == pytest.approx(25.0)
    assert world.ttc_s(s) == pytest.approx(25.0 / 5.0)
    assert world.ttc_s(_snap(VehicleState(1, 30.0, 0.0, 25.0, 0.0, 0.0))) == math.inf  # opening
    assert world.gap_m(_snap(left, behind)) == math.inf and world.ttc_s(_snap()) == math.inf
    assert world.ttc_s(_snap(VehicleState(1, 4.0, 0.0, 0.0, 0.0, 0.0))) == 0.0  # contact


def test_world_ego_frame_follows_heading() -> None:
    ego = VehicleState(0, 0.0, 0.0, 0.0, 20.0, math.pi / 2)  # driving along +y
    s = WorldSnapshot(0.0, ego, 20.0, 0.0, 0.0, 0.0, 0.0, 20.0, 4.0, (VehicleState(1, 0.0, 30.0, 0.0, 10.0, 0.0),))
    assert world.to_ego_frame(ego, 0.0, 30.0) == pytest.approx((30.0, 0.0))
    assert world.gap_m(s) == pytest.approx(25.0) and world.ttc_s(s) == pytest.approx(2.5)


def test_snapshot_json_roundtrip() -> None:
    snap = _drive("dense", 0, 5)[-1]
    data = json.loads(json.dumps(snap.to_dict()))
    assert WorldSnapshot.from_dict(data) == snap
    with pytest.raises(SegmentError):
        WorldSnapshot.from_dict({**data, "ego": {"id": 0}})
    with pytest.raises(SegmentError):
        WorldSnapshot.from_dict({k: v for k, v in data.items() if k != "t_s"})
