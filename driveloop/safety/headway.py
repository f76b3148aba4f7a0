"""The headway floor: a model that tailgates is held back before its lead gives the AEB no room.

The AEB brakes on time to collision (its partial stage at TTC <= 1.5 s), so a model that follows at 0.5-0.8 s
with a small closing speed is never challenged, and when its lead stops abruptly (a car that was side-swiped
stops at 12-17 m/s^2) even full braking comes too late: there is no distance left to brake in. The floor is
``standstill_gap_m + time_gap_s x ego speed``; below it the model's acceleration request is capped at
``-gain_mps2 x shortfall / floor`` (shortfall = floor - gap, the ratio at most 1). Rules:

- It only ever *lowers* the model's request (the supervisor takes ``min(request, cap)`` before the actuator
  limits, so the comfort jerk applies and the command is never above the one without the floor).
- It binds only while the model drives: the fallback and the AEB brake by their own rules, and the floor never
  triggers the fallback (it is a limitation, like the actuator limits or an advisory, not an intervention).
- It asks at most ``gain_mps2`` of braking (comfort); anything harder is the AEB's job, as without the floor.
"""

from __future__ import annotations

import math

from .config import HeadwayConfig
from .types import Track

__all__ = ["NO_CAP_MPS2", "floor_gap_m", "headway_cap_mps2"]

NO_CAP_MPS2 = math.inf  # the floor does not bind (no lead, or the gap is at or above the floor)


def floor_gap_m(ego_speed_mps: float, config: HeadwayConfig) -> float:
    """The least gap the model may keep to its lead at this speed (never negative: speed below 0 counts as 0)."""
    return config.standstill_gap_m + config.time_gap_s * max(ego_speed_mps, 0.0)


def headway_cap_mps2(ego_speed_mps: float, track: Track | None, config: HeadwayConfig) -> float:
    """The acceleration cap for a model closer than the floor to its lead (in [-gain, 0)), else ``NO_CAP_MPS2``."""
    if track is None:
        return NO_CAP_MPS2
    floor = floor_gap_m(ego_speed_mps, config)
    gap = float(track.gap_m)
    if floor <= 0.0 or not gap < floor:  # a disabled floor (both distances 0), or room enough; NaN gaps too
        return NO_CAP_MPS2
    return -config.gain_mps2 * min((floor - gap) / floor, 1.0)
