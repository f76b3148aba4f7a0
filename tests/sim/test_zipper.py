"""The construction zone's zipper mergers: they turn in front of the ego only into a free gap, never into a car
beside them, and never in front of an ego that comes up faster than the scene's design (a car that stopped at
the closure lets it pass). Hand-built two-lane roads with fixed positions and speeds, dt 0.1 s, plus the seeded
scene driven by a tailgating ego that made the old mergers side-swipe its lead."""

from __future__ import annotations

import math

import numpy as np
import pytest
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle.kinematics import Vehicle

from driveloop.sim._vehicles import (
    ZIPPER_CLOSING_TIME_S,
    ZIPPER_MIN_GAP_M,
    ZIPPER_WINDOW_FRACTION,
    TrafficVehicle,
    ZipperMerger,
    merge_gap_free,
)
from driveloop.sim.simulator import Simulator
from driveloop.sim.world import closing_speed_mps, gap_m

DT_S = 0.1
OPEN, CLOSING = 1, 0  # lane ids: the ego's (open) lane and the closing one beside it
MERGER_X_M = 200.0
LENGTH_M = TrafficVehicle.LENGTH


def _road() -> Road:
    return Road(network=RoadNetwork.straight_road_network(lanes=2, length=2000.0), np_random=np.random.RandomState(0))


def _car(road: Road, lane_id: int, x_m: float, speed: float) -> Vehicle:
    """A car at constant speed (highway-env's kinematic vehicle: no IDM that would change the set-up)."""
    car = Vehicle(road, road.network.get_lane(("0", "1", lane_id)).position(x_m, 0.0), 0.0, speed)
    road.vehicles.append(car)
    return car


def _merger(road: Road, watch: Vehicle, speed: float = 15.0, gap_m_: float = 12.0,
            max_closing_mps: float = math.inf) -> ZipperMerger:
    lane = road.network.get_lane(("0", "1", CLOSING))
    merger = ZipperMerger(road, lane.position(MERGER_X_M, 0.0), 0.0, speed, into_lane_id=OPEN, watch=watch,
                          gap_m=gap_m_, max_closing_mps=max_closing_mps)
    merger.target_speed = speed
    road.vehicles.append(merger)
    return merger


def _bumper_gap(speed_closing: float) -> float:
    """The least free bumper-to-bumper gap for a closing speed (the rule, from its constants)."""
    return ZIPPER_MIN_GAP_M + ZIPPER_CLOSING_TIME_S * max(speed_closing, 0.0)


# -- merge_gap_free: a table of one other car in the target lane ----------------------------------------------------
GAPS = [
    # name, other car's centre x relative to the merger, its speed (the merger drives 15 m/s), free?
    ("level beside it", 0.0, 15.0, False),
    ("ahead, overlapping", LENGTH_M - 1.0, 15.0, False),
    ("ahead, same speed, just short of the margin", LENGTH_M + _bumper_gap(0.0) - 0.01, 15.0, False),
    ("ahead, same speed, at the margin", LENGTH_M + _bumper_gap(0.0) + 0.01, 15.0, True),
    ("ahead, slower: the margin grows", LENGTH_M + _bumper_gap(0.0) + 0.01, 13.0, False),
    ("ahead, slower, at its margin", LENGTH_M + _bumper_gap(2.0) + 0.01, 13.0, True),
    ("ahead, faster: no closing term", LENGTH_M + _bumper_gap(0.0) + 0.01, 20.0, True),
    ("behind, faster, short of its margin", -(LENGTH_M + _bumper_gap(3.0) - 0.01), 18.0, False),
    ("behind, faster, at its margin", -(LENGTH_M + _bumper_gap(3.0) + 0.01), 18.0, True),
    ("behind, slower", -(LENGTH_M + _bumper_gap(0.0) + 0.01), 10.0, True),
]


@pytest.mark.parametrize(("name", "dx", "speed", "free"), GAPS, ids=[g[0] for g in GAPS])
def test_merge_gap_free_table(name: str, dx: float, speed: float, free: bool) -> None:
    road = _road()
    ego = _car(road, OPEN, MERGER_X_M - 500.0, 20.0)  # the watched car, far away
    merger = _merger(road, ego)
    _car(road, OPEN, MERGER_X_M + dx, speed)
    assert merge_gap_free(merger, OPEN, ignore=ego) is free


def test_cars_in_other_lanes_and_the_ignored_one_do_not_block() -> None:
    road = _road()
    ego = _car(road, OPEN, MERGER_X_M - 1.0, 20.0)  # level with the merger, but the watched one
    merger = _merger(road, ego)
    _car(road, CLOSING, MERGER_X_M + 6.0, 0.0)  # the queue in its own lane
    assert merge_gap_free(merger, OPEN, ignore=ego)
    assert not merge_gap_free(merger, OPEN)  # not ignored: it is right beside the merger


# -- the merger's decision over time -------------------------------------------------------------------------------
def _run(road: Road, ticks: int) -> None:
    for _ in range(ticks):
        road.act()
        road.step(DT_S)


def test_a_merger_waits_beside_the_egos_lead_and_turns_in_once_the_gap_is_free() -> None:
    """The ego 10 m behind the merger (inside its trigger gap) and the ego's lead level with it: it waits; the
    lead pulls away at 3 m/s and the merger turns in as soon as the gap meets the rule, not before."""
    road = _road()
    merger_speed, lead_speed = 15.0, 18.0
    ego = _car(road, OPEN, MERGER_X_M - LENGTH_M - 10.0, merger_speed)
    lead = _car(road, OPEN, MERGER_X_M, lead_speed)
    merger = _merger(road, ego, merger_speed, gap_m_=12.0)
    for tick in range(60):
        gap = float(lead.position[0] - merger.position[0]) - LENGTH_M  # what the merger sees this tick
        _run(road, 1)
        if merger.started:
            break
    assert 0 < tick < 59
    assert _bumper_gap(0.0) <= gap < _bumper_gap(0.0) + (lead_speed - merger_speed) * DT_S  # the first free tick
    _run(road, 20)  # it moves over behind the lead (the constant-speed ego behind it does not brake: not judged)
    assert not lead.crashed and float(lead.position[0] - merger.position[0]) > LENGTH_M + _bumper_gap(0.0)


def test_with_the_lane_beside_it_free_it_turns_in_at_once() -> None:
    road = _road()
    ego = _car(road, OPEN, MERGER_X_M - LENGTH_M - 10.0, 15.0)
    merger = _merger(road, ego)
    _run(road, 1)
    assert merger.started


TRIGGER_M = 12.0
WINDOW = [  # the watched car's bumper gap behind the merger (lane beside it free), as a fraction of the trigger gap
    (1.01, False),  # not yet
    (1.0 - 1e-6, True),
    (ZIPPER_WINDOW_FRACTION + 1e-6, True),
    (ZIPPER_WINDOW_FRACTION - 1e-3, False),  # too close: it lets the car pass
    (0.1, False),
]


@pytest.mark.parametrize(("fraction", "turns_in"), WINDOW, ids=[f"{f:g}" for f, _ in WINDOW])
def test_a_merger_turns_in_only_inside_its_window_in_front_of_the_watched_car(fraction: float, turns_in: bool) -> None:
    road = _road()
    ego = _car(road, OPEN, MERGER_X_M - LENGTH_M - fraction * TRIGGER_M, 15.0)
    merger = _merger(road, ego, 15.0, gap_m_=TRIGGER_M)
    _run(road, 1)
    assert merger.started is turns_in


@pytest.mark.parametrize(("ego_speed", "turns_in"), [(15.0 + 6.0, True), (15.0 + 8.0, False)])
def test_a_merger_lets_an_ego_pass_that_closes_faster_than_the_design(ego_speed: float, turns_in: bool) -> None:
    road = _road()
    ego = _car(road, OPEN, MERGER_X_M - LENGTH_M - 10.0, ego_speed)
    merger = _merger(road, ego, 15.0, max_closing_mps=7.0)
    _run(road, 1)
    assert merger.started is turns_in


# -- the scene: a tailgating ego no longer makes the mergers side-swipe its lead ------------------------------------
@pytest.mark.parametrize("seed", [2, 3, 4, 11])  # the seeds where the old mergers side-swiped the ego's lead
def test_no_merger_hits_another_car_in_front_of_a_tailgating_ego(seed: int) -> None:
    """An ego that follows at 0.6 s (ground truth, no safety layer) through construction-12-20: no vehicle but
    the ego may crash while the ego is intact (the old mergers turned in level with its lead at ~15 s)."""
    with Simulator("construction-12-20", seed) as sim:
        snap = sim.reset()
        ego = sim._scene.ego
        while not sim.done and not snap.crashed:
            _, steer = sim.expert_action()
            gap = gap_m(snap)
            accel = 1.0 if math.isinf(gap) else 0.3 * (gap - (2.0 + 0.6 * snap.speed_mps)) - 0.8 * closing_speed_mps(snap)
            snap = sim.step(min(max(accel, -9.0), 2.0), steer)
            if not snap.crashed:
                assert not any(v.crashed for v in sim._scene.road.vehicles if v is not ego), (seed, snap.t_s)
        assert snap.t_s > 10.0  # the drive got past the first merge into the part where the swipes happened
