"""Actuator limits: each clamp swept from below to above its bound, and the emergency jerk rule.

The sweep points come from the config's constants, so a changed limit moves its sweep.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from driveloop.safety import LimitsConfig
from driveloop.safety.limits import limit_command

CFG = LimitsConfig()
DT = 0.1
NO_RATE = dataclasses.replace(CFG, max_jerk_mps3=1e6, emergency_jerk_mps3=1e6, max_steer_rate_radps=1e6)
LOW, HIGH, STEER = -CFG.max_decel_mps2, CFG.max_accel_mps2, CFG.max_steer_rad
RISE = CFG.max_jerk_mps3 * DT  # most the acceleration may change per tick (comfort)
STEER_STEP = CFG.max_steer_rate_radps * DT  # most the steering may change per tick
# The emergency jerk is swept at a tick short enough that its step stays inside the envelope.
EMERGENCY_DT = CFG.max_decel_mps2 / CFG.emergency_jerk_mps3 / 2
FALL = CFG.emergency_jerk_mps3 * EMERGENCY_DT  # = half the deceleration limit


@pytest.mark.parametrize(("request_", "expected"), [
    (LOW - 10.0, LOW), (LOW - 0.1, LOW), (LOW, LOW), (LOW + 0.1, LOW + 0.1), (0.0, 0.0),
    (HIGH - 0.1, HIGH - 0.1), (HIGH, HIGH), (HIGH + 0.1, HIGH), (HIGH + 10.0, HIGH),
])
def test_accel_range(request_: float, expected: float) -> None:
    assert limit_command(request_, 0.0, 0.0, 0.0, DT, False, NO_RATE)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [
    (-3 * STEER, -STEER), (-STEER - 0.01, -STEER), (-STEER, -STEER), (-STEER + 0.05, -STEER + 0.05),
    (STEER - 0.05, STEER - 0.05), (STEER, STEER), (STEER + 0.01, STEER), (3 * STEER, STEER),
])
def test_steer_range(request_: float, expected: float) -> None:
    assert limit_command(0.0, request_, 0.0, 0.0, DT, False, NO_RATE)[1] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [
    (RISE - 0.1, RISE - 0.1), (RISE, RISE), (RISE + 0.1, RISE), (HIGH, RISE),
    (-RISE + 0.1, -RISE + 0.1), (-RISE, -RISE), (-RISE - 0.1, -RISE), (LOW, -RISE),
])
def test_jerk_limit(request_: float, expected: float) -> None:
    """Not an emergency: at most max_jerk_mps3 x dt change per tick, either way."""
    assert limit_command(request_, 0.0, 0.0, 0.0, DT, False, CFG)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [
    (-FALL + 0.5, -FALL + 0.5), (-FALL, -FALL), (-FALL - 0.1, -FALL), (LOW, -FALL),
    (RISE * EMERGENCY_DT / DT + 0.1, CFG.max_jerk_mps3 * EMERGENCY_DT), (HIGH, CFG.max_jerk_mps3 * EMERGENCY_DT),
])
def test_emergency_jerk_only_speeds_up_braking(request_: float, expected: float) -> None:
    """Emergency: braking may deepen by emergency_jerk_mps3 x dt per tick; raising stays at the comfort jerk."""
    assert limit_command(request_, 0.0, 0.0, 0.0, EMERGENCY_DT, True, CFG)[0] == pytest.approx(expected)


def test_emergency_reaches_full_braking_in_one_tick_from_full_throttle() -> None:
    """The default: the brake lag, not a command ramp, shapes the build-up (docs/SAFETY.md, limits)."""
    assert CFG.emergency_jerk_mps3 * DT >= CFG.max_accel_mps2 + CFG.max_decel_mps2
    assert limit_command(LOW, 0.0, HIGH, 0.0, DT, True, CFG)[0] == LOW


@pytest.mark.parametrize(("request_", "expected"), [
    (STEER_STEP - 0.01, STEER_STEP - 0.01), (STEER_STEP, STEER_STEP), (STEER_STEP + 0.01, STEER_STEP),
    (STEER, STEER_STEP), (-STEER_STEP + 0.01, -STEER_STEP + 0.01), (-STEER_STEP, -STEER_STEP),
    (-STEER_STEP - 0.01, -STEER_STEP),
])
def test_steer_rate_limit(request_: float, expected: float) -> None:
    """At most max_steer_rate_radps x dt change per tick."""
    assert limit_command(0.0, request_, 0.0, 0.0, DT, False, CFG)[1] == pytest.approx(expected)


def test_rates_are_relative_to_the_previous_command() -> None:
    assert limit_command(HIGH, STEER, HIGH - 1.0, STEER - 0.05, DT, False, CFG) == pytest.approx(
        (HIGH - 1.0 + RISE, STEER))
    assert limit_command(LOW, -STEER, LOW + 1.0, -STEER + 0.15, DT, False, CFG) == pytest.approx(
        (LOW + 1.0 - RISE, -STEER + 0.15 - STEER_STEP))


def test_rates_scale_with_dt() -> None:
    assert limit_command(HIGH, STEER, 0.0, 0.0, 2 * DT, False, CFG) == pytest.approx((2 * RISE, 2 * STEER_STEP))
    assert limit_command(LOW, 0.0, 0.0, 0.0, EMERGENCY_DT / 2, True, CFG)[0] == pytest.approx(-FALL / 2)


@pytest.mark.parametrize("dt", [0.0, -0.1, math.nan, math.inf])
def test_bad_dt_freezes_the_command(dt: float) -> None:
    assert limit_command(3.0, 0.3, 1.0, 0.1, dt, True, CFG) == pytest.approx((1.0, 0.1))


def test_non_finite_request_brakes_and_holds_the_wheel() -> None:
    assert limit_command(math.nan, math.nan, 0.0, 0.1, EMERGENCY_DT, True, CFG) == pytest.approx((-FALL, 0.1))
    assert limit_command(math.inf, -math.inf, 0.0, 0.1, DT, False, CFG) == pytest.approx((-RISE, 0.1))


def test_out_of_envelope_previous_command_is_clamped_first() -> None:
    turned = STEER - STEER_STEP
    assert limit_command(0.0, 0.0, 100.0, 5.0, DT, False, CFG) == pytest.approx((HIGH - RISE, turned))
    assert limit_command(0.0, 0.0, -100.0, -5.0, DT, False, CFG) == pytest.approx((LOW + RISE, -turned))
    assert limit_command(0.0, 0.0, math.nan, math.nan, DT, False, CFG) == pytest.approx((LOW + RISE, 0.0))
    assert limit_command(0.0, 0.3, 0.0, math.nan, DT, False, CFG)[1] == pytest.approx(STEER_STEP)  # from straight
