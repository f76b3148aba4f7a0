"""Road-hazard advisories: the caps, their thresholds swept from the config, and the one promise that matters —
with an advisory the command is never above the command without it (property-tested over the whole supervisor)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driveloop.core.exceptions import SafetyError
from driveloop.safety import (
    AdvisoryConfig,
    Advisory,
    ModelReply,
    SupervisorConfig,
    SupervisorInputs,
    SupervisorState,
    TrackData,
    step,
)
from driveloop.safety.advisory import (
    NO_CAP_MPS2,
    accel_cap_mps2,
    allowed_speed_mps,
    gap_cap_mps2,
    speed_cap_mps2,
)
from driveloop.safety.types import MAX_ADVISORY_DISTANCE_M, MAX_ADVISORY_SPEED_MPS, MAX_ADVISORY_TIME_GAP_S

from ._harness import UNDER_MUTMUT, Case, idm_model, run

CFG = AdvisoryConfig()
SUP = SupervisorConfig()
DT = 0.1
CONF = np.array([0.9], np.float32)
EXAMPLES = 50 if UNDER_MUTMUT else 1000


# -- the advisory's own validation ---------------------------------------------------------------------------------
BAD_ADVISORIES = [
    ("negative distance", {"distance_m": -0.1, "speed_mps": 10.0}, "distance_m=-0.1"),
    ("nan distance", {"distance_m": math.nan, "speed_mps": 10.0}, "distance_m=nan"),
    ("inf distance", {"distance_m": math.inf, "speed_mps": 10.0}, "distance_m=inf"),
    ("distance beyond any area", {"distance_m": MAX_ADVISORY_DISTANCE_M * 2, "speed_mps": 10.0}, "distance_m=2000000.0"),
    ("bool distance", {"distance_m": True, "speed_mps": 10.0}, "distance_m=True"),
    ("str distance", {"distance_m": "5", "speed_mps": 10.0}, "distance_m='5'"),
    ("negative speed", {"distance_m": 5.0, "speed_mps": -1.0}, "speed_mps=-1.0"),
    ("speed beyond bound", {"distance_m": 5.0, "speed_mps": MAX_ADVISORY_SPEED_MPS + 1}, "speed_mps=101.0"),
    ("nan speed", {"distance_m": 5.0, "speed_mps": math.nan}, "speed_mps=nan"),
    ("negative gap", {"distance_m": 5.0, "time_gap_s": -0.5}, "time_gap_s=-0.5"),
    ("gap beyond bound", {"distance_m": 5.0, "time_gap_s": MAX_ADVISORY_TIME_GAP_S + 0.5}, "time_gap_s=10.5"),
    ("str gap", {"distance_m": 5.0, "time_gap_s": "2"}, "time_gap_s='2'"),
]


@pytest.mark.parametrize(("name", "kwargs", "field"), BAD_ADVISORIES, ids=[b[0] for b in BAD_ADVISORIES])
def test_a_bad_advisory_is_refused_naming_the_field(name: str, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SafetyError) as info:
        Advisory(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"advisory {field} must be a finite number in [")


def test_an_advisory_needs_a_speed_or_a_gap() -> None:
    with pytest.raises(SafetyError) as info:
        Advisory(distance_m=100.0)
    assert str(info.value) == "an advisory needs a speed, a time gap or both"


GOOD_ADVISORIES = [
    ("at the hazard, standstill", {"distance_m": 0.0, "speed_mps": 0.0}),
    ("farthest", {"distance_m": MAX_ADVISORY_DISTANCE_M, "speed_mps": MAX_ADVISORY_SPEED_MPS}),
    ("gap only, bounds", {"distance_m": 1.0, "time_gap_s": MAX_ADVISORY_TIME_GAP_S}),
    ("zero gap", {"distance_m": 1.0, "time_gap_s": 0.0}),
    ("int values", {"distance_m": 3, "speed_mps": 10, "time_gap_s": 2}),
]


@pytest.mark.parametrize(("name", "kwargs"), GOOD_ADVISORIES, ids=[g[0] for g in GOOD_ADVISORIES])
def test_a_valid_advisory_is_accepted(name: str, kwargs: dict[str, float]) -> None:
    adv = Advisory(**kwargs)
    assert (adv.distance_m, adv.speed_mps, adv.time_gap_s) == (kwargs["distance_m"], kwargs.get("speed_mps"),
                                                               kwargs.get("time_gap_s"))


def test_the_supervisor_refuses_an_advisory_of_another_type() -> None:
    with pytest.raises(SafetyError, match="advisory must be an Advisory or None, got dict"):
        SupervisorInputs(now_s=0.0, ego_speed_mps=1.0, ego_accel_mps2=0.0, lane_offset_m=0.0, heading_rel_rad=0.0,
                         track=None, sensor_stamp_s=0.0, reply=None,
                         advisory={"distance_m": 1.0, "speed_mps": 1.0})  # type: ignore[arg-type]


# -- the speed envelope ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("speed", "distance", "expected"), [
    (10.0, 0.0, 10.0),  # at the hazard: the advised speed itself
    (0.0, 0.0, 0.0),
    (10.0, 100.0, math.sqrt(100.0 + 2 * CFG.plan_decel_mps2 * 100.0)),
    (0.0, 300.0, math.sqrt(2 * CFG.plan_decel_mps2 * 300.0)),
])
def test_allowed_speed_is_the_constant_decel_envelope(speed: float, distance: float, expected: float) -> None:
    assert allowed_speed_mps(speed, distance, CFG) == pytest.approx(expected, abs=1e-12)


def test_allowed_speed_reaches_the_advised_speed_when_braking_at_the_plan_decel() -> None:
    """From the envelope at d, braking at exactly plan_decel arrives at the advised speed at the hazard."""
    v0 = allowed_speed_mps(12.0, 400.0, CFG)
    assert v0 * v0 - 2 * CFG.plan_decel_mps2 * 400.0 == pytest.approx(12.0 ** 2)


def _ego_speeds_around(boundary: float) -> list[float]:
    return [boundary - 1.0, boundary - 1e-6, boundary, boundary + 1e-6, boundary + 1.0]


@pytest.mark.parametrize("distance", [0.0, 50.0, 800.0])
def test_speed_cap_sweeps_from_accelerating_to_the_comfort_floor(distance: float) -> None:
    advised = 14.0
    allowed = allowed_speed_mps(advised, distance, CFG)
    floor_at = allowed + CFG.max_decel_mps2 / CFG.speed_gain_per_s  # beyond this ego speed the floor holds
    for v in _ego_speeds_around(allowed) + _ego_speeds_around(floor_at):
        cap = speed_cap_mps2(advised, distance, v, CFG)
        expected = max(CFG.speed_gain_per_s * (allowed - v), -CFG.max_decel_mps2)
        assert cap == pytest.approx(expected, abs=1e-12)
    assert speed_cap_mps2(advised, distance, allowed - 1.0, CFG) == pytest.approx(CFG.speed_gain_per_s)
    assert speed_cap_mps2(advised, distance, allowed, CFG) == pytest.approx(0.0, abs=1e-12)
    assert speed_cap_mps2(advised, distance, floor_at - 1e-3, CFG) > -CFG.max_decel_mps2
    assert speed_cap_mps2(advised, distance, floor_at + 1.0, CFG) == -CFG.max_decel_mps2
    assert speed_cap_mps2(advised, distance, 100.0, CFG) == -CFG.max_decel_mps2


def test_speed_cap_uses_its_config() -> None:
    gentle = AdvisoryConfig(plan_decel_mps2=0.5, speed_gain_per_s=2.0, max_decel_mps2=1.0)
    allowed = math.sqrt(10.0 ** 2 + 2 * 0.5 * 200.0)
    assert speed_cap_mps2(10.0, 200.0, allowed - 0.25, gentle) == pytest.approx(0.5)
    assert speed_cap_mps2(10.0, 200.0, allowed + 5.0, gentle) == -1.0


# -- the time gap ----------------------------------------------------------------------------------------------------
def test_gap_cap_without_a_lead_does_not_bind() -> None:
    assert gap_cap_mps2(3.0, 20.0, None, CFG) == NO_CAP_MPS2 == math.inf


@pytest.mark.parametrize("time_gap", [1.0, 2.5, 4.0])
def test_gap_cap_sweeps_around_the_wanted_gap(time_gap: float) -> None:
    v = 20.0
    wanted = CFG.standstill_gap_m + time_gap * v
    for gap in (wanted - 1.0, wanted, wanted + 1.0):
        track = TrackData(gap, 0.0, v)
        assert gap_cap_mps2(time_gap, v, track, CFG) == pytest.approx(CFG.gap_gain_per_s2 * (gap - wanted))
    # a lead slower than us tightens the cap by the speed gain
    slower = TrackData(wanted, 2.0, v - 2.0)
    assert gap_cap_mps2(time_gap, v, slower, CFG) == pytest.approx(-2.0 * CFG.gap_speed_gain_per_s)
    faster = TrackData(wanted, -2.0, v + 2.0)
    assert gap_cap_mps2(time_gap, v, faster, CFG) == pytest.approx(2.0 * CFG.gap_speed_gain_per_s)
    # far too close: the comfort floor, never more
    assert gap_cap_mps2(time_gap, v, TrackData(0.5, 10.0, v - 10.0), CFG) == -CFG.max_decel_mps2
    floor_gap = wanted - CFG.max_decel_mps2 / CFG.gap_gain_per_s2
    assert gap_cap_mps2(time_gap, v, TrackData(floor_gap + 1e-3, 0.0, v), CFG) > -CFG.max_decel_mps2
    assert gap_cap_mps2(time_gap, v, TrackData(floor_gap - 1e-3, 0.0, v), CFG) == -CFG.max_decel_mps2


def test_gap_cap_at_standstill_or_reversing_readings_wants_the_standstill_gap() -> None:
    at_gap = TrackData(CFG.standstill_gap_m, 0.0, 0.0)
    assert gap_cap_mps2(3.0, 0.0, at_gap, CFG) == pytest.approx(0.0)
    # a (noisy) negative ego speed is no reason to want a smaller gap than at standstill
    assert gap_cap_mps2(3.0, -1.0, at_gap, CFG) == pytest.approx(CFG.gap_speed_gain_per_s * 1.0)


# -- both ------------------------------------------------------------------------------------------------------------
def test_accel_cap_takes_the_tighter_of_both() -> None:
    track = TrackData(30.0, 0.0, 20.0)
    speed_only = accel_cap_mps2(Advisory(200.0, speed_mps=15.0), 20.0, track, CFG)
    gap_only = accel_cap_mps2(Advisory(200.0, time_gap_s=3.0), 20.0, track, CFG)
    both = accel_cap_mps2(Advisory(200.0, speed_mps=15.0, time_gap_s=3.0), 20.0, track, CFG)
    assert speed_only == pytest.approx(speed_cap_mps2(15.0, 200.0, 20.0, CFG))
    assert gap_only == pytest.approx(gap_cap_mps2(3.0, 20.0, track, CFG))
    assert both == min(speed_only, gap_only)
    assert speed_only != gap_only  # the fixture tells them apart
    loose_gap = accel_cap_mps2(Advisory(0.0, speed_mps=5.0, time_gap_s=0.5), 20.0, TrackData(90.0, 0.0, 20.0), CFG)
    assert loose_gap == -CFG.max_decel_mps2  # here the speed binds


def test_a_gap_only_advisory_without_a_lead_does_not_bind() -> None:
    assert accel_cap_mps2(Advisory(50.0, time_gap_s=3.0), 20.0, None, CFG) == NO_CAP_MPS2


# -- in the supervisor -----------------------------------------------------------------------------------------------
def _inputs(now: float, speed: float, accel_request: float | None, track: TrackData | None = None,
            advisory: Advisory | None = None, enabled: bool = True) -> SupervisorInputs:
    reply = None if accel_request is None else ModelReply(np.array([accel_request, 0.0], np.float32), CONF, now)
    return SupervisorInputs(now_s=now, ego_speed_mps=speed, ego_accel_mps2=0.0, lane_offset_m=0.0,
                            heading_rel_rad=0.0, track=track, sensor_stamp_s=now,
                            reply=reply if reply is not None else ModelReply(None, None, None),
                            model_enabled=enabled, advisory=advisory)


def test_the_supervisor_caps_the_model_at_comfort_jerk_and_reports_the_cap() -> None:
    state = SupervisorState(last_now_s=0.0, prev_accel_mps2=0.0)
    adv = Advisory(0.0, speed_mps=10.0)  # at the hazard at 20 m/s: slow down
    state2, d = step(state, _inputs(0.1, 20.0, 1.5, advisory=adv), SUP)
    assert d.source == "model" and not d.activation and not d.aeb and d.reason is None
    assert d.parts["advisory_cap_mps2"] == -CFG.max_decel_mps2
    assert d.accel_mps2 == pytest.approx(-SUP.limits.max_jerk_mps3 * DT)  # comfort jerk, not the emergency one
    _, d_free = step(state, _inputs(0.1, 20.0, 1.5), SUP)
    assert d_free.accel_mps2 == pytest.approx(SUP.limits.max_jerk_mps3 * DT)
    assert "advisory_cap_mps2" not in d_free.parts
    assert state2.mode == "model"


def test_a_loose_advisory_leaves_the_command_alone() -> None:
    state = SupervisorState(last_now_s=0.0, prev_accel_mps2=0.3)
    adv = Advisory(5000.0, speed_mps=14.0)  # far away: the envelope is far above 20 m/s
    _, with_adv = step(state, _inputs(0.1, 20.0, 0.5, advisory=adv), SUP)
    _, without = step(state, _inputs(0.1, 20.0, 0.5), SUP)
    assert with_adv.accel_mps2 == without.accel_mps2 == pytest.approx(0.5)
    assert with_adv.parts["advisory_cap_mps2"] > 0.5


def test_the_advisory_never_softens_an_aeb_brake() -> None:
    state = SupervisorState(last_now_s=0.0, prev_accel_mps2=0.0)
    wall = TrackData(8.0, 20.0, 0.0)  # a stopped car 8 m ahead at 20 m/s: full braking
    adv = Advisory(1000.0, speed_mps=30.0)
    _, with_adv = step(state, _inputs(0.1, 20.0, 1.0, track=wall, advisory=adv), SUP)
    _, without = step(state, _inputs(0.1, 20.0, 1.0, track=wall), SUP)
    assert with_adv.aeb and without.aeb and with_adv.activation
    assert with_adv.accel_mps2 == without.accel_mps2 == -SUP.aeb.full_decel_mps2


def test_the_advisory_also_caps_the_fallback() -> None:
    """The fallback brakes at comfort already; a tighter gap advisory still wins (min), at comfort jerk."""
    state = SupervisorState(mode="fallback", last_now_s=0.0, prev_accel_mps2=-1.0, fallback_since_s=0.0)
    cfg = SupervisorConfig(advisory=AdvisoryConfig(max_decel_mps2=4.0), fallback=SUP.fallback)
    adv = Advisory(0.0, speed_mps=0.0)
    _, d = step(state, _inputs(0.1, 25.0, None, advisory=adv, enabled=False), cfg)
    _, d_free = step(state, _inputs(0.1, 25.0, None, enabled=False), cfg)
    assert d.source == d_free.source == "fallback"
    assert d.parts["advisory_cap_mps2"] == -4.0
    assert d_free.accel_mps2 == pytest.approx(-1.0 - SUP.limits.max_jerk_mps3 * DT)  # towards comfort 3.0
    assert d.accel_mps2 == pytest.approx(d_free.accel_mps2)  # jerk-limited alike: same tick, same bound
    assert d.accel_mps2 <= d_free.accel_mps2


# -- the property: never above the command without it --------------------------------------------------------------
_speed = st.floats(-1.0, 45.0, allow_nan=False)
_track = st.one_of(st.none(), st.builds(TrackData, st.floats(-5.0, 150.0), st.floats(-20.0, 40.0),
                                        st.floats(0.0, 40.0)))
_advisory = st.one_of(  # a speed (with or without a gap), or a gap alone
    st.builds(Advisory, st.floats(0.0, 5000.0), st.floats(0.0, 40.0),
              st.one_of(st.none(), st.floats(0.0, MAX_ADVISORY_TIME_GAP_S))),
    st.builds(Advisory, st.floats(0.0, 5000.0), st.none(), st.floats(0.0, MAX_ADVISORY_TIME_GAP_S)),
)
_reply = st.one_of(
    st.none(),  # no reply by the deadline
    st.tuples(st.floats(-15.0, 8.0), st.floats(-1.2, 1.2)),  # valid or implausible but finite
    st.just("nan"),
)
_state = st.builds(
    SupervisorState,
    mode=st.sampled_from(["model", "fallback"]),
    last_now_s=st.just(0.0),
    prev_accel_mps2=st.one_of(st.none(), st.floats(-9.0, 3.0)),
    prev_steering_rad=st.floats(-0.35, 0.35),
    aeb_braking=st.booleans(),
    hazard_clear_since_s=st.one_of(st.none(), st.floats(-5.0, 0.0)),
    valid_streak=st.integers(0, 10),
    fallback_since_s=st.one_of(st.none(), st.floats(-5.0, 0.0)),
    lead_history=st.just(()),
    last_gap_m=st.none(),
)


def _reply_of(spec: object, now: float) -> ModelReply:
    if spec is None:
        return ModelReply(None, None, None)
    if spec == "nan":
        return ModelReply(np.array([np.nan, 0.0], np.float32), CONF, now)
    a, s = spec  # type: ignore[misc]
    return ModelReply(np.array([a, s], np.float32), CONF, now)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=_state, speed=_speed, accel=st.floats(-9.0, 3.0), track=_track, reply=_reply, advisory=_advisory,
       enabled=st.booleans(), dt=st.sampled_from([0.05, 0.1, 0.2]))
def test_with_an_advisory_the_command_is_never_above_the_command_without(
        state: SupervisorState, speed: float, accel: float, track: TrackData | None, reply: object,
        advisory: Advisory, enabled: bool, dt: float) -> None:
    def inputs(adv: Advisory | None) -> SupervisorInputs:
        return SupervisorInputs(now_s=dt, ego_speed_mps=speed, ego_accel_mps2=accel, lane_offset_m=0.2,
                                heading_rel_rad=0.0, track=track, sensor_stamp_s=dt, reply=_reply_of(reply, dt),
                                model_enabled=enabled, advisory=adv)

    s_with, d_with = step(state, inputs(advisory), SUP)
    s_without, d_without = step(state, inputs(None), SUP)
    assert d_with.accel_mps2 <= d_without.accel_mps2
    assert d_with.accel_mps2 >= -SUP.limits.max_decel_mps2
    # nothing but the command (and the remembered command) may differ: no hazard, stage or hand-back moves
    assert d_with._replace(accel_mps2=0.0, parts={}) == d_without._replace(accel_mps2=0.0, parts={})
    assert s_with._replace(prev_accel_mps2=0.0) == s_without._replace(prev_accel_mps2=0.0)
    assert d_with.parts["advisory_cap_mps2"] == accel_cap_mps2(advisory, speed, track, SUP.advisory)
    assert {k: v for k, v in d_with.parts.items() if k != "advisory_cap_mps2"} == d_without.parts


@settings(max_examples=EXAMPLES // 10, deadline=None)
@given(steps=st.lists(st.tuples(_speed, _track, _reply, _advisory), min_size=2, max_size=20))
def test_over_a_sequence_the_advised_command_stays_at_or_below_the_free_one(
        steps: list[tuple[float, TrackData | None, object, Advisory]]) -> None:
    """Same inputs tick by tick, only the advisory differs: each advised command is at or below the free one,
    also after the jerk limit has remembered the lower commands (the limits are monotone in their memory)."""
    s_with = s_without = SupervisorState()
    for i, (speed, track, reply, adv) in enumerate(steps):
        now = round((i + 1) * DT, 9)

        def inputs(a: Advisory | None) -> SupervisorInputs:
            return SupervisorInputs(now_s=now, ego_speed_mps=speed, ego_accel_mps2=0.0, lane_offset_m=0.0,
                                    heading_rel_rad=0.0, track=track, sensor_stamp_s=now,
                                    reply=_reply_of(reply, now), advisory=a)

        s_with, d_with = step(s_with, inputs(adv), SUP)
        s_without, d_without = step(s_without, inputs(None), SUP)
        assert d_with.accel_mps2 <= d_without.accel_mps2 + 1e-12
        assert (d_with.source, d_with.aeb, d_with.activation) == (d_without.source, d_without.aeb,
                                                                  d_without.activation)


# -- closed loop: the jam tail beyond sensor range -----------------------------------------------------------------
JAM = Case("jam-tail", ego_speed_mps=30.0, lead_speed_mps=0.0, gap_m=800.0, duration_s=60.0)
RANGE_M = 100.0
MARGIN_M = 150.0  # the hazard is placed this far before the jam's last car (where a vehicle should be slow)


def _jam_advisory(x_m: float) -> Advisory | None:
    hazard_x = JAM.gap_m - MARGIN_M
    return Advisory(max(hazard_x - x_m, 0.0), speed_mps=14.0) if x_m <= JAM.gap_m else None


def test_without_the_advisory_a_jam_beyond_sensor_range_needs_the_aeb() -> None:
    result = run(JAM, idm_model, sensor_range_m=RANGE_M, keep=True)
    assert not result.collision
    assert result.activations >= 1 and result.first_brake_s is not None
    assert min(d.accel_mps2 for d in result.decisions) <= -SUP.aeb.partial_decel_mps2


def test_with_the_advisory_the_vehicle_slows_smoothly_and_the_aeb_stays_quiet() -> None:
    result = run(JAM, idm_model, sensor_range_m=RANGE_M, keep=True, advisory=_jam_advisory)
    assert not result.collision and result.activations == 0 and result.first_brake_s is None
    assert all(not d.aeb for d in result.decisions)
    assert min(d.accel_mps2 for d in result.decisions) >= -CFG.max_decel_mps2 - 1e-9
    # at the hazard point it drives at most a little above the advised speed (the envelope's P-law lags)
    at_hazard = [i.ego_speed_mps for i in result.inputs if i.advisory is not None and i.advisory.distance_m == 0.0]
    assert at_hazard and at_hazard[0] <= 14.0 + CFG.plan_decel_mps2 / CFG.speed_gain_per_s + 0.5
    assert result.min_gap_m >= SUP.aeb.standstill_gap_m
