"""Lane-departure guard (pure): is the vehicle about to leave its lane?

The longitudinal AEB cannot see a sideways drift into the next lane; this rule hands the car to the
fallback (which holds the lane and slows down) before its body crosses the lane line.
"""

from __future__ import annotations

import math

from .config import LaneConfig


def predicted_offset_m(lane_offset_m: float, heading_rel_rad: float, speed_mps: float, lookahead_s: float) -> float:
    """Lateral offset from the lane centre after ``lookahead_s`` on the current heading (+ left)."""
    return lane_offset_m + speed_mps * math.sin(heading_rel_rad) * lookahead_s


def departure(lane_offset_m: float, heading_rel_rad: float, speed_mps: float, config: LaneConfig) -> float | None:
    """The predicted offset when it is beyond ``max_offset_m`` (a departure), else None."""
    predicted = predicted_offset_m(lane_offset_m, heading_rel_rad, speed_mps, config.lookahead_s)
    return predicted if abs(predicted) > config.max_offset_m else None
