"""Fallback controller: brakes to a stop, harder when AEB asks, and holds the lane."""

from __future__ import annotations

import math

import pytest

from driveloop.safety import AebConfig, FallbackConfig
from driveloop.safety.fallback import STANDSTILL_MPS, fallback_command

CFG = FallbackConfig()
COMFORT, K_OFF, K_HEAD = CFG.comfort_decel_mps2, CFG.lane_gain_radpm, CFG.heading_gain


@pytest.mark.parametrize(("aeb", "expected"), [
    (0.0, -COMFORT), (COMFORT - 0.1, -COMFORT), (COMFORT, -COMFORT), (COMFORT + 0.1, -COMFORT - 0.1),
    (AebConfig().full_decel_mps2, -AebConfig().full_decel_mps2),
])
def test_decel_is_comfort_or_aeb_whichever_is_harder(aeb: float, expected: float) -> None:
    assert fallback_command(20.0, 0.0, 0.0, aeb, CFG)[0] == pytest.approx(expected)


STEER = [
    ("centred", 0.0, 0.0, 0.0),
    ("left of centre steers right", 1.0, 0.0, -K_OFF),
    ("right of centre steers left", -1.5, 0.0, 1.5 * K_OFF),
    ("heading left steers right", 0.0, 0.1, -0.1 * K_HEAD),
    ("both add up", 1.0, 0.1, -K_OFF - 0.1 * K_HEAD),
    ("opposite terms cancel", K_HEAD, -K_OFF, 0.0),
]


@pytest.mark.parametrize(("name", "offset", "heading", "expected"), STEER, ids=[s[0] for s in STEER])
def test_lane_keeping_gains(name: str, offset: float, heading: float, expected: float) -> None:
    assert fallback_command(20.0, offset, heading, 0.0, CFG)[1] == pytest.approx(expected)


@pytest.mark.parametrize(("speed", "steers"), [(0.0, False), (STANDSTILL_MPS, False), (STANDSTILL_MPS + 0.01, True),
                                                (5.0, True)])
def test_standstill_holds_brake_and_straight_wheels(speed: float, steers: bool) -> None:
    accel, steer = fallback_command(speed, 1.0, 0.1, 0.0, CFG)
    assert accel == pytest.approx(-COMFORT)
    assert (steer != 0.0) == steers


@pytest.mark.parametrize("speed", [5.0, 15.0, 30.0])
def test_lane_keeping_converges_in_a_kinematic_bicycle(speed: float) -> None:
    """Start 1.5 m off-centre, heading away: the P controller brings the car back without leaving the lane."""
    wheelbase, dt = 2.7, 0.01
    y, psi, v = 1.5, 0.05, speed
    max_abs_y = abs(y)
    for _ in range(int(20.0 / dt)):
        steer = max(min(fallback_command(v, y, psi, 0.0, CFG)[1], 0.35), -0.35)
        y += v * math.sin(psi) * dt
        psi += v / wheelbase * math.tan(steer) * dt
        max_abs_y = max(max_abs_y, abs(y))
    assert max_abs_y < 1.75 + 0.3  # stays within a 3.5 m lane (plus overshoot margin)
    assert abs(y) < 0.2 and abs(psi) < 0.02
