"""Fallback controller: the minimal-risk manoeuvre when the model may not drive.

Brakes to a stop at ``comfort_decel_mps2`` (or harder when AEB asks for more) and holds the lane with a
proportional controller on the lateral offset and the heading error. Sign convention (contracts/observation.py):
lane offset and heading are + to the left, steering + turns left, so both terms steer back.
At standstill it keeps the brake applied (holding the vehicle) and the wheels straight.
"""

from __future__ import annotations

from .config import FallbackConfig

STANDSTILL_MPS = 0.05  # below this the vehicle is held, not steered


def fallback_command(
    ego_speed_mps: float,
    lane_offset_m: float,
    heading_rel_rad: float,
    aeb_decel_mps2: float,
    config: FallbackConfig,
) -> tuple[float, float]:
    """Requested (accel_mps2, steering_rad) of the fallback; the actuator limits apply afterwards."""
    accel = -max(config.comfort_decel_mps2, aeb_decel_mps2)
    if ego_speed_mps <= STANDSTILL_MPS:
        return accel, 0.0
    steer = -(config.lane_gain_radpm * lane_offset_m + config.heading_gain * heading_rel_rad)
    return accel, steer
