"""Hindsight teacher on hand-built ground-truth sequences."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from driveloop.cloud.labeling import LabelerConfig, idm_accel, label_segment, labeler_accuracy
from driveloop.core.exceptions import ConfigError
from tests.fakes.frames import DT, braking_lead, make_frames


def _first(mask: np.ndarray) -> int:
    assert mask.any()
    return int(np.argmax(mask))


def test_braking_lead_label_brakes_before_the_late_model() -> None:
    frames = make_frames(braking_lead())
    labels = label_segment(frames, LabelerConfig())
    model_brakes = _first(frames.model_action[:, 0] < -2.0)
    label_brakes = _first(labels.target_action[:, 0] < -2.0)
    lead_brakes = _first(np.diff(frames.lead_speed_mps) < 0)
    # The teacher saw the lead's future: it brakes before the lead even starts, long before the model.
    assert label_brakes <= lead_brakes
    assert model_brakes - label_brakes >= int(2.0 / DT)
    # and it never asks for more than the configured deceleration
    assert labels.target_action[:, 0].min() >= -LabelerConfig().max_decel_mps2
    assert labels.target_action.dtype == np.float32


def test_model_base_keeps_nominal_frames_and_only_adds_braking() -> None:
    frames = make_frames(braking_lead())
    labels = label_segment(frames, LabelerConfig())
    model = frames.model_action.astype(np.float32)
    assert np.all(labels.target_action[:, 0] <= model[:, 0] + 1e-5)  # hindsight only ever adds braking
    assert np.array_equal(labels.target_action[:, 1], model[:, 1])  # the model's own steering
    lead_brakes = _first(np.diff(frames.lead_speed_mps) < 0)
    early = slice(0, lead_brakes - int(5.0 / DT))  # beyond the horizon and the jerk ramp: nothing to anticipate
    assert np.allclose(labels.target_action[early, 0], model[early, 0], atol=1e-5)
    assert _first(labels.target_action[:, 0] < -2.0) < _first(model[:, 0] < -2.0)
    no_expert = label_segment(make_frames(braking_lead(), expert=False), LabelerConfig(base_action="idm"))
    assert _first(no_expert.target_action[:, 0] < -2.0) <= lead_brakes


def _stationary(gap0_m: float, v0_mps: float, n: int = 60) -> object:
    """An ego at v0 that keeps rolling (the late model), a stopped car gap0 ahead."""
    return make_frames(np.zeros(n), gap0_m=gap0_m, ego_speed0_mps=v0_mps, set_speed_mps=v0_mps, model_react_ttc_s=0.0,
                       aeb_ttc_s=0.0)


def _stop_gap(v: float, a: float, gap0: float, lag: float) -> float:
    """Gap left when an ego at v brakes at a (< 0) after lag, towards a stopped car gap0 ahead."""
    return gap0 - v * lag - v * v / (-2.0 * a)


@pytest.mark.parametrize(("gap0", "v0"), [(60.0, 14.0), (45.0, 12.0), (90.0, 22.0)])
def test_plan_brakes_gently_and_just_enough_for_a_stopped_car(gap0: float, v0: float) -> None:
    from driveloop.cloud.labeling import plan_accel

    c = LabelerConfig(horizon_s=6.0)
    a = float(plan_accel(_stationary(gap0, v0), c)[0])
    assert -c.comfort_decel_mps2 <= a < 0  # comfort braking suffices here
    assert _stop_gap(v0, a, gap0, c.brake_lag_s) >= c.min_gap_m - 0.25  # it stops short of the car (10 Hz steps)
    gentler = a + 2 * c.plan_accel_step_mps2
    assert _stop_gap(v0, gentler, gap0, c.brake_lag_s) < c.min_gap_m + 0.5  # and no earlier than needed


def test_plan_in_a_tight_spot_brakes_as_needed_not_always_at_full_force() -> None:
    from driveloop.cloud.labeling import plan_accel

    c = LabelerConfig()
    v0 = 14.0
    a_tight = float(plan_accel(_stationary(30.0, v0), c)[0])  # comfort stop needs 3.3+ m/s^2: tight
    assert -c.max_decel_mps2 < a_tight <= -c.comfort_decel_mps2
    assert _stop_gap(v0, a_tight, 30.0, c.brake_lag_s) >= c.min_gap_m - 0.05
    assert float(plan_accel(_stationary(8.0, v0), c)[0]) == -c.max_decel_mps2  # nothing avoids it: full braking


def test_plan_is_free_without_traffic_and_monotone_in_the_gap() -> None:
    from driveloop.cloud.labeling import plan_accel

    c = LabelerConfig()
    free = make_frames(np.full(30, 25.0), gap0_m=200.0)
    free = dataclasses.replace(free, lead_gap_m=np.full(30, np.nan))
    assert np.all(plan_accel(free, c) == c.max_accel_mps2)
    plans = [float(plan_accel(_stationary(g, 15.0), c)[0]) for g in (20.0, 30.0, 40.0, 60.0, 90.0, 150.0)]
    assert plans == sorted(plans)  # closer -> at least as much braking


def test_jerk_limit_ramps_into_braking_early_and_releases_slowly() -> None:
    from driveloop.cloud.labeling import jerk_limit

    raw = np.zeros(60)
    raw[30:40] = -6.0
    out = jerk_limit(raw, jerk_mps3=4.0)
    assert np.all(out <= raw + 1e-12)  # only ever more cautious
    assert np.max(np.abs(np.diff(out))) <= 0.4 + 1e-9  # 4 m/s^3 at 10 Hz
    assert out[30] == -6.0 and out[15] == 0.0 and out[20] < 0  # braking starts 1.5 s earlier
    assert out[39] == -6.0 and -6.0 < out[41] < 0  # and is released gradually


@pytest.mark.parametrize("base_action", ["model", "expert", "idm"])
def test_base_action_chooses_what_the_correction_is_added_to(base_action: str) -> None:
    frames = make_frames(braking_lead())
    c = LabelerConfig(base_action=base_action)
    labels = label_segment(frames, c)
    early = slice(0, 30)  # nothing to anticipate yet: the label is the base command itself
    want = {"model": frames.model_action, "expert": frames.expert_action}.get(base_action)
    if want is None:  # present-lead IDM and lane keeping
        present = idm_accel(frames.ego_speed_mps, frames.set_speed_mps, frames.lead_gap_m, frames.lead_speed_mps, c)
        want = np.stack([present, np.zeros(len(frames))], axis=1)
    assert np.allclose(labels.target_action[early], want[early], atol=1e-5)
    with pytest.raises(ConfigError, match="base_action"):
        LabelerConfig(base_action="oracle")


def test_constant_lead_far_ahead_gives_free_road_cruise() -> None:
    frames = make_frames(np.full(60, 25.0), gap0_m=200.0, ego_speed0_mps=20.0, set_speed_mps=25.0)
    labels = label_segment(frames, LabelerConfig())
    assert labels.target_action[0, 0] > 0.5  # below set speed, nothing close: accelerate
    assert not labels.hazard.any()
    assert np.all(np.isinf(labels.time_to_hazard_s))


def test_hindsight_sees_a_cut_in_before_it_happens() -> None:
    frames = make_frames(np.full(100, 25.0), gap0_m=300.0)
    gap = frames.lead_gap_m.copy()
    gap[60:] = 8.0  # a vehicle cuts in 8 m ahead at t = 6 s
    speed = frames.lead_speed_mps.copy()
    speed[60:] = 20.0
    cut = dataclasses.replace(frames, lead_gap_m=gap, lead_speed_mps=speed)
    c = LabelerConfig(horizon_s=2.0, new_lead_anticipation_s=2.0)  # anticipated as far as it looks ahead
    labels = label_segment(cut, c)
    assert labels.target_action[50, 0] < -1.0  # 1 s before the cut-in it already brakes
    assert labels.target_action[0, 0] == pytest.approx(cut.model_action[0, 0])  # but not 6 s before
    assert labels.hazard[50] and 0.9 <= labels.time_to_hazard_s[50] <= 1.1
    # early, not harsh: the plan ahead of the cut-in never asks for more than the comfort deceleration
    assert np.all(labels.target_action[:58, 0] >= -c.comfort_decel_mps2 - 1e-5)


def _merge_at(step: int, gap_m: float = 8.0, speed_mps: float = 20.0, n: int = 100) -> object:
    """25 m/s behind a far lead (300 m); a slower car comes into the lane ``gap_m`` ahead at ``step``."""
    frames = make_frames(np.full(n, 25.0), gap0_m=300.0)
    gap, speed = frames.lead_gap_m.copy(), frames.lead_speed_mps.copy()
    gap[step:], speed[step:] = gap_m, speed_mps
    return dataclasses.replace(frames, lead_gap_m=gap, lead_speed_mps=speed)


def test_lead_runs_break_where_another_vehicle_becomes_the_lead() -> None:
    from driveloop.cloud.labeling import lead_since

    c = LabelerConfig()
    since, limit = lead_since(_merge_at(60), c)
    assert since.tolist() == [0] * 60 + [60] * 40  # the far lead, then the merger
    assert (limit == c.new_lead_anticipation_s).all()
    frames = make_frames(braking_lead(), gap0_m=45.0)  # one lead all along, braking hard: one run
    assert lead_since(frames, c)[0].tolist() == [0] * len(frames)
    gone = dataclasses.replace(frames, lead_gap_m=np.where(np.arange(len(frames)) >= 30, np.nan, frames.lead_gap_m))
    assert lead_since(gone, c)[0][29] == 0 and lead_since(gone, c)[0][30] == 30  # the lead left: a run of none


@pytest.mark.parametrize("anticipation_s", [0.5, 1.0, 2.0])
def test_a_car_coming_into_the_lane_is_anticipated_only_so_long_before(anticipation_s: float) -> None:
    """Up to ``new_lead_anticipation_s`` before a car comes into the lane the label is the model's own command."""
    cut, merge_step = _merge_at(60), 60
    c = LabelerConfig(new_lead_anticipation_s=anticipation_s)
    labels = label_segment(cut, c)
    # before the anticipation and before the jerk limit's ramp into the hardest braking
    ramp_s = c.max_decel_mps2 / c.label_jerk_mps3
    untouched = slice(0, merge_step - round((anticipation_s + ramp_s) / DT))
    assert np.allclose(labels.target_action[untouched, 0], cut.model_action[untouched, 0], atol=1e-5)
    assert labels.target_action[merge_step - 1, 0] < -1.0  # and it does brake just before the merge
    earlier = label_segment(cut, LabelerConfig(new_lead_anticipation_s=4.0))  # the whole horizon (4 s)
    assert _first(earlier.target_action[:, 0] < -0.5) < _first(labels.target_action[:, 0] < -0.5)
    # a lead that is ahead all along is anticipated over the whole horizon, whatever the limit
    stay = make_frames(braking_lead(), gap0_m=45.0)
    assert np.array_equal(label_segment(stay, c).target_action, label_segment(stay, LabelerConfig()).target_action)


def test_a_work_zone_merger_is_anticipated_only_once_it_moves_over() -> None:
    """In a work zone the closing lane's cars merge when the ego comes close (zipper): the teacher anticipates
    them only ``reactive_merge_anticipation_s`` ahead; a cut-in elsewhere over the whole horizon."""
    from driveloop.cloud.labeling import lead_since
    from driveloop.cloud.mining import scenario_kind

    c = LabelerConfig()
    assert scenario_kind("construction-12-20") == "construction" and scenario_kind("odd") == "odd"
    zipper = dataclasses.replace(_merge_at(60), scenario="construction-12-20")
    cut_in = dataclasses.replace(_merge_at(60), scenario="aggressive-9-25")
    assert (lead_since(zipper, c)[1] == c.reactive_merge_anticipation_s).all()
    assert (lead_since(cut_in, c)[1] == c.new_lead_anticipation_s).all()
    as_if = LabelerConfig(new_lead_anticipation_s=c.reactive_merge_anticipation_s)
    assert np.array_equal(label_segment(zipper, c).target_action, label_segment(cut_in, as_if).target_action)
    assert _first(label_segment(cut_in, c).target_action[:, 0] < -0.5) < _first(
        label_segment(zipper, c).target_action[:, 0] < -0.5)
    with pytest.raises(ConfigError, match="reactive_merge_classes"):
        LabelerConfig(reactive_merge_classes=(3,))  # type: ignore[arg-type]


def test_in_fog_a_car_is_anticipated_only_from_when_the_sensors_could_see_it() -> None:
    """The teacher sees the logged ground truth; the vehicle in fog-25 saw nothing beyond 25 m. Braking for a car
    still hidden in the fog would teach braking for the fog itself (the model can tell fog from its sensors)."""
    from driveloop.cloud.labeling import lead_seen, lead_since, sensor_visibility_m
    from driveloop.sim.scenarios import parse_scenario

    visibility = parse_scenario("fog-25").visibility_m
    assert sensor_visibility_m("fog-25") == visibility and math.isinf(sensor_visibility_m("dense"))
    assert math.isinf(sensor_visibility_m("not-a-scenario"))  # an unknown name: nothing known to cut
    # 25 m/s behind a 15 m/s car 80 m ahead: the same drive in fog and in the clear
    fog, clear = (make_frames(np.full(80, 15.0), gap0_m=80.0, scenario=name) for name in ("fog-25", "dense"))
    seen_from = _first(lead_seen(fog))
    assert fog.lead_gap_m[seen_from] <= visibility < fog.lead_gap_m[seen_from - 1]
    assert lead_seen(clear).all()
    c = LabelerConfig()
    since, limit = lead_since(fog, c)
    assert since[seen_from] == seen_from and limit[seen_from] == c.revealed_lead_anticipation_s
    in_fog, in_clear = label_segment(fog, c), label_segment(clear, c)
    ramp_s = c.max_decel_mps2 / c.label_jerk_mps3
    hidden = slice(0, seen_from - round((c.revealed_lead_anticipation_s + ramp_s) / DT))
    assert np.allclose(in_fog.target_action[hidden, 0], fog.model_action[hidden, 0], atol=1e-5)
    assert in_clear.target_action[hidden, 0].min() < -0.5  # in the clear the teacher brakes for it long before
    assert in_fog.target_action[seen_from, 0] <= -c.comfort_decel_mps2 + 1e-5  # once seen it brakes firmly


def test_lane_keeping_steers_back_to_the_centre() -> None:
    frames = make_frames(np.full(30, 25.0), gap0_m=200.0, expert=False)
    off = dataclasses.replace(frames, lane_offset_m=np.full(30, 1.0), heading_rad=np.full(30, 0.02))
    labels = label_segment(off, LabelerConfig(base_action="idm"))  # no logged command to take the steering from
    assert np.all(labels.target_action[:, 1] < 0)  # offset to the left -> steer right
    assert np.all(labels.target_action[:, 1] >= -LabelerConfig().max_steer_rad)


@pytest.mark.parametrize(
    ("name", "gap", "v_lead", "expect"),
    [
        ("free road", np.nan, 0.0, "accelerate"),
        ("no gap", 0.0, 10.0, "full brake"),
        ("far slow lead", 150.0, 20.0, "accelerate"),
        ("close slow lead", 10.0, 5.0, "full brake"),
    ],
)
def test_idm_table(name: str, gap: float, v_lead: float, expect: str) -> None:
    c = LabelerConfig()
    a = float(idm_accel(np.array([20.0]), np.array([30.0]), np.array([gap]), np.array([v_lead]), c)[0])
    if expect == "accelerate":
        assert a > 0, name
    else:
        assert a == pytest.approx(-c.max_decel_mps2), name


def test_accuracy_agrees_with_expert_and_finds_hazards() -> None:
    c = LabelerConfig(base_action="expert")  # nominal labels are the expert's: agreement measures the teacher
    pairs = []
    for i, (v0, brake) in enumerate([(25.0, 5.0), (22.0, 4.0), (28.0, 6.0)]):
        f = make_frames(braking_lead(v0_mps=v0, decel_mps2=brake), ego_speed0_mps=v0, set_speed_mps=v0, segment_id=f"s{i}")
        pairs.append((f, label_segment(f, c)))
    acc = labeler_accuracy(pairs, c)
    assert acc.nominal_frames > 50
    assert acc.expert_agreement >= 0.7
    assert acc.expert_steer_mae_rad == pytest.approx(0.0)
    assert acc.hazard_precision >= 0.9 and acc.hazard_recall >= 0.9
    assert acc.as_dict()["event_frames"] == acc.event_frames > 0


def test_accuracy_detects_a_wrong_teacher() -> None:
    c = LabelerConfig()
    f = make_frames(braking_lead())
    good = label_segment(f, c)
    bad = dataclasses.replace(good, hazard=np.zeros_like(good.hazard), target_action=good.target_action + np.float32(3.0))
    acc = labeler_accuracy([(f, bad)], c)
    assert acc.hazard_recall == 0.0
    assert acc.expert_agreement == 0.0
    assert math.isnan(acc.hazard_precision)


@pytest.mark.parametrize("field", ["horizon_s", "max_decel_mps2", "hazard_ttc_s"])
def test_config_rejects_non_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        LabelerConfig(**{field: 0.0})
