"""The headway floor: its cap swept around the floor from the config's constants, its place in the supervisor
(only lowers the model's request, comfort jerk, never a fallback, silent above the floor or while the fallback
drives), property-tested against the supervisor without it, and the closed loop it exists for: a model that
tailgates at 0.6 s behind a lead that becomes a wreck collides without the floor and not with it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driveloop.safety import ModelReply, Supervisor, SupervisorConfig, SupervisorInputs, SupervisorState, TrackData, step
from driveloop.safety.config import HeadwayConfig
from driveloop.safety.headway import NO_CAP_MPS2, floor_gap_m, headway_cap_mps2

from ._harness import (
    NO_FLOOR,
    TAILGATE_HEADWAY_S,
    UNDER_MUTMUT,
    Case,
    idm_model,
    run,
    tailgater_model,
)

CFG = SupervisorConfig()
HW = CFG.headway
DT = 0.1
RISE = CFG.limits.max_jerk_mps3 * DT  # the comfort jerk per tick: the floor never brakes faster
CONF = np.array([0.9], np.float32)
EXAMPLES = 50 if UNDER_MUTMUT else 500


def _cap_at(speed: float, gap: float, config: HeadwayConfig = HW) -> float:
    return headway_cap_mps2(speed, TrackData(gap, 0.0, speed), config)


# -- the cap itself ----------------------------------------------------------------------------------------------
def test_the_floor_is_standstill_plus_time_gap_times_speed() -> None:
    assert floor_gap_m(0.0, HW) == HW.standstill_gap_m
    assert floor_gap_m(20.0, HW) == pytest.approx(HW.standstill_gap_m + HW.time_gap_s * 20.0)
    assert floor_gap_m(-3.0, HW) == HW.standstill_gap_m  # a negative speed counts as standing


def test_a_floor_under_a_metre_still_caps() -> None:
    """Only a floor of 0 (both distances 0) is off: a short standstill gap at walking pace still holds the model."""
    short = HeadwayConfig(time_gap_s=1.0, standstill_gap_m=0.3, gain_mps2=3.0)
    assert floor_gap_m(0.5, short) == pytest.approx(0.8)
    assert _cap_at(0.5, 0.4, short) == pytest.approx(-3.0 * 0.4 / 0.8)
    assert _cap_at(0.5, 0.8, short) == NO_CAP_MPS2
    assert _cap_at(0.0, 0.0, HeadwayConfig(time_gap_s=1.0, standstill_gap_m=0.0, gain_mps2=3.0)) == NO_CAP_MPS2


@pytest.mark.parametrize("speed", [0.0, 5.0, 17.5, 30.0])
@pytest.mark.parametrize("fraction", [1.5, 1.0 + 1e-9, 1.0, 1.0 - 1e-9, 0.9, 0.5, 0.1, 0.0, -0.5])
def test_cap_sweep_around_the_floor(speed: float, fraction: float) -> None:
    """Gap as a fraction of the floor: no cap at or above it, -gain x shortfall/floor below, at most -gain."""
    floor = floor_gap_m(speed, HW)
    cap = _cap_at(speed, fraction * floor)
    if fraction >= 1.0:
        assert cap == NO_CAP_MPS2
    else:
        assert cap == pytest.approx(-HW.gain_mps2 * min(1.0 - fraction, 1.0))
        assert -HW.gain_mps2 <= cap < 0.0


def test_no_lead_no_cap() -> None:
    assert headway_cap_mps2(20.0, None, HW) == NO_CAP_MPS2


@pytest.mark.parametrize("gap", [5.0, 0.1, 0.0, -1.0])
def test_a_disabled_floor_never_caps(gap: float) -> None:
    off = HeadwayConfig(time_gap_s=0.0, standstill_gap_m=0.0)
    assert _cap_at(20.0, gap, off) == NO_CAP_MPS2


@pytest.mark.parametrize(("field", "value"), [("time_gap_s", 2.0), ("standstill_gap_m", 10.0), ("gain_mps2", 6.0)])
def test_each_field_moves_the_cap(field: str, value: float) -> None:
    """A changed constant changes the answer (the sweep above follows the config, not numbers copied here)."""
    changed = dataclasses.replace(HW, **{field: value})
    gap = 0.9 * floor_gap_m(15.0, HW)
    assert _cap_at(15.0, gap, changed) < _cap_at(15.0, gap, HW)


# -- in the supervisor -------------------------------------------------------------------------------------------
def _inputs(i: int, accel: float, gap: float | None, speed: float = 17.5, enabled: bool = True,
            closing: float = 0.0) -> SupervisorInputs:
    now = round(i * DT, 10)
    track = None if gap is None else TrackData(gap, closing, max(speed - closing, 0.0))
    return SupervisorInputs(now_s=now, ego_speed_mps=speed, ego_accel_mps2=0.0, lane_offset_m=0.0,
                            heading_rel_rad=0.0, track=track, sensor_stamp_s=now,
                            reply=ModelReply(np.array([accel, 0.0], np.float32), CONF, now), model_enabled=enabled)


def test_below_the_floor_the_model_is_capped_at_the_comfort_jerk_without_an_intervention() -> None:
    speed = 17.5
    floor = floor_gap_m(speed, HW)
    gap = TAILGATE_HEADWAY_S * speed + HW.standstill_gap_m
    cap = -HW.gain_mps2 * (floor - gap) / floor
    sup = Supervisor()
    decisions = [sup.step(_inputs(i, 1.5, gap, speed)) for i in range(12)]
    assert all(d.source == "model" and not d.activation and not d.aeb for d in decisions)
    assert [round(d.accel_mps2, 6) for d in decisions] == pytest.approx([max(-RISE * k, cap) for k in range(1, 13)])
    first = decisions[0]
    assert first.parts["headway_cap_mps2"] == pytest.approx(cap)
    assert first.parts["headway_floor_m"] == pytest.approx(floor)
    assert first.reason == (f"headway floor: gap {gap:.2f} m < {floor:.2f} m, accel capped at {cap:.2f} m/s^2")


def test_above_the_floor_the_supervisor_is_unchanged() -> None:
    speed = 17.5
    gap = 1.01 * floor_gap_m(speed, HW)
    with_floor, without = Supervisor(), Supervisor(NO_FLOOR)
    for i in range(10):
        a, b = with_floor.step(_inputs(i, 1.5, gap, speed)), without.step(_inputs(i, 1.5, gap, speed))
        assert a == b and "headway_cap_mps2" not in a.parts and a.reason is None


def test_a_request_below_the_cap_is_reported_but_left_alone() -> None:
    """The model already brakes harder than the floor asks: the command is the model's, no reason is given."""
    speed = 17.5
    gap = 0.9 * floor_gap_m(speed, HW)
    d = Supervisor().step(_inputs(0, -2.0, gap, speed))
    ref = Supervisor(NO_FLOOR).step(_inputs(0, -2.0, gap, speed))
    assert d.accel_mps2 == ref.accel_mps2 and d.reason is None
    assert d.parts["headway_cap_mps2"] == pytest.approx(-HW.gain_mps2 * 0.1)


def test_the_floor_leaves_the_fallback_alone() -> None:
    """With the model disabled the fallback drives: no cap, no headway parts, the same command as without it."""
    gap = 0.3 * floor_gap_m(17.5, HW)
    a, b = Supervisor(), Supervisor(NO_FLOOR)
    for i in range(5):
        da, db = a.step(_inputs(i, 1.5, gap, enabled=False)), b.step(_inputs(i, 1.5, gap, enabled=False))
        assert da == db and da.source == "fallback" and "headway_cap_mps2" not in da.parts


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(speed=st.floats(0.0, 40.0), gap=st.floats(0.5, 120.0), closing=st.floats(-10.0, 10.0),
       accel=st.floats(-8.0, 3.0), prev=st.floats(-9.0, 3.0), enabled=st.booleans())
def test_the_floor_only_ever_lowers_the_command_and_never_activates(speed: float, gap: float, closing: float,
                                                                     accel: float, prev: float,
                                                                     enabled: bool) -> None:
    state = SupervisorState(last_now_s=0.0, prev_accel_mps2=prev)
    inputs = _inputs(1, accel, gap, speed, enabled, closing)
    _, with_floor = step(state, inputs, CFG)
    _, without = step(state, inputs, NO_FLOOR)
    assert with_floor.accel_mps2 <= without.accel_mps2 + 1e-12
    assert (with_floor.source, with_floor.activation, with_floor.aeb, with_floor.fcw) == \
        (without.source, without.activation, without.aeb, without.fcw)
    assert with_floor.accel_mps2 >= min(without.accel_mps2, prev - RISE) - 1e-9  # comfort jerk, never emergency
    if gap >= floor_gap_m(speed, HW) or not enabled or without.source == "fallback":
        assert with_floor == without


# -- the closed loop: tailgating behind a wreck -------------------------------------------------------------------
WRECKS = [  # (ego = lead speed m/s, the wreck's deceleration m/s^2): side-swiped cars stop at 12-17 m/s^2
    (15.0, 15.0),
    (17.5, 15.0),  # the work zone: construction-12-20 at 63 km/h
    (20.0, 12.0),
]


def _wreck(speed: float, decel: float) -> Case:
    """The tailgater at its 0.6 s behind a lead at the same speed that stops at ``decel`` from t = 8 s."""
    return Case(f"wreck-{speed:g}-{decel:g}", speed, speed, HW.standstill_gap_m + TAILGATE_HEADWAY_S * speed,
                lead_decel_mps2=decel, lead_brake_at_s=8.0, duration_s=16.0)


@pytest.mark.parametrize(("speed", "decel"), WRECKS, ids=[f"{s:g}mps-{d:g}" for s, d in WRECKS])
def test_a_tailgater_behind_a_wreck_collides_without_the_floor_and_not_with_it(speed: float, decel: float) -> None:
    case = _wreck(speed, decel)
    without = run(case, tailgater_model, config=NO_FLOOR)
    assert without.collision  # the AEB alone cannot: there is no distance left to brake in
    with_floor = run(case, tailgater_model, keep=True)
    assert not with_floor.collision and with_floor.min_gap_m > 0.5
    before = [d for d, i in zip(with_floor.decisions, with_floor.inputs) if i.now_s < case.lead_brake_at_s]
    assert any("headway_cap_mps2" in d.parts for d in before)  # the floor held it back before the lead braked
    assert with_floor.activations == without.activations == 1  # the AEB's one; the floor is no intervention


@pytest.mark.parametrize("noise", [0.0, 0.5], ids=["clean", "noise0.5"])
def test_the_floor_pulls_a_tailgater_back_without_ever_taking_over(noise: float) -> None:
    speed = 17.5
    case = Case("tailgate", speed, speed, HW.standstill_gap_m + TAILGATE_HEADWAY_S * speed, duration_s=30.0)
    result = run(case, tailgater_model, noise_sigma=noise, seed=3, keep=True)
    assert result.activations == 0 and not result.collision
    assert all(d.source == "model" and not d.aeb for d in result.decisions)
    last_gap = result.inputs[-1].track.gap_m  # type: ignore[union-attr]
    tailgate_gap = case.gap_m
    assert last_gap > tailgate_gap + 0.8 * (floor_gap_m(speed, HW) - tailgate_gap)  # most of the way to the floor


def test_a_competent_follower_never_meets_the_floor() -> None:
    """IDM at 1.5 s behind a steady lead: the floor (1 s) stays silent, so nominal driving is untouched."""
    for speed in (10.0, 20.0, 30.0):
        case = Case("idm", speed, speed, 1.5 * speed + 4.0, duration_s=20.0)
        result = run(case, idm_model, keep=True)
        assert not any("headway_cap_mps2" in d.parts for d in result.decisions), speed
        assert math.isfinite(result.min_gap_m) and not result.collision
