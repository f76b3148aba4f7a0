"""Actuator limits, applied to every command whatever its source.

Rules, in order:
1. A non-finite request is replaced by the safe request: full braking, steering held (never trusted).
2. Acceleration is clamped to [-max_decel_mps2, max_accel_mps2]; steering to +-max_steer_rad.
3. Jerk: the acceleration may rise by at most max_jerk_mps3 * dt per tick. It may fall by the same,
   or by emergency_jerk_mps3 * dt when ``emergency`` (AEB or a fallback taking over), so that comfort
   never delays a brake.
4. Steering may change by at most max_steer_rate_radps * dt per tick.
The result is always finite and inside the envelope, whatever the inputs (property-tested).
"""

from __future__ import annotations

import math

from .config import LimitsConfig


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def limit_command(
    accel_mps2: float,
    steering_rad: float,
    prev_accel_mps2: float,
    prev_steering_rad: float,
    dt_s: float,
    emergency: bool,
    config: LimitsConfig,
) -> tuple[float, float]:
    """The command the actuators receive: request clamped to the envelope and rate-limited from the last one."""
    low_a, high_a = -config.max_decel_mps2, config.max_accel_mps2
    high_s = config.max_steer_rad
    prev_a = _clamp(prev_accel_mps2, low_a, high_a) if math.isfinite(prev_accel_mps2) else low_a
    prev_s = _clamp(prev_steering_rad, -high_s, high_s) if math.isfinite(prev_steering_rad) else 0.0
    if not math.isfinite(accel_mps2):
        accel_mps2 = low_a
    if not math.isfinite(steering_rad):
        steering_rad = prev_s
    dt = max(dt_s, 0.0) if math.isfinite(dt_s) else 0.0

    rise = config.max_jerk_mps3 * dt
    fall = (config.emergency_jerk_mps3 if emergency else config.max_jerk_mps3) * dt
    accel = _clamp(_clamp(accel_mps2, low_a, high_a), prev_a - fall, prev_a + rise)

    step = config.max_steer_rate_radps * dt
    steer = _clamp(_clamp(steering_rad, -high_s, high_s), prev_s - step, prev_s + step)
    return accel, steer
