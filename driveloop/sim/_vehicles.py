"""highway-env vehicle classes of the driveloop simulator (private to ``sim.simulator``).

- :class:`EgoVehicle` is driven by commands (acceleration, steering) through a first-order actuator
  lag, with speed held in [0, max] (no reversing). It also exposes the IDM + lane-keeping *expert*
  used for behaviour cloning. The ego never changes lane on its own: hazards come from others.
- :class:`TrafficVehicle` is highway-env's IDM/MOBIL with a realistic braking capability (highway-env
  clips IDM symmetrically at 6 m/s², too weak to follow an ego that brakes at 9 m/s²).
- :class:`LaneChanger` is traffic that changes into a given lane at a given time (cut-in) or when it
  reaches a given road segment (merge), without asking MOBIL.
- :class:`ZipperMerger` is a construction zone's merger: it turns in front of the watched ego, into a free gap
  only (:func:`merge_gap_free`).
- :class:`ScriptedTarget` is a Euro NCAP CCR target: constant speed, optionally braking at a fixed
  deceleration from a given time until standstill; it ignores everything around it.
- :class:`ScriptedCutIn` is the parametric cut-in's subject: constant speed along the road, and from a given
  time a constant sideways speed until it is centred in the target lane (heading held along the road, so
  its box and its reported velocity are exactly the scripted motion the ground-truth check assumes).

All classes work in highway-env's frame (y down); ``sim.simulator`` converts at the boundary.
"""

from __future__ import annotations

import math

import numpy as np
from highway_env.road.road import LaneIndex, Road
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

CONTROL_STEP_S = 0.1  # a scripted vehicle's first step (later steps pass their own dt)
# Traffic braking: a healthy car brakes at ~9 m/s² on dry asphalt.
TRAFFIC_MAX_DECEL_MPS2 = 9.0
TRAFFIC_MAX_ACCEL_MPS2 = 3.0
# Render colours (RGB): the ego green, a scenario's subject (cut-in, merger, CCR target) yellow,
# background traffic highway-env's blue, anything crashed red.
EGO_RGB = (50, 200, 0)
SUBJECT_RGB = (200, 200, 0)
CRASHED_RGB = (255, 100, 100)


def clamp_speed_accel(speed_mps: float, accel_mps2: float, dt_s: float, max_speed_mps: float) -> float:
    """The acceleration that keeps speed within [0, max] over dt (no reversing, no overspeed)."""
    if speed_mps + accel_mps2 * dt_s < 0.0:
        return -speed_mps / dt_s
    if speed_mps + accel_mps2 * dt_s > max_speed_mps:
        return (max_speed_mps - speed_mps) / dt_s
    return accel_mps2


class TrafficVehicle(IDMVehicle):
    """IDM/MOBIL traffic that can brake as hard as a real car and never reverses."""

    ACC_MAX = TRAFFIC_MAX_DECEL_MPS2  # the IDM clip is symmetric; the upper side is re-clipped below
    TIME_WANTED = 1.5
    MIN_SPEED = 0.0

    def act(self, action: dict | str | None = None) -> None:
        super().act()
        if not self.crashed:
            self.action["acceleration"] = min(float(self.action["acceleration"]), TRAFFIC_MAX_ACCEL_MPS2)

    def step(self, dt: float) -> None:
        if not self.crashed:
            self.action["acceleration"] = clamp_speed_accel(
                self.speed, float(self.action["acceleration"]), dt, self.MAX_SPEED
            )
        super().step(dt)
        self.speed = max(self.speed, 0.0)


class LaneChanger(TrafficVehicle):
    """Traffic forced into ``into_lane`` (same road segment) at ``at_time_s`` or on reaching ``at_segment``."""

    def __init__(
        self,
        road: Road,
        position: np.ndarray,
        heading: float,
        speed: float,
        *,
        into_lane_id: int,
        at_time_s: float | None = None,
        at_segment: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(road, position, heading, speed, enable_lane_change=False)
        self.into_lane_id = into_lane_id
        self.at_time_s = at_time_s
        self.at_segment = at_segment
        self.elapsed_s = 0.0
        self.started = False

    @property
    def color(self) -> tuple[int, int, int]:
        return CRASHED_RGB if self.crashed else SUBJECT_RGB

    def act(self, action: dict | str | None = None) -> None:
        if not self.started and not self.crashed:
            due_time = self.at_time_s is not None and self.elapsed_s >= self.at_time_s
            due_place = self.at_segment is not None and tuple(self.lane_index[:2]) == self.at_segment
            if due_time or due_place:
                self.target_lane_index = (self.lane_index[0], self.lane_index[1], self.into_lane_id)
                self.started = True
        super().act()

    def follow_road(self) -> None:
        # Once committed, keep the chosen lane id on the following road segments too.
        super().follow_road()
        if self.started and self.target_lane_index[2] != self.into_lane_id:
            lanes = self.road.network.graph[self.target_lane_index[0]][self.target_lane_index[1]]
            if self.into_lane_id < len(lanes):
                self.target_lane_index = (*self.target_lane_index[:2], self.into_lane_id)

    def step(self, dt: float) -> None:
        self.elapsed_s += dt
        super().step(dt)


class ScriptedTarget(Vehicle):
    """A CCR target: holds ``speed``; brakes at ``decel_mps2`` from ``brake_at_s`` to standstill."""

    MIN_SPEED = 0.0

    def __init__(
        self,
        road: Road,
        position: np.ndarray,
        heading: float,
        speed: float,
        *,
        decel_mps2: float = 0.0,
        brake_at_s: float = math.inf,
    ) -> None:
        super().__init__(road, position, heading, speed)
        self.decel_mps2 = decel_mps2
        self.brake_at_s = brake_at_s
        self.elapsed_s = 0.0

    @property
    def color(self) -> tuple[int, int, int]:
        return CRASHED_RGB if self.crashed else SUBJECT_RGB

    def act(self, action: dict | str | None = None) -> None:
        braking = self.elapsed_s >= self.brake_at_s and self.decel_mps2 > 0
        self.action = {"steering": 0.0, "acceleration": -self.decel_mps2 if braking else 0.0}

    def step(self, dt: float) -> None:
        self.elapsed_s += dt
        self.action["acceleration"] = clamp_speed_accel(self.speed, self.action["acceleration"], dt, self.MAX_SPEED)
        super().step(dt)
        self.speed = max(self.speed, 0.0)


class ScriptedCutIn(Vehicle):
    """A cut-in subject: ``speed`` along the road; from ``start_s`` it moves sideways at ``lateral_speed_mps``
    until its centre reaches ``target_y_m`` (highway-env frame), then holds that lane.

    ``velocity`` is the motion over the coming step (x along the road, y sideways), so sensors, collision
    prediction and the ground truth all see the same lateral speed from the tick the manoeuvre starts.
    """

    MIN_SPEED = 0.0

    def __init__(self, road: Road, position: np.ndarray, speed: float, *, target_y_m: float,
                 lateral_speed_mps: float, start_s: float) -> None:
        super().__init__(road, position, 0.0, speed)
        self.target_y_m = float(target_y_m)
        self.lateral_speed_mps = float(lateral_speed_mps)
        self.start_s = float(start_s)
        self.elapsed_s = 0.0
        self.lateral_mps = self._lateral_for_next_step(CONTROL_STEP_S)

    @property
    def color(self) -> tuple[int, int, int]:
        return CRASHED_RGB if self.crashed else SUBJECT_RGB

    @property
    def velocity(self) -> np.ndarray:
        return np.array([self.speed, self.lateral_mps])

    def _lateral_for_next_step(self, dt: float) -> float:
        if self.crashed or self.elapsed_s < self.start_s - 1e-9:
            return 0.0
        left = self.target_y_m - float(self.position[1])
        return math.copysign(min(self.lateral_speed_mps, abs(left) / dt), left) if abs(left) > 1e-9 else 0.0

    def act(self, action: dict | str | None = None) -> None:
        self.action = {"steering": 0.0, "acceleration": 0.0}

    def step(self, dt: float) -> None:
        self.position = self.position + np.array([self.speed * dt, self.lateral_mps * dt])
        if self.impact is not None:
            self.position = self.position + self.impact
            self.crashed = True
            self.impact = None
        if self.crashed:
            self.speed = max(self.speed - TRAFFIC_MAX_DECEL_MPS2 * dt, 0.0)
        self.elapsed_s += dt
        self.lateral_mps = self._lateral_for_next_step(dt)
        self.on_state_update()


class EgoVehicle(IDMVehicle):
    """The vehicle under test: commanded acceleration/steering, first-order actuator lag, no reversing.

    ``command(accel, steering)`` sets the *commanded* values; each integration step moves the applied
    acceleration towards the command with time constant ``lag_s`` (exact exponential update), so a
    step to -8 m/s² reaches 63 % after one time constant. Steering is applied directly.
    ``expert_action()`` is IDM on the current lane + lane keeping on the ego's own lane id.
    """

    TIME_WANTED = 1.5
    MIN_SPEED = 0.0

    def __init__(
        self,
        road: Road,
        position: np.ndarray,
        heading: float,
        speed: float,
        *,
        set_speed_mps: float,
        lag_s: float,
        max_speed_mps: float,
    ) -> None:
        super().__init__(road, position, heading, speed, target_speed=set_speed_mps, enable_lane_change=False)
        self.lag_s = lag_s
        self.max_speed_mps = max_speed_mps
        self.set_speed_mps = set_speed_mps
        self.accel_cmd_mps2 = 0.0
        self.steering_cmd_rad = 0.0  # highway-env frame (+ to the right)
        self.applied_accel_mps2 = 0.0  # actuator state (brake pressure / drive torque) after the lag
        self.accel_mps2 = 0.0  # acceleration the body actually felt (0 when held at standstill)
        self.lane_id = int(self.lane_index[2]) if self.lane_index else 0

    @property
    def color(self) -> tuple[int, int, int]:
        return CRASHED_RGB if self.crashed else EGO_RGB

    def command(self, accel_mps2: float, steering_rad_hw: float) -> None:
        self.accel_cmd_mps2 = float(accel_mps2)
        self.steering_cmd_rad = float(steering_rad_hw)

    def own_lane_index(self) -> LaneIndex:
        """The ego's lane id on its current road segment (it never changes lane by itself)."""
        _from, _to, _ = self.lane_index
        lanes = self.road.network.graph[_from][_to]
        return (_from, _to, min(self.lane_id, len(lanes) - 1))

    def act(self, action: dict | str | None = None) -> None:
        # Commands are held between control ticks; road.act() must not overwrite them with IDM.
        return None

    def step(self, dt: float) -> None:
        if self.crashed:
            self.applied_accel_mps2 = 0.0
            speed_before = self.speed
            super().step(dt)
            self.speed = max(self.speed, 0.0)
            self.accel_mps2 = (self.speed - speed_before) / dt
            return
        if self.lag_s > 0:
            alpha = 1.0 - math.exp(-dt / self.lag_s)
            self.applied_accel_mps2 += (self.accel_cmd_mps2 - self.applied_accel_mps2) * alpha
        else:
            self.applied_accel_mps2 = self.accel_cmd_mps2
        accel = clamp_speed_accel(self.speed, self.applied_accel_mps2, dt, self.max_speed_mps)
        self.action = {"acceleration": accel, "steering": self.steering_cmd_rad}
        self.accel_mps2 = accel
        self.timer += dt
        Vehicle.step(self, dt)
        self.speed = min(max(self.speed, 0.0), self.max_speed_mps)

    def expert(self, accel_range_mps2: tuple[float, float], max_steer_rad: float) -> tuple[float, float]:
        """IDM acceleration to the lead in the ego lane + lane keeping; steering in highway-env frame."""
        lane = self.own_lane_index()
        front, rear = self.road.neighbour_vehicles(self, lane)
        accel = float(self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear))
        accel = float(np.clip(accel, *accel_range_mps2))
        steer = float(np.clip(self.steering_control(lane), -max_steer_rad, max_steer_rad))
        return accel, steer


class ZipperMerger(LaneChanger):
    """Traffic in a closing lane (construction): it moves into ``into_lane_id`` once the vehicle it watches
    (the ego, coming up from behind) is ``gap_m`` or less behind it, bumper to bumper, and only into a free gap.

    A real zipper merger never turns into a car beside it: every other vehicle in (or moving into) the target
    lane must be clear of its length by ``ZIPPER_MIN_GAP_M`` plus ``ZIPPER_CLOSING_TIME_S`` x the speed at which
    the two would close (:func:`merge_gap_free`). Until then it keeps waiting in its lane, IDM following the
    traffic and the stopped vehicles that close it (so, with no gap, it stops before the closure). The watched
    vehicle is judged by the trigger gap and its closing speed: being merged in front of, between
    ``ZIPPER_WINDOW_FRACTION`` x ``gap_m`` and ``gap_m`` ahead at up to ``max_closing_mps``, is the hazard the
    scene is built for. A merger that found no free gap while the watched car was in that window, or that has
    slowed in its queue so that the watched car comes up faster, lets it pass (it never turns in closer than the
    window, into the watched car's side).
    """

    def __init__(self, road: Road, position: np.ndarray, heading: float, speed: float, *, into_lane_id: int,
                 watch: Vehicle, gap_m: float, max_closing_mps: float = math.inf) -> None:
        super().__init__(road, position, heading, speed, into_lane_id=into_lane_id, at_time_s=math.inf)
        self.watch = watch
        self.gap_m = float(gap_m)
        self.max_closing_mps = float(max_closing_mps)

    def act(self, action: dict | str | None = None) -> None:
        if not self.started and not self.crashed:
            gap = float(self.position[0] - self.watch.position[0]) - (self.LENGTH + self.watch.LENGTH) / 2
            closing = float(self.watch.speed) - float(self.speed)
            if ZIPPER_WINDOW_FRACTION * self.gap_m <= gap <= self.gap_m and closing <= self.max_closing_mps and \
                    merge_gap_free(self, self.into_lane_id, ignore=self.watch):
                self.at_time_s = self.elapsed_s  # due now: LaneChanger turns in
        super().act()


# A zipper merger's free gap: bumper-to-bumper room to every car in the target lane, plus the distance the two
# close in the time a lane change takes (highway-env's lateral controller needs ~2 s to move over).
ZIPPER_MIN_GAP_M = 2.0
ZIPPER_CLOSING_TIME_S = 2.0
# The watched car's turn-in window: from the trigger gap down to this fraction of it (a merger that could not go
# then waits for the car to pass; the window lasts ~0.5 s at the scene's relative speed, ~1 s following a lead).
ZIPPER_WINDOW_FRACTION = 0.75


def merge_gap_free(vehicle: Vehicle, into_lane_id: int, ignore: Vehicle | None = None) -> bool:
    """Whether ``vehicle`` can move into lane ``into_lane_id`` of its road segment without touching anybody.

    A car occupies the target lane when its box overlaps the lane laterally (one mid-lane-change counts). It
    blocks the merge unless the bumper-to-bumper gap to it is at least ``ZIPPER_MIN_GAP_M`` plus
    ``ZIPPER_CLOSING_TIME_S`` x the closing speed (the car behind faster than the one ahead)."""
    lane = vehicle.road.network.get_lane((vehicle.lane_index[0], vehicle.lane_index[1], into_lane_id))
    s_self, _ = lane.local_coordinates(vehicle.position)
    for other in vehicle.road.vehicles:
        if other is vehicle or other is ignore:
            continue
        s_other, lat = lane.local_coordinates(other.position)
        if abs(lat) > (lane.width_at(s_other) + other.WIDTH) / 2:
            continue  # not in the target lane
        ahead = s_other >= s_self
        gap = abs(s_other - s_self) - (vehicle.LENGTH + other.LENGTH) / 2
        closing = (vehicle.speed - other.speed) if ahead else (other.speed - vehicle.speed)
        if gap < ZIPPER_MIN_GAP_M + ZIPPER_CLOSING_TIME_S * max(closing, 0.0):
            return False
    return True
