"""The ground-truth judge of fallback activations: standard hazard measures, swept across their thresholds."""

from __future__ import annotations

import math

import pytest

from driveloop.sim.truth import HazardCriteria, judge_activation, lateral_hazard, longitudinal_hazard
from driveloop.sim.world import VehicleState, WorldSnapshot
from driveloop.core.exceptions import ConfigError

C = HazardCriteria()


def _snap(*, speed: float = 25.0, lead_gap: float | None = None, lead_speed: float = 25.0, offset: float = 0.0,
          heading: float = 0.0) -> WorldSnapshot:
    ego = VehicleState(0, 0.0, offset, speed, 0.0, heading)
    others = () if lead_gap is None else (VehicleState(1, lead_gap + 5.0, 0.0, lead_speed, 0.0, 0.0),)
    return WorldSnapshot(t_s=0.0, ego=ego, speed_mps=speed, accel_mps2=0.0, steering_rad=0.0, heading_rel_rad=heading,
                         lane_offset_m=offset, set_speed_mps=speed, lane_width_m=4.0, others=others)


@pytest.mark.parametrize(("gap", "lead_speed", "hazard"), [
    (None, 25.0, False),  # free road
    (60.0, 25.0, False),  # 2.4 s headway, not closing
    (30.0, 14.5, False),  # closing 10.5 m/s: TTC 2.86 s
    (20.0, 14.5, True),  # TTC 1.90 s
    (13.0, 25.0, False),  # not closing, 0.52 s headway
    (12.0, 25.0, True),  # not closing, 0.48 s headway: a car cut in too close
])
def test_longitudinal_table(gap: float | None, lead_speed: float, hazard: bool) -> None:
    assert (longitudinal_hazard(_snap(lead_gap=gap, lead_speed=lead_speed), C) is not None) == hazard


def test_ttc_threshold_is_swept_from_below_to_above() -> None:
    closing = 10.0
    for ttc in (1.9, 1.99, 2.01, 2.5):
        snap = _snap(lead_gap=ttc * closing, lead_speed=25.0 - closing)
        got = longitudinal_hazard(snap, C)
        assert (got is not None and "TTC" in got) == (ttc < 2.0), ttc


@pytest.mark.parametrize(("offset", "heading", "hazard"), [
    (0.0, 0.0, False),  # centred, straight
    (0.5, 0.0, False),  # off-centre but not moving out
    (0.9, -0.05, False),  # near the line but heading back in
    (1.05, 0.0, True),  # edge over the marking (half lane 2 m - half car 1 m)
    (-1.2, 0.0, True),
])
def test_lateral_table(offset: float, heading: float, hazard: bool) -> None:
    assert (lateral_hazard(_snap(offset=offset, heading=heading), C) is not None) == hazard


def test_time_to_line_crossing_is_swept_from_below_to_above() -> None:
    speed, offset = 25.0, 0.6  # 0.4 m to the marking
    for tlc in (0.5, 0.95, 1.05, 2.0):
        heading = math.asin(0.4 / tlc / speed)  # lateral speed that reaches the line in tlc seconds
        assert (lateral_hazard(_snap(offset=offset, heading=heading), C) is not None) == (tlc < 1.0), tlc
        assert (lateral_hazard(_snap(offset=-offset, heading=-heading), C) is not None) == (tlc < 1.0), tlc  # mirrored


def test_judge_by_rule_kind() -> None:
    close = _snap(lead_gap=8.0, lead_speed=20.0)
    drifting = _snap(offset=1.1)
    assert judge_activation("aeb", close, C)[0]
    assert not judge_activation("aeb", drifting, C)[0]  # a lane hazard does not justify braking
    assert judge_activation("lane", drifting, C)[0]
    assert not judge_activation("lane", _snap(), C)[0]
    assert judge_activation("watchdog", _snap(), C) == (True, "the model failed (watchdog)")
    assert judge_activation("aeb", None, C) == (False, "no ground truth recorded for this tick")
    with pytest.raises(ConfigError, match="ttc_s"):
        HazardCriteria(ttc_s=0.0)
