"""Actuator limits: each clamp swept from below to above its bound, and the emergency jerk rule."""

from __future__ import annotations

import math

import pytest

from driveloop.safety import LimitsConfig
from driveloop.safety.limits import limit_command

CFG = LimitsConfig()  # accel [-8, 3], jerk 5 (emergency 50) m/s^3, steer 0.35 rad at 0.6 rad/s
DT = 0.1
NO_RATE = LimitsConfig(max_jerk_mps3=1e6, emergency_jerk_mps3=1e6, max_steer_rate_radps=1e6)


@pytest.mark.parametrize(("request_", "expected"), [(-20.0, -8.0), (-8.1, -8.0), (-8.0, -8.0), (-7.9, -7.9),
                                                    (0.0, 0.0), (2.9, 2.9), (3.0, 3.0), (3.1, 3.0), (20.0, 3.0)])
def test_accel_range(request_: float, expected: float) -> None:
    assert limit_command(request_, 0.0, 0.0, 0.0, DT, False, NO_RATE)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [(-1.0, -0.35), (-0.36, -0.35), (-0.35, -0.35), (-0.3, -0.3),
                                                    (0.3, 0.3), (0.35, 0.35), (0.36, 0.35), (1.0, 0.35)])
def test_steer_range(request_: float, expected: float) -> None:
    assert limit_command(0.0, request_, 0.0, 0.0, DT, False, NO_RATE)[1] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [(0.4, 0.4), (0.5, 0.5), (0.6, 0.5), (3.0, 0.5),
                                                    (-0.4, -0.4), (-0.5, -0.5), (-0.6, -0.5), (-8.0, -0.5)])
def test_jerk_limit(request_: float, expected: float) -> None:
    """5 m/s^3 at 0.1 s: at most 0.5 m/s^2 change per tick, either way, when not an emergency."""
    assert limit_command(request_, 0.0, 0.0, 0.0, DT, False, CFG)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [(-4.0, -4.0), (-5.0, -5.0), (-6.0, -5.0), (-8.0, -5.0),
                                                    (0.6, 0.5), (3.0, 0.5)])
def test_emergency_jerk_only_speeds_up_braking(request_: float, expected: float) -> None:
    """Emergency: braking may deepen by 5 m/s^2 per tick; raising accel stays at the comfort jerk."""
    assert limit_command(request_, 0.0, 0.0, 0.0, DT, True, CFG)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("request_", "expected"), [(0.05, 0.05), (0.06, 0.06), (0.07, 0.06), (0.3, 0.06),
                                                    (-0.05, -0.05), (-0.06, -0.06), (-0.07, -0.06)])
def test_steer_rate_limit(request_: float, expected: float) -> None:
    """0.6 rad/s at 0.1 s: at most 0.06 rad change per tick."""
    assert limit_command(0.0, request_, 0.0, 0.0, DT, False, CFG)[1] == pytest.approx(expected)


def test_rates_are_relative_to_the_previous_command() -> None:
    assert limit_command(3.0, 0.35, 2.0, 0.3, DT, False, CFG) == pytest.approx((2.5, 0.35))
    assert limit_command(-8.0, -0.35, -7.0, -0.2, DT, False, CFG) == pytest.approx((-7.5, -0.26))


def test_rates_scale_with_dt() -> None:
    assert limit_command(3.0, 0.3, 0.0, 0.0, 0.2, False, CFG) == pytest.approx((1.0, 0.12))
    assert limit_command(-8.0, 0.0, 0.0, 0.0, 0.05, True, CFG)[0] == pytest.approx(-2.5)


@pytest.mark.parametrize("dt", [0.0, -0.1, math.nan, math.inf])
def test_bad_dt_freezes_the_command(dt: float) -> None:
    assert limit_command(3.0, 0.3, 1.0, 0.1, dt, True, CFG) == pytest.approx((1.0, 0.1))


def test_non_finite_request_brakes_and_holds_the_wheel() -> None:
    assert limit_command(math.nan, math.nan, 0.0, 0.1, DT, True, CFG) == pytest.approx((-5.0, 0.1))
    assert limit_command(math.inf, -math.inf, 0.0, 0.1, DT, False, CFG) == pytest.approx((-0.5, 0.1))


def test_out_of_envelope_previous_command_is_clamped_first() -> None:
    assert limit_command(0.0, 0.0, 100.0, 5.0, DT, False, CFG) == pytest.approx((2.5, 0.29))
    assert limit_command(0.0, 0.0, -100.0, -5.0, DT, False, CFG) == pytest.approx((-7.5, -0.29))
    assert limit_command(0.0, 0.0, math.nan, math.nan, DT, False, CFG) == pytest.approx((-7.5, 0.0))
    assert limit_command(0.0, 0.3, 0.0, math.nan, DT, False, CFG)[1] == pytest.approx(0.06)  # from straight
