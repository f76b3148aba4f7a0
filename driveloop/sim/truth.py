"""Was a fallback activation called for? Judged on the simulator's ground truth, not on the safety rules.

``driveloop safety-suite`` drives nominal episodes; every fallback activation there must be explained by
a real hazard, or it is a *false* activation (the layer braked or steered for nothing). The judge must
not be the rule itself (a rule always agrees with itself), so it uses the standard hazard measures of
the driver-assistance norms on the true state the rule acted on:

- longitudinal (AEB/FCW activations): time-to-collision under ``ttc_s`` (2 s, the forward-collision
  warning range of ISO 15623 / Euro NCAP) or a time headway under ``headway_s`` (0.5 s: a car that cut
  in closer than half a second of travel), to the lead or to a car cutting in (its side over the ego
  lane's marking, moving further in: :func:`cutting_in`);
- lateral (lane activations): the vehicle's edge is over the lane marking, or reaches it within
  ``tlc_s`` at its current lateral speed (time-to-line-crossing under 1 s, the ISO 17361 lane-departure
  warning range);
- watchdog activations are the model failing (late, NaN, dead): never "for nothing", reported as such.

The measures are pure functions of one :class:`~driveloop.sim.world.WorldSnapshot`.

The second question, for the safety suite's cut-in family: *could* a cut-in have been avoided at all? A car
changing into the ego's lane becomes detectable as a cut-in on the first frame on which its side is over the
lane marking (before that it is inside its own lane, where sideways motion is lane keeping, not yet a cut-in;
UN R157 measures cut-ins from the same moment). :func:`cut_in_truth` takes that frame and brakes the ego at
the *vehicle's* limits (``BrakingLimits``: the simulator's deceleration limit and brake lag, integrated the way
the simulator integrates, not the safety layer's parameters) while the cutter completes its manoeuvre at
constant speed; the case is *avoidable* when the two boxes never touch. Braking only: the wheel is held
straight, so the ego keeps its heading (as the AEB does while it brakes for a cut-in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from driveloop.core.exceptions import ConfigError
from driveloop.sim.world import VehicleState, WorldSnapshot, gap_m, ttc_s

CUT_IN_MIN_LATERAL_MPS = 0.05  # slower sideways motion is no cut-in (numerical rest)


@dataclass(frozen=True)
class HazardCriteria:
    ttc_s: float = 2.0
    headway_s: float = 0.5
    tlc_s: float = 1.0
    vehicle_width_m: float = 2.0

    def __post_init__(self) -> None:
        for name in ("ttc_s", "headway_s", "tlc_s", "vehicle_width_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"hazard criterion {name} must be > 0, got {value}")


def longitudinal_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    """What makes the lead a hazard (TTC or headway below the criterion), None when nothing does."""
    ttc = ttc_s(snap)
    if ttc < c.ttc_s:
        return f"true TTC {ttc:.2f} s < {c.ttc_s:g} s"
    gap = gap_m(snap)
    if snap.speed_mps > 0 and math.isfinite(gap) and gap / snap.speed_mps < c.headway_s:
        return f"true headway {gap / snap.speed_mps:.2f} s < {c.headway_s:g} s"
    return None


def cut_in_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    """TTC or headway below the criterion to a car that is cutting in (not yet the lead); else None."""
    for other in snap.others:
        if not cutting_in(snap, other):
            continue
        gap = other.x_m - snap.ego.x_m - (snap.ego.length_m + other.length_m) / 2
        closing = snap.ego.vx_mps - other.vx_mps
        if gap <= 0 or (closing > 0 and gap / closing < c.ttc_s):
            return f"car cutting in: true TTC {max(gap, 0.0) / closing if closing > 0 else 0.0:.2f} s < {c.ttc_s:g} s"
        if snap.speed_mps > 0 and gap / snap.speed_mps < c.headway_s:
            return f"car cutting in: true headway {gap / snap.speed_mps:.2f} s < {c.headway_s:g} s"
    return None


def _aeb_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    return longitudinal_hazard(snap, c) or cut_in_hazard(snap, c)


def lateral_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    """Over the lane marking, or reaching it within ``tlc_s`` at the current lateral speed; else None."""
    margin = snap.lane_width_m / 2 - c.vehicle_width_m / 2 - abs(snap.lane_offset_m)
    if margin <= 0:
        return f"over the lane marking by {-margin:.2f} m"
    lateral = snap.speed_mps * math.sin(snap.heading_rel_rad)  # + left, like lane_offset_m
    outward = lateral * snap.lane_offset_m > 0 or (snap.lane_offset_m == 0 and lateral != 0)
    if outward and margin / abs(lateral) < c.tlc_s:
        return f"true time to line crossing {margin / abs(lateral):.2f} s < {c.tlc_s:g} s"
    return None


def judge_activation(kind: str, snap: WorldSnapshot | None, c: HazardCriteria) -> tuple[bool, str]:
    """(justified, why) for one activation of rule ``kind`` (aeb, lane, watchdog, …) on the state it saw."""
    if kind == "watchdog":
        return True, "the model failed (watchdog)"
    if snap is None:
        return False, "no ground truth recorded for this tick"
    hazard = {"aeb": _aeb_hazard, "lane": lateral_hazard}.get(kind)
    why = hazard(snap, c) if hazard is not None else None
    return (True, why) if why is not None else (False, f"no {kind} hazard in the ground truth")


@dataclass(frozen=True)
class BrakingLimits:
    """The vehicle's own braking: deceleration limit, first-order brake lag and the simulator's step."""

    max_decel_mps2: float
    lag_s: float
    step_s: float

    def __post_init__(self) -> None:
        for name in ("max_decel_mps2", "step_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"braking limit {name} must be > 0, got {value}")
        if not (math.isfinite(self.lag_s) and self.lag_s >= 0):
            raise ConfigError(f"braking limit lag_s must be >= 0, got {self.lag_s}")


@dataclass(frozen=True)
class CutInTruth:
    """Verdict on one cut-in: avoidable by braking at the limits from ``detected_at_s``, and by how much."""

    avoidable: bool
    min_gap_m: float  # least bumper gap while the two overlap sideways (negative: they touched)
    detected_at_s: float
    gap_at_detection_m: float
    closing_at_detection_mps: float


def _within(a0: float, a1: float, bound: float) -> tuple[float, float] | None:
    """The fractions f in [0, 1] with |a0 + (a1 - a0) f| <= bound, as (first, last); None when there are none."""
    slope = a1 - a0
    if slope == 0.0:
        return (0.0, 1.0) if abs(a0) <= bound else None
    lo, hi = sorted(((-bound - a0) / slope, (bound - a0) / slope))
    first, last = max(lo, 0.0), min(hi, 1.0)
    return (first, last) if first <= last else None


def _lane_centre_y(snap: WorldSnapshot) -> float:
    return snap.ego.y_m - snap.lane_offset_m


def cutting_in(snap: WorldSnapshot, other: VehicleState) -> bool:
    """``other`` is ahead, its side over the ego lane's marking, and moving further in."""
    offset = other.y_m - _lane_centre_y(snap)
    over = abs(offset) <= snap.lane_width_m / 2 + other.width_m / 2
    inward = other.vy_mps * offset < 0 and abs(other.vy_mps) >= CUT_IN_MIN_LATERAL_MPS
    return over and inward and other.x_m > snap.ego.x_m


def cut_in_truth(snap: WorldSnapshot, cutter: VehicleState, limits: BrakingLimits,
                 horizon_s: float = 30.0) -> CutInTruth:
    """Brake the ego at ``limits`` from ``snap`` (the detection frame) while ``cutter`` finishes cutting in.

    Ego: command -max deceleration from this tick, through the first-order lag, explicit Euler as in the
    simulator (position with the step's starting speed), never reversing; wheel straight: it keeps its heading.
    Cutter: its speed along the road, and its sideways speed until centred in the ego's lane.
    """
    ego, h = snap.ego, limits.step_s
    alpha = 1.0 - math.exp(-h / limits.lag_s) if limits.lag_s > 0 else 1.0
    half_length = (ego.length_m + cutter.length_m) / 2
    half_width = (ego.width_m + cutter.width_m) / 2
    target_y = _lane_centre_y(snap)
    x_e, y_e, v_e, applied = ego.x_m, ego.y_m, snap.speed_mps, snap.accel_mps2
    cos_h, sin_h = math.cos(ego.heading_rad), math.sin(ego.heading_rad)
    x_c, y_c, vx_c = cutter.x_m, cutter.y_m, cutter.vx_mps
    vy_c = cutter.vy_mps if (cutter.y_m - target_y) * cutter.vy_mps < 0 else 0.0
    min_gap, touched, t = math.inf, False, 0.0
    while t < horizon_s:
        applied += (-limits.max_decel_mps2 - applied) * alpha
        accel = -v_e / h if v_e + applied * h < 0 else applied
        lateral = math.copysign(min(abs(vy_c) * h, abs(target_y - y_c)), target_y - y_c) if vy_c else 0.0
        # Within a step both move on straight lines: the sideways overlap is one interval of the step.
        step_x, step_y = v_e * h * cos_h, v_e * h * sin_h
        dx0, dx1 = x_c - x_e, (x_c + vx_c * h) - (x_e + step_x)
        side = _within(y_c - y_e, y_c + lateral - (y_e + step_y), half_width)
        if side is not None:
            at = [dx0 + (dx1 - dx0) * f for f in side]
            min_gap = min(min_gap, min(at) - half_length)
            touched = touched or _within(at[0], at[1], half_length) is not None
        x_e, y_e, v_e = x_e + step_x, y_e + step_y, v_e + accel * h
        x_c, y_c, t = x_c + vx_c * h, y_c + lateral, t + h
        if v_e <= vx_c and y_c == target_y:
            break  # no longer closing and the manoeuvre is over: the gap only grows from here
    gap0 = cutter.x_m - ego.x_m - half_length
    return CutInTruth(not touched, min_gap, snap.t_s, gap0, snap.speed_mps - cutter.vx_mps)
