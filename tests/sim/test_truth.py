"""The ground-truth judge of fallback activations (standard hazard measures, swept across their thresholds) and
the ground-truth check of cut-ins: avoidable by braking at the vehicle's limits from the first detectable frame."""

from __future__ import annotations

import math

import pytest

from driveloop.sim.truth import (
    BrakingLimits,
    HazardCriteria,
    cut_in_hazard,
    cut_in_truth,
    cutting_in,
    judge_activation,
    lateral_hazard,
    longitudinal_hazard,
)
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


# -- cut-ins ------------------------------------------------------------------------------------------------------
LIMITS = BrakingLimits(max_decel_mps2=9.0, lag_s=0.25, step_s=0.1)
EGO_MPS = 25.0


def _cut_in(gap: float, closing: float, offset: float = 2.9, lateral: float = 1.0, *, ego_offset: float = 0.0,
            heading: float = 0.0, accel: float = 0.0) -> tuple[WorldSnapshot, VehicleState]:
    """A car ``gap`` m ahead (bumpers), ``closing`` m/s slower, its centre ``offset`` m right of the ego lane's
    centre, moving left (in) at ``lateral`` m/s; the ego ``ego_offset`` left of the centre."""
    ego = VehicleState(0, 0.0, ego_offset, EGO_MPS, 0.0, heading)
    cutter = VehicleState(1, gap + 5.0, -offset, EGO_MPS - closing, lateral, 0.0)
    snap = WorldSnapshot(t_s=2.0, ego=ego, speed_mps=EGO_MPS, accel_mps2=accel, steering_rad=0.0,
                         heading_rel_rad=heading, lane_offset_m=ego_offset, set_speed_mps=EGO_MPS, lane_width_m=4.0,
                         others=(cutter,))
    return snap, cutter


def _stopping_m(closing: float, limits: BrakingLimits = LIMITS) -> float:
    """Relative distance the ego needs to shed ``closing``, braking at the limits through the lag (1-D)."""
    v, applied, gone = closing, 0.0, 0.0
    alpha = 1.0 - math.exp(-limits.step_s / limits.lag_s)
    while v > 0:
        applied += (-limits.max_decel_mps2 - applied) * alpha
        gone, v = gone + v * limits.step_s, v + applied * limits.step_s
    return gone


@pytest.mark.parametrize("closing", [5.0, 10.0, 15.0])
def test_avoidable_exactly_when_the_gap_exceeds_the_braking_distance(closing: float) -> None:
    """A car already over the line with the sideways overlap immediate: a rear-end problem, swept across the
    braking distance (same discrete dynamics as the simulator)."""
    need = _stopping_m(closing)
    for gap, avoidable in ((need - 0.05, False), (need + 0.05, True)):
        verdict = cut_in_truth(*_cut_in(gap, closing, offset=1.9), LIMITS)
        assert verdict.avoidable is avoidable, (closing, gap)
        assert verdict.min_gap_m == pytest.approx(gap - need, abs=1e-6)
        assert (verdict.gap_at_detection_m, verdict.closing_at_detection_mps) == pytest.approx((gap, closing))


def test_the_sideways_motion_buys_time() -> None:
    """The same gap is unavoidable when the car is already in the ego's path, avoidable when it is still 0.9 m out
    and slow: it reaches the path 3 s later, when the braking ego has fallen back behind it."""
    need = _stopping_m(10.0)
    assert not cut_in_truth(*_cut_in(need - 1.0, 10.0, offset=1.9), LIMITS).avoidable
    slow = cut_in_truth(*_cut_in(need - 1.0, 10.0, offset=2.9, lateral=0.3), LIMITS)
    assert slow.avoidable and slow.min_gap_m > 0
    fast = cut_in_truth(*_cut_in(need - 1.0, 10.0, offset=2.9, lateral=3.0), LIMITS)
    assert not fast.avoidable


def test_braking_limits_decide() -> None:
    gap = _stopping_m(12.0) + 0.3
    assert cut_in_truth(*_cut_in(gap, 12.0, offset=1.9), LIMITS).avoidable
    weaker = BrakingLimits(max_decel_mps2=8.0, lag_s=0.25, step_s=0.1)
    assert not cut_in_truth(*_cut_in(gap, 12.0, offset=1.9), weaker).avoidable
    laggier = BrakingLimits(max_decel_mps2=9.0, lag_s=0.5, step_s=0.1)
    assert not cut_in_truth(*_cut_in(gap, 12.0, offset=1.9), laggier).avoidable
    accelerating = cut_in_truth(*_cut_in(gap, 12.0, offset=1.9, accel=3.0), LIMITS)  # the brake starts from +3
    assert not accelerating.avoidable


def test_the_ego_keeps_its_heading_while_it_brakes() -> None:
    """Wheel straight: heading away from the car delays the sideways overlap (the braking ego falls further back
    meanwhile), heading towards it brings the overlap forward."""
    gap = _stopping_m(10.0) - 0.5  # the gap closes below zero before the car reaches the path
    base = cut_in_truth(*_cut_in(gap, 10.0, offset=2.9, lateral=0.5), LIMITS)
    away = cut_in_truth(*_cut_in(gap, 10.0, offset=2.9, lateral=0.5, heading=0.02), LIMITS)
    towards = cut_in_truth(*_cut_in(gap, 10.0, offset=2.9, lateral=0.5, heading=-0.02), LIMITS)
    assert towards.min_gap_m < base.min_gap_m < away.min_gap_m


def test_a_car_that_stops_short_of_the_path_is_no_collision() -> None:
    snap, cutter = _cut_in(0.5, 10.0, offset=2.9, lateral=0.0)
    assert not cutting_in(snap, cutter)  # not moving in
    assert cut_in_truth(snap, cutter, LIMITS).avoidable  # and never in the way


@pytest.mark.parametrize(("offset", "lateral", "ahead", "expected"), [
    (3.0 - 0.01, 1.0, True, True),  # side just over the marking (half lane 2 m + half car 1 m)
    (3.0 + 0.01, 1.0, True, False),  # still in its own lane
    (2.5, -1.0, True, False),  # leaving
    (2.5, 0.04, True, False),  # not really moving
    (2.5, 1.0, False, False),  # behind the ego
])
def test_cutting_in_table(offset: float, lateral: float, ahead: bool, expected: bool) -> None:
    snap, cutter = _cut_in(10.0 if ahead else -12.0, 5.0, offset=offset, lateral=lateral)
    assert cutting_in(snap, cutter) is expected
    mirrored = VehicleState(1, cutter.x_m, -cutter.y_m, cutter.vx_mps, -cutter.vy_mps, 0.0)
    assert cutting_in(snap, mirrored) is expected


def test_cutting_in_is_measured_from_the_lane_not_the_ego() -> None:
    snap, cutter = _cut_in(10.0, 5.0, offset=3.1, lateral=1.0, ego_offset=-0.5)  # ego 0.5 m right of centre
    assert cutter.y_m - snap.ego.y_m == pytest.approx(-2.6) and not cutting_in(snap, cutter)  # 2.6 m from the ego
    snap, cutter = _cut_in(10.0, 5.0, offset=2.9, lateral=1.0, ego_offset=0.5)
    assert cutting_in(snap, cutter)


def test_braking_limits_are_validated() -> None:
    for bad in ({"max_decel_mps2": 0.0}, {"step_s": math.nan}, {"lag_s": -0.1}):
        with pytest.raises(ConfigError):
            BrakingLimits(**{"max_decel_mps2": 9.0, "lag_s": 0.25, "step_s": 0.1, **bad})
    assert BrakingLimits(9.0, 0.0, 0.1).lag_s == 0.0  # no lag: the brake acts at once


def test_a_car_cutting_in_justifies_the_aeb() -> None:
    snap, _ = _cut_in(8.0, 5.0, offset=2.5)  # TTC 1.6 s, not yet the lead
    assert longitudinal_hazard(snap, C) is None
    assert cut_in_hazard(snap, C) == "car cutting in: true TTC 1.60 s < 2 s"
    assert judge_activation("aeb", snap, C) == (True, "car cutting in: true TTC 1.60 s < 2 s")
    far, _ = _cut_in(30.0, 5.0, offset=2.5)  # TTC 6 s, 1.4 s headway
    assert not judge_activation("aeb", far, C)[0]
    close, _ = _cut_in(10.0, 0.0, offset=2.5)  # not closing, 0.4 s headway
    assert cut_in_hazard(close, C) == "car cutting in: true headway 0.40 s < 0.5 s"
    alongside, _ = _cut_in(-1.0, -2.0, offset=2.5)  # its rear beside our front, pulling away
    assert alongside.others[0].x_m > 0 and cut_in_hazard(alongside, C) is not None
    in_lane, _ = _cut_in(8.0, 5.0, offset=3.5)
    assert cut_in_hazard(in_lane, C) is None
