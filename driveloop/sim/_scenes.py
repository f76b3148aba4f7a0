"""Scene construction for each scenario kind (private to ``sim.simulator``): roads, ego, traffic, subjects.

Every random choice draws from the ``rng`` passed in (seeded by the simulator), so a scenario name plus a
seed rebuilds the same scene. Placement rules that keep scenes *avoidable*:

- traffic never starts closer than a 1.5 s time gap (+ jam distance) to the vehicle ahead in its lane,
  and never closer than 30 m behind the ego, so nobody rear-ends a braking ego at the start;
- cut-in / merge subjects end up 12–25 m ahead of the ego, 2–5 m/s slower: a 9 m/s² brake with a
  0.25 s lag stops the closing within a few metres;
- CCR targets start at Euro NCAP's TTC of 4 s (≥10 m) or at the CCRb headway;
- a parametric cut-in (``cutin-*``) is exact, without traffic or jitter (the seed only picks the side it comes
  from), so its ground truth follows from the spec (``scenarios.cut_in_plan``): whether it is avoidable is
  judged by ``sim.truth``, not promised here.
Positions here are in highway-env's frame (x along the road, y down).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from highway_env.road.lane import LineType, SineLane, StraightLane
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle.kinematics import Vehicle

from driveloop.sim._vehicles import (
    EgoVehicle,
    LaneChanger,
    ScriptedCutIn,
    ScriptedTarget,
    TrafficVehicle,
    ZipperMerger,
)
from driveloop.sim.scenarios import JAM_TAIL_X_M, LANE_WIDTH_M, ScenarioSpec, cut_in_plan

SPEED_LIMIT_MPS = 40.0
STRAIGHT_ROAD_M = 30_000.0  # 12.5 min at the 40 m/s top speed; traffic is recycled around the ego
EGO_START_X_M = 200.0
JAM_GAP_M = 10.0
TIME_GAP_S = 1.5
BEHIND_EGO_MIN_M = 30.0
# Traffic recycling window around the ego (nominal scenes): keeps the density constant forever.
RECYCLE_BEHIND_M = -150.0
RECYCLE_AHEAD_M = 260.0
RECYCLE_MIN_EGO_SPEED_MPS = 8.0


@dataclass
class Scene:
    """A built scene: the road (with all vehicles), the ego, and whether traffic is recycled."""

    road: Road
    ego: EgoVehicle
    recycle: bool = False
    subject: Vehicle | None = None
    meta: dict[str, float] = field(default_factory=dict)


def _straight_network(lanes: int, length_m: float = STRAIGHT_ROAD_M) -> RoadNetwork:
    return RoadNetwork.straight_road_network(lanes=lanes, length=length_m, speed_limit=SPEED_LIMIT_MPS)


def _merge_network() -> RoadNetwork:
    """2-lane highway with an on-ramp joining lane 1 over a 80 m merge lane (after highway-env's merge)."""
    net = RoadNetwork()
    ends = [230.0, 80.0, 80.0, STRAIGHT_ROAD_M]  # ramp straight, converging, merge lane, after
    c, s, n = LineType.CONTINUOUS_LINE, LineType.STRIPED, LineType.NONE
    width = StraightLane.DEFAULT_WIDTH
    x_b, x_c = ends[0] + ends[1], ends[0] + ends[1] + ends[2]
    line_types = [[c, s], [n, c]]
    line_types_merge = [[c, s], [n, s]]
    for i in range(2):
        y = i * width
        kw = {"speed_limit": SPEED_LIMIT_MPS}
        net.add_lane("a", "b", StraightLane([0, y], [x_b, y], line_types=line_types[i], **kw))
        net.add_lane("b", "c", StraightLane([x_b, y], [x_c, y], line_types=line_types_merge[i], **kw))
        net.add_lane("c", "d", StraightLane([x_c, y], [x_c + ends[3], y], line_types=line_types[i], **kw))
    amplitude = 3.25
    ljk = StraightLane([0, 6.5 + 2 * width], [ends[0], 6.5 + 2 * width], line_types=[c, c], forbidden=True,
                       speed_limit=SPEED_LIMIT_MPS)
    lkb = SineLane(ljk.position(ends[0], -amplitude), ljk.position(ends[0] + ends[1], -amplitude), amplitude,
                   2 * np.pi / (2 * ends[1]), np.pi / 2, line_types=[c, c], forbidden=True,
                   speed_limit=SPEED_LIMIT_MPS)
    lbc = StraightLane(lkb.position(ends[1], 0), lkb.position(ends[1], 0) + [ends[2], 0], line_types=[n, c],
                       forbidden=True, speed_limit=SPEED_LIMIT_MPS)
    net.add_lane("j", "k", ljk)
    net.add_lane("k", "b", lkb)
    net.add_lane("b", "c", lbc)
    return net


def _ego(road: Road, lane_index: tuple[str, str, int], x_m: float, speed: float, spec: ScenarioSpec,
         lag_s: float, max_speed_mps: float) -> EgoVehicle:
    lane = road.network.get_lane(lane_index)
    ego = EgoVehicle(road, lane.position(x_m, 0.0), lane.heading_at(x_m), speed, set_speed_mps=spec.set_speed_mps,
                     lag_s=lag_s, max_speed_mps=max_speed_mps)
    road.vehicles.append(ego)
    return ego


def _clear(road: Road, lane_id: int, x_m: float, speed: float, ego: EgoVehicle) -> bool:
    """No vehicle in the lane within the time-gap spacing of (x, speed), and not just behind the ego."""
    for v in road.vehicles:
        lanes = {int(v.lane_index[2]), int(getattr(v, "target_lane_index", v.lane_index)[2])}
        if lane_id not in lanes:  # a vehicle changing lanes blocks both
            continue
        dx = x_m - float(v.position[0])
        needed = JAM_GAP_M + TIME_GAP_S * max(speed, v.speed) + 5.0
        if v is ego and -BEHIND_EGO_MIN_M - TIME_GAP_S * speed < dx < needed:
            return False
        if abs(dx) < needed:
            return False
    return True


def _place_traffic(road: Road, ego: EgoVehicle, rng: np.random.Generator, count: int, lanes: list[int],
                   mean_speed: float, spread: float, x_range: tuple[float, float], tries: int = 60) -> int:
    """Place up to ``count`` IDM/MOBIL vehicles at clear spots; returns how many were placed."""
    placed = 0
    for _ in range(count):
        for _ in range(tries):
            lane_id = int(lanes[int(rng.integers(len(lanes)))])
            x = float(ego.position[0] + rng.uniform(*x_range))
            speed = float(np.clip(mean_speed + rng.uniform(-spread, spread), 5.0, SPEED_LIMIT_MPS))
            if _clear(road, lane_id, x, speed, ego):
                lane_index = road.network.get_closest_lane_index(np.array([x, lane_id * StraightLane.DEFAULT_WIDTH]))
                lane = road.network.get_lane((lane_index[0], lane_index[1], lane_id))
                s = lane.local_coordinates(np.array([x, 0.0]))[0]
                v = TrafficVehicle(road, lane.position(s, 0.0), lane.heading_at(s), speed, target_speed=speed)
                road.vehicles.append(v)
                placed += 1
                break
    return placed


def build_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                max_speed_mps: float) -> Scene:
    """Build the scene for ``spec``; all randomness from ``rng`` (ours) and ``road_rng`` (highway-env's)."""
    return _BUILDERS[spec.kind](spec, rng, road_rng, lag_s, max_speed_mps)


def _nominal_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                   max_speed_mps: float) -> Scene:
    road = Road(network=_straight_network(spec.lanes), np_random=road_rng)
    lane_id = int(rng.integers(spec.lanes))
    speed = spec.ego_speed_mps + float(rng.uniform(-2.0, 2.0))
    ego = _ego(road, ("0", "1", lane_id), EGO_START_X_M, speed, spec, lag_s, max_speed_mps)
    spread = 3.0 if spec.kind == "highway" else 2.0
    span = (-110.0, 200.0) if spec.kind == "highway" else (-80.0, 140.0)
    _place_traffic(road, ego, rng, spec.traffic_vehicles, list(range(spec.lanes)), spec.target_speed_mps, spread,
                   span)
    return Scene(road=road, ego=ego, recycle=True)


def _cut_in_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                  max_speed_mps: float) -> Scene:
    road = Road(network=_straight_network(spec.lanes), np_random=road_rng)
    ego_lane = 1
    speed = spec.ego_speed_mps + float(rng.uniform(-2.0, 2.0))
    ego = _ego(road, ("0", "1", ego_lane), EGO_START_X_M, speed, spec, lag_s, max_speed_mps)
    from_lane = int(rng.choice([0, 2]))
    (dv_lo, dv_hi), (gap_lo, gap_hi) = _cut_in_bounds(spec)
    dv = float(rng.uniform(dv_lo, dv_hi))
    final_gap = float(rng.uniform(gap_lo, gap_hi))
    trigger_s = float(rng.uniform(1.0, 2.5))
    x = float(ego.position[0]) + ego.LENGTH + final_gap + dv * trigger_s
    lane = road.network.get_lane(("0", "1", from_lane))
    cutter = LaneChanger(road, lane.position(x, 0.0), 0.0, speed - dv, into_lane_id=ego_lane, at_time_s=trigger_s)
    cutter.target_speed = speed - dv
    road.vehicles.append(cutter)
    other_lanes = [i for i in range(spec.lanes) if i != from_lane]
    _place_traffic(road, ego, rng, spec.traffic_vehicles, other_lanes, spec.target_speed_mps, 2.0, (-90.0, 160.0))
    return Scene(road=road, ego=ego, subject=cutter,
                 meta={"dv_mps": dv, "final_gap_m": final_gap, "trigger_s": trigger_s, "from_lane": from_lane})


# An aggressive cut-in's relative speed and gap are its spec's, each jittered by this fraction (seeded).
AGGRESSIVE_JITTER = 0.15


def _cut_in_bounds(spec: ScenarioSpec) -> tuple[tuple[float, float], tuple[float, float]]:
    """(relative speed m/s, final gap m) ranges the cutter draws from: ``cut-in``'s fixed ones, or around an
    ``aggressive`` spec's own."""
    if spec.kind != "aggressive":
        return (2.0, 5.0), (12.0, 25.0)
    dv, gap = spec.ego_speed_mps - spec.target_speed_mps, spec.headway_m
    lo, hi = 1.0 - AGGRESSIVE_JITTER, 1.0 + AGGRESSIVE_JITTER
    return (dv * lo, dv * hi), (gap * lo, gap * hi)


# Construction: where the closed lane's traffic starts ahead of the ego, how much slower each next one is
# (a queue slowing into the work zone), and where the row of stopped vehicles closing the lane begins.
CONSTRUCTION_MERGERS_AHEAD_M = (35.0, 95.0, 155.0)
CONSTRUCTION_SLOWER_EACH = 0.5  # merger k drives dv x (1 + k x this) slower than the ego's start speed
# A merger turns in only while the ego closes on it at most as fast as it would on the queue's slowest car
# (dv x (1 + 2 x 0.5) = 2 dv) + this (the ego's start-speed jitter): a car that stopped at the closure lets
# the ego pass instead of turning in front of it at the ego's full speed.
CONSTRUCTION_CLOSING_MARGIN_MPS = 1.0
CONSTRUCTION_CLOSURE_AHEAD_M = 420.0
CONSTRUCTION_CLOSURE_VEHICLES = 5
CONSTRUCTION_CLOSURE_SPACING_M = 9.0
CONSTRUCTION_MIN_SPEED_MPS = 5.0


def _construction_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState,
                        lag_s: float, max_speed_mps: float) -> Scene:
    """Two lanes, the ego in lane 1; lane 0 is closed ahead by stopped vehicles and its traffic, a queue slowing
    into the work zone (car k ``dv`` x (1 + ``CONSTRUCTION_SLOWER_EACH`` k) slower than the ego's set speed, so
    an ego behind car k - 1 meets car k at half ``dv``, an ego with nobody ahead at up to 2 ``dv``), merges into
    the ego's lane ``headway_m`` (jittered; at least ``ZIPPER_WINDOW_FRACTION`` of it) ahead of the ego as it
    comes up behind each car (zipper, ``ZipperMerger``): into a free gap only, and only while the ego closes on it
    no faster than on the queue's slowest car + ``CONSTRUCTION_CLOSING_MARGIN_MPS``. A car that cannot go then
    lets the ego pass (one that stopped at the closure, one whose neighbour in the open lane is level with it)."""
    road = Road(network=_straight_network(spec.lanes), np_random=road_rng)
    ego_lane, closed_lane = 1, 0
    speed = spec.ego_speed_mps + float(rng.uniform(-1.0, 1.0))
    ego = _ego(road, ("0", "1", ego_lane), EGO_START_X_M, speed, spec, lag_s, max_speed_mps)
    lane = road.network.get_lane(("0", "1", closed_lane))
    dv = spec.ego_speed_mps - spec.target_speed_mps
    speeds = [max(spec.ego_speed_mps - dv * (1.0 + CONSTRUCTION_SLOWER_EACH * k), CONSTRUCTION_MIN_SPEED_MPS)
              for k in range(len(CONSTRUCTION_MERGERS_AHEAD_M))]
    max_closing = spec.ego_speed_mps - min(speeds) + CONSTRUCTION_CLOSING_MARGIN_MPS
    mergers: list[float] = []
    for ahead, v in zip(CONSTRUCTION_MERGERS_AHEAD_M, speeds):
        x = float(ego.position[0]) + ahead + float(rng.uniform(-5.0, 5.0))
        gap = spec.headway_m * float(rng.uniform(0.85, 1.15))
        merger = ZipperMerger(road, lane.position(x, 0.0), 0.0, v, into_lane_id=ego_lane, watch=ego, gap_m=gap,
                              max_closing_mps=max_closing)
        merger.target_speed = v
        road.vehicles.append(merger)
        mergers.append(gap)
    start = float(ego.position[0]) + CONSTRUCTION_CLOSURE_AHEAD_M
    for i in range(CONSTRUCTION_CLOSURE_VEHICLES):
        road.vehicles.append(ScriptedTarget(road, lane.position(start + i * CONSTRUCTION_CLOSURE_SPACING_M, 0.0),
                                            0.0, 0.0))
    return Scene(road=road, ego=ego, meta={"dv_mps": dv, "merge_gaps_m": float(np.mean(mergers)),
                                           "closure_x_m": start})


def _fog_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
               max_speed_mps: float) -> Scene:
    """Nominal traffic, slower than the ego wants to go: it keeps coming up behind cars it sees only within
    the fog's visibility (the sensors apply it: ``scenarios.fog_sensor_degradation``)."""
    road = Road(network=_straight_network(spec.lanes), np_random=road_rng)
    lane_id = int(rng.integers(spec.lanes))
    speed = spec.ego_speed_mps + float(rng.uniform(-1.0, 1.0))
    ego = _ego(road, ("0", "1", lane_id), EGO_START_X_M, speed, spec, lag_s, max_speed_mps)
    _place_traffic(road, ego, rng, spec.traffic_vehicles, list(range(spec.lanes)), spec.target_speed_mps, 2.0,
                   (60.0, 240.0))
    return Scene(road=road, ego=ego, recycle=True)


def _slippery_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                    max_speed_mps: float) -> Scene:
    """A lead ``headway_m`` ahead brakes to a stop at ``target_decel_mps2`` (within the road's friction) after
    1.5-3.5 s, traffic in the other lanes; everybody's braking is limited to friction x g."""
    road = Road(network=_straight_network(spec.lanes), np_random=road_rng)
    ego = _ego(road, ("0", "1", 1), EGO_START_X_M, spec.ego_speed_mps, spec, lag_s, max_speed_mps)
    lane = road.network.get_lane(("0", "1", 1))
    gap = spec.headway_m * float(rng.uniform(0.9, 1.1))
    brake_at_s = float(rng.uniform(1.5, 3.5))
    x = float(ego.position[0]) + Vehicle.LENGTH + gap
    lead = ScriptedTarget(road, lane.position(x, 0.0), 0.0, spec.target_speed_mps, decel_mps2=spec.target_decel_mps2,
                          brake_at_s=brake_at_s)
    road.vehicles.append(lead)
    _place_traffic(road, ego, rng, spec.traffic_vehicles, [0, 2], spec.target_speed_mps, 2.0, (-60.0, 120.0))
    for v in road.vehicles:
        if isinstance(v, TrafficVehicle):
            v.ACC_MAX = min(v.ACC_MAX, spec.max_decel_mps2)  # the road limits everybody's braking
    return Scene(road=road, ego=ego, subject=lead, meta={"gap_m": gap, "brake_at_s": brake_at_s})


# The jam: this many stopped cars per lane, centre to centre (a queue at standstill), from the tail on.
JAM_CARS_PER_LANE = 2
JAM_SPACING_M = 8.0
JAM_ROAD_M = JAM_TAIL_X_M + 1000.0


def _jam_tail_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                    max_speed_mps: float) -> Scene:
    """Stopped traffic in every lane whose tail stands at ``JAM_TAIL_X_M`` (road coordinates shared by the fleet);
    the ego comes at its speed from ``headway_m`` before it in the middle lane, nothing else on the road. The
    seed only jitters the queue a little (the tail stays exact in the ego's lane)."""
    road = Road(network=_straight_network(spec.lanes, length_m=JAM_ROAD_M), np_random=road_rng)
    ego_lane = spec.lanes // 2
    ego = _ego(road, ("0", "1", ego_lane), JAM_TAIL_X_M - spec.headway_m - Vehicle.LENGTH / 2, spec.ego_speed_mps,
               spec, lag_s, max_speed_mps)
    for lane_id in range(spec.lanes):
        lane = road.network.get_lane(("0", "1", lane_id))
        x = JAM_TAIL_X_M + Vehicle.LENGTH / 2 + (0.0 if lane_id == ego_lane else float(rng.uniform(0.0, 6.0)))
        for _ in range(JAM_CARS_PER_LANE):
            road.vehicles.append(ScriptedTarget(road, lane.position(x, 0.0), 0.0, spec.target_speed_mps))
            x += JAM_SPACING_M + float(rng.uniform(0.0, 2.0))
    return Scene(road=road, ego=ego, meta={"tail_x_m": JAM_TAIL_X_M, "start_gap_m": spec.headway_m})


def _merge_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
                 max_speed_mps: float) -> Scene:
    road = Road(network=_merge_network(), np_random=road_rng)
    speed = spec.ego_speed_mps + float(rng.uniform(-2.0, 2.0))
    dv = float(rng.uniform(2.0, 5.0))
    gap = float(rng.uniform(12.0, 25.0))
    t_arrive_s = float(rng.uniform(5.0, 7.0))  # when the merger reaches the merge lane
    merge_start_x = 310.0
    ego_x = merge_start_x - gap - Vehicle.LENGTH - speed * t_arrive_s
    ego = _ego(road, ("a", "b", 1), max(ego_x, 5.0), speed, spec, lag_s, max_speed_mps)
    ramp = road.network.get_lane(("j", "k", 0))
    ramp_len = ramp.length + road.network.get_lane(("k", "b", 0)).length
    s0 = max(ramp_len - (speed - dv) * t_arrive_s, 0.0)
    merger = LaneChanger(road, ramp.position(s0, 0.0), 0.0, speed - dv, into_lane_id=1, at_segment=("b", "c"))
    merger.target_speed = speed - dv
    road.vehicles.append(merger)
    _place_traffic(road, ego, rng, spec.traffic_vehicles, [0], spec.target_speed_mps, 2.0, (-60.0, 160.0))
    return Scene(road=road, ego=ego, subject=merger, meta={"dv_mps": dv, "gap_m": gap, "t_arrive_s": t_arrive_s})


def _ccr_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState, lag_s: float,
               max_speed_mps: float) -> Scene:
    road = Road(network=_straight_network(spec.lanes, length_m=4000.0), np_random=road_rng)
    ego = _ego(road, ("0", "1", 1), EGO_START_X_M, spec.ego_speed_mps, spec, lag_s, max_speed_mps)
    if spec.kind == "ccrb":
        gap = spec.headway_m + float(rng.uniform(-0.5, 0.5))
        brake_at_s = float(rng.uniform(1.0, 2.0))
    else:
        gap = spec.headway_m * float(rng.uniform(0.97, 1.03))
        brake_at_s = float("inf")
    lane = road.network.get_lane(("0", "1", 1))
    x = float(ego.position[0]) + Vehicle.LENGTH + gap
    target = ScriptedTarget(road, lane.position(x, 0.0), 0.0, spec.target_speed_mps,
                            decel_mps2=spec.target_decel_mps2, brake_at_s=brake_at_s)
    road.vehicles.append(target)
    return Scene(road=road, ego=ego, subject=target, meta={"gap_m": gap, "brake_at_s": brake_at_s})


def _parametric_cut_in_scene(spec: ScenarioSpec, rng: np.random.Generator, road_rng: np.random.RandomState,
                              lag_s: float, max_speed_mps: float) -> Scene:
    assert StraightLane.DEFAULT_WIDTH == LANE_WIDTH_M, "cut_in_plan assumes highway-env's lane width"
    plan = cut_in_plan(spec)
    road = Road(network=_straight_network(spec.lanes, length_m=4000.0), np_random=road_rng)
    ego = _ego(road, ("0", "1", 1), EGO_START_X_M, plan.ego_speed_mps, spec, lag_s, max_speed_mps)
    side = int(rng.choice([-1, 1]))  # the lane it comes from: one lane up or down (highway-env frame)
    x = float(ego.position[0]) + Vehicle.LENGTH + plan.start_gap_m
    start = np.array([x, float(ego.position[1]) + side * plan.start_offset_m])
    cutter = ScriptedCutIn(road, start, plan.cutter_speed_mps, target_y_m=float(ego.position[1]),
                           lateral_speed_mps=plan.lateral_speed_mps, start_s=plan.start_s)
    road.vehicles.append(cutter)
    return Scene(road=road, ego=ego, subject=cutter,
                 meta={"side": side, "crossing_s": plan.crossing_s, "start_gap_m": plan.start_gap_m})


_SceneBuilder = Callable[[ScenarioSpec, np.random.Generator, np.random.RandomState, float, float], Scene]
# Scenario kind -> scene builder (a table: a new kind is one row).
_BUILDERS: dict[str, _SceneBuilder] = {
    "highway": _nominal_scene, "dense": _nominal_scene, "cut-in": _cut_in_scene, "merge": _merge_scene,
    "ccrs": _ccr_scene, "ccrm": _ccr_scene, "ccrb": _ccr_scene, "cutin": _parametric_cut_in_scene,
    "construction": _construction_scene, "fog": _fog_scene, "slippery": _slippery_scene, "aggressive": _cut_in_scene,
    "jam-tail": _jam_tail_scene,
}


def recycle_traffic(scene: Scene, rng: np.random.Generator) -> int:
    """Move traffic that left the window around the ego back into it (nominal scenes); returns moves."""
    ego = scene.ego
    moved = 0
    if ego.speed < RECYCLE_MIN_EGO_SPEED_MPS:  # a stopped ego has no traffic flow to keep up
        return 0
    lanes = len(scene.road.network.graph["0"]["1"])
    for v in scene.road.vehicles:
        if v is ego or not isinstance(v, TrafficVehicle) or v.crashed:
            continue
        dx = float(v.position[0] - ego.position[0])
        if RECYCLE_BEHIND_M <= dx <= RECYCLE_AHEAD_M:
            continue
        span = (RECYCLE_AHEAD_M - 80.0, RECYCLE_AHEAD_M - 20.0) if dx < 0 else (-130.0, -90.0)
        speed = float(v.speed) if dx < 0 else min(float(v.speed), ego.speed + 2.0)
        for _ in range(20):
            lane_id = int(rng.integers(lanes))
            x = float(ego.position[0] + rng.uniform(*span))
            if _clear_except(scene.road, v, lane_id, x, speed, ego):
                lane = scene.road.network.get_lane(("0", "1", lane_id))
                v.position = lane.position(x, 0.0)
                v.heading = lane.heading_at(x)
                v.speed = speed
                v.target_lane_index = v.lane_index = ("0", "1", lane_id)
                v.lane = lane
                moved += 1
                break
    return moved


def _clear_except(road: Road, moving: Vehicle, lane_id: int, x_m: float, speed: float, ego: EgoVehicle) -> bool:
    vehicles, road.vehicles = road.vehicles, [v for v in road.vehicles if v is not moving]
    try:
        return _clear(road, lane_id, x_m, speed, ego)
    finally:
        road.vehicles = vehicles
