"""Ground truth of one simulator tick: what the world really is, before any sensor sees it.

The simulator (``sim.simulator``) produces a :class:`WorldSnapshot` every control tick; sensors
(``sim.sensors``) turn it into the noisy :class:`~driveloop.contracts.observation.Observation` the model sees;
the recorder stores it on ``/vehicle/state`` so that a drive can be replayed and audited.

Frame: a right-handed road frame, x along the road, y to the LEFT, headings counter-clockwise
(ISO 8855). highway-env draws y downwards; ``sim.simulator`` converts at its boundary so nothing else
ever sees highway-env's frame.

The helpers (:func:`lead_vehicle`, :func:`gap_m`, :func:`ttc_s`) are ground-truth metrics for scoring
(minimum gap, TTC triggers in tests); the vehicle itself decides from sensor data only
(``sim.perception``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from driveloop.core.exceptions import SegmentError

# Lateral half-width of the ego's lane corridor when no lane width is known [m]: a vehicle whose
# centre is closer than this to the ego's centre line overlaps the ego's path.
DEFAULT_CORRIDOR_HALF_WIDTH_M = 2.0


@dataclass(frozen=True)
class VehicleState:
    """One vehicle's pose and motion in the road frame (SI units, y to the left)."""

    id: int
    x_m: float
    y_m: float
    vx_mps: float
    vy_mps: float
    heading_rad: float
    length_m: float = 5.0
    width_m: float = 2.0
    lane_index: int = 0

    def to_dict(self) -> dict[str, float | int]:
        # A frozen dataclass's __dict__ holds exactly its fields, in field order: the recorder calls
        # this for every vehicle in view on every tick, and fields() + getattr cost 5x more.
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VehicleState:
        try:
            return cls(
                id=int(data["id"]),
                x_m=float(data["x_m"]),
                y_m=float(data["y_m"]),
                vx_mps=float(data["vx_mps"]),
                vy_mps=float(data["vy_mps"]),
                heading_rad=float(data["heading_rad"]),
                length_m=float(data["length_m"]),
                width_m=float(data["width_m"]),
                lane_index=int(data["lane_index"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SegmentError(f"malformed vehicle state {data!r}: {e}") from e


@dataclass(frozen=True)
class WorldSnapshot:
    """Everything true about the ego's world at time ``t_s``.

    ``heading_rel_rad`` is the ego heading relative to its lane direction; ``lane_offset_m`` the
    lateral offset of the ego centre from its lane centre (+ left). ``accel_mps2`` is the acceleration
    actually applied (after the actuator lag), ``steering_rad`` the applied steering (+ left).
    """

    t_s: float
    ego: VehicleState
    speed_mps: float
    accel_mps2: float
    steering_rad: float
    heading_rel_rad: float
    lane_offset_m: float
    set_speed_mps: float
    lane_width_m: float
    others: tuple[VehicleState, ...]
    crashed: bool = False
    off_road: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (floats, ints, bools, lists) for the recorder."""
        out = dict(self.__dict__)  # every field, in field order (see VehicleState.to_dict)
        out["ego"] = self.ego.to_dict()
        out["others"] = [v.to_dict() for v in self.others]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldSnapshot:
        try:
            return cls(
                t_s=float(data["t_s"]),
                ego=VehicleState.from_dict(data["ego"]),
                speed_mps=float(data["speed_mps"]),
                accel_mps2=float(data["accel_mps2"]),
                steering_rad=float(data["steering_rad"]),
                heading_rel_rad=float(data["heading_rel_rad"]),
                lane_offset_m=float(data["lane_offset_m"]),
                set_speed_mps=float(data["set_speed_mps"]),
                lane_width_m=float(data["lane_width_m"]),
                others=tuple(VehicleState.from_dict(v) for v in data["others"]),
                crashed=bool(data["crashed"]),
                off_road=bool(data["off_road"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SegmentError(f"malformed world snapshot: {e}") from e


def to_ego_frame(ego: VehicleState, x_m: float, y_m: float) -> tuple[float, float]:
    """A road-frame point expressed in the ego frame (x forward along the ego heading, y left)."""
    dx, dy = x_m - ego.x_m, y_m - ego.y_m
    c, s = math.cos(ego.heading_rad), math.sin(ego.heading_rad)
    return c * dx + s * dy, -s * dx + c * dy


def lead_vehicle(snapshot: WorldSnapshot) -> VehicleState | None:
    """The nearest vehicle ahead whose centre lies in the ego's lane corridor, or None.

    The corridor is centred on the ego's path (its heading), half as wide as the lane: a vehicle
    half-way through a cut-in counts as soon as its centre crosses into it.
    """
    half_width = snapshot.lane_width_m / 2 if snapshot.lane_width_m > 0 else DEFAULT_CORRIDOR_HALF_WIDTH_M
    best: VehicleState | None = None
    best_dx = math.inf
    ego = snapshot.ego
    # to_ego_frame inlined, its rotation computed once: this runs on every vehicle tick (scoring).
    c, s = math.cos(ego.heading_rad), math.sin(ego.heading_rad)
    for other in snapshot.others:
        dx_road, dy_road = other.x_m - ego.x_m, other.y_m - ego.y_m
        dx = c * dx_road + s * dy_road
        if dx > 0 and abs(-s * dx_road + c * dy_road) < half_width and dx < best_dx:
            best, best_dx = other, dx
    return best


def gap_m(snapshot: WorldSnapshot) -> float:
    """Bumper-to-bumper distance to the lead vehicle [m]; inf when there is none."""
    lead = lead_vehicle(snapshot)
    if lead is None:
        return math.inf
    dx, _ = to_ego_frame(snapshot.ego, lead.x_m, lead.y_m)
    return dx - (snapshot.ego.length_m + lead.length_m) / 2


def closing_speed_mps(snapshot: WorldSnapshot) -> float:
    """Speed at which the gap to the lead shrinks [m/s] (+ closing); 0 without a lead."""
    lead = lead_vehicle(snapshot)
    if lead is None:
        return 0.0
    c, s = math.cos(snapshot.ego.heading_rad), math.sin(snapshot.ego.heading_rad)
    ego_v = c * snapshot.ego.vx_mps + s * snapshot.ego.vy_mps
    lead_v = c * lead.vx_mps + s * lead.vy_mps
    return ego_v - lead_v


def ttc_s(snapshot: WorldSnapshot) -> float:
    """Ground-truth time-to-collision with the lead [s]: gap / closing speed; inf when not closing.

    A gap already at or below zero (contact) gives 0.
    """
    gap = gap_m(snapshot)
    if math.isinf(gap):
        return math.inf
    closing = closing_speed_mps(snapshot)
    if gap <= 0:
        return 0.0
    if closing <= 0:
        return math.inf
    return gap / closing
