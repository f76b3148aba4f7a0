"""The supervisor and cars cutting in: braked for before they are the lead, the wheel held straight, the most
demanding of lead and cut-ins decides, hysteresis, FCW, and bad neighbours refused (the rule itself is swept in
test_aeb.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from driveloop.core.exceptions import SafetyError
from driveloop.safety import ModelReply, Supervisor, SupervisorInputs, TrackData

from .test_supervisor import CFG, CONF, DT, FALL, FULL, drive, tick


# A neighbour beside the lane corridor whose side is over our marking and moving further in.
def _cutter(gap: float, offset: float, inward: float = 1.0, closing: float = 10.0) -> TrackData:
    """A side track ``offset`` m right of our lane's centre, moving left (in) at ``inward`` m/s."""
    return TrackData(gap, closing, 20.0 - closing, lane_offset_m=-offset, lateral_speed_mps=inward)


def with_neighbours(inputs: SupervisorInputs, *neighbours: TrackData) -> SupervisorInputs:
    return dataclasses.replace(inputs, neighbours=neighbours)


def test_aeb_brakes_for_a_car_cutting_in_before_it_is_the_lead() -> None:
    sup = Supervisor()
    drive(sup, 0, 5)
    over = CFG.aeb.cut_in_offset_m - 0.1  # its side is over our marking
    d = sup.step(with_neighbours(tick(5), _cutter(8.0, over)))
    assert d.aeb and d.activation and d.source == "fallback"
    assert d.reason is not None and d.reason.startswith("aeb full cut-in: ttc=0.80 s")
    assert d.parts["cut_in_gap_m"] == 8.0 and d.parts["aeb_decel_mps2"] == pytest.approx(FULL)
    need = 100.0 / (2.0 * (8.0 - CFG.aeb.standstill_gap_m - 10.0 * CFG.aeb.actuation_delay_s))
    assert d.parts["cut_in_required_decel_mps2"] == pytest.approx(need)
    assert "gap_m" not in d.parts  # no lead
    assert d.accel_mps2 == pytest.approx(max(1.5 - FALL, -FULL))


def test_a_neighbour_that_is_not_cutting_in_is_left_alone() -> None:
    over, outside = CFG.aeb.cut_in_offset_m - 0.1, CFG.aeb.cut_in_offset_m + 0.1
    slow = CFG.aeb.cut_in_lateral_speed_mps / 2
    for side in (_cutter(8.0, outside), _cutter(8.0, over, inward=-1.0), _cutter(8.0, over, inward=slow)):
        d = Supervisor().step(with_neighbours(tick(0), side))
        assert d.source == "model" and not d.aeb and "cut_in_gap_m" not in d.parts, side


def test_the_wheel_is_held_straight_while_braking_for_a_cut_in() -> None:
    """Lane keeping would steer back towards the lane's centre: into the car coming from that side."""
    sup = Supervisor()
    drive(sup, 0, 5)  # the model steers 0.02 rad; the car is 0.5 m left of centre (tick())
    cutting = [sup.step(with_neighbours(tick(i), _cutter(30.0 - 2 * i, CFG.aeb.cut_in_offset_m - 0.1)))
               for i in range(5, 8)]
    assert all(d.aeb for d in cutting)
    step = CFG.limits.max_steer_rate_radps * DT
    assert [d.steering_rad for d in cutting] == pytest.approx([max(0.02 - step * k, 0.0) for k in (1, 2, 3)])
    lead = Supervisor()  # braking for a lead, the fallback keeps its lane keeping (steers right, to the centre)
    drive(lead, 0, 5)
    d = lead.step(tick(5, track=TrackData(8.0, 10.0, 10.0)))
    assert d.aeb and d.steering_rad < 0.0


def test_the_most_demanding_of_lead_and_cut_in_decides() -> None:
    over = CFG.aeb.cut_in_offset_m - 0.1
    near_lead = Supervisor().step(with_neighbours(tick(0, track=TrackData(6.0, 10.0, 10.0)), _cutter(40.0, over)))
    assert near_lead.aeb and near_lead.reason.startswith("aeb full: ")  # type: ignore[union-attr]
    assert near_lead.parts["cut_in_gap_m"] == 40.0 and near_lead.parts["gap_m"] == 6.0
    near_cut_in = Supervisor().step(with_neighbours(tick(0, track=TrackData(60.0, 0.0, 20.0)), _cutter(6.0, over)))
    assert near_cut_in.aeb and near_cut_in.reason.startswith("aeb full cut-in: ")  # type: ignore[union-attr]
    two = Supervisor().step(with_neighbours(tick(0), _cutter(40.0, over), _cutter(6.0, over)))
    assert two.parts["cut_in_gap_m"] == 6.0  # the more demanding of two cutting in
    tie = Supervisor().step(with_neighbours(tick(0), _cutter(5.0, over), _cutter(6.0, over)))  # both full braking
    assert tie.parts["cut_in_gap_m"] == 5.0  # a tie keeps the first (perception lists the nearest first)
    both_full = Supervisor().step(with_neighbours(tick(0, track=TrackData(6.0, 10.0, 10.0)), _cutter(5.0, over)))
    assert both_full.reason.startswith("aeb full: ")  # type: ignore[union-attr]  # a tie: the lead decides
    assert both_full.steering_rad < 0.0  # and the fallback keeps its lane keeping


def test_the_partial_stage_for_a_cut_in_yields_to_a_model_that_brakes_enough() -> None:
    side = _cutter(60.0, CFG.aeb.cut_in_offset_m - 0.1, closing=20.0)  # partial stage: 3.92 m/s^2 required
    need = 400.0 / (2.0 * (58.0 - 20.0 * CFG.aeb.actuation_delay_s))
    hard = ModelReply(np.array([-CFG.aeb.brake_gain * need - 0.1, 0.0], np.float32), CONF, 0.0)
    d = Supervisor().step(with_neighbours(tick(0, reply=hard, accel=-6.0), side))
    assert d.source == "model" and not d.aeb and d.fcw
    soft = ModelReply(np.array([-CFG.aeb.brake_gain * need + 0.1, 0.0], np.float32), CONF, 0.0)
    d = Supervisor().step(with_neighbours(tick(0, reply=soft, accel=-5.0), side))
    assert d.aeb and d.reason.startswith("aeb partial cut-in: ")  # type: ignore[union-attr]


@pytest.mark.parametrize(("bad", "message"), [
    (TrackData(math.nan, 0.0, 0.0), "supervisor input neighbours[0].gap_m=nan must be a finite number"),
    (TrackData(1.0, 0.0, 0.0, lane_offset_m=math.inf), "supervisor input neighbours[0].lane_offset_m=inf must be a "
                                                       "finite number"),
    (TrackData(1.0, 0.0, 0.0, lateral_speed_mps=math.nan), "supervisor input neighbours[0].lateral_speed_mps=nan "
                                                           "must be a finite number"),
    (object(), "supervisor input neighbours[0].gap_m=None must be a finite number"),
])
def test_bad_neighbours_raise_safety_error(bad: object, message: str) -> None:
    with pytest.raises(SafetyError) as info:
        dataclasses.replace(tick(0), neighbours=(bad,))  # type: ignore[arg-type]
    assert str(info.value) == message


def test_a_cut_in_warns_even_when_the_lead_decides() -> None:
    """FCW for a car cutting in that needs no braking yet, behind a lead that needs none either."""
    side = _cutter(38.0, CFG.aeb.cut_in_offset_m - 0.1, closing=12.0)  # no brake stage yet, one a second ahead
    quiet_lead = TrackData(80.0, 0.0, 20.0)
    alone = Supervisor().step(with_neighbours(tick(0), side))
    assert alone.fcw and not alone.aeb and alone.source == "model"
    behind_a_lead = Supervisor().step(with_neighbours(tick(0, track=quiet_lead), side))
    assert behind_a_lead.fcw and not behind_a_lead.aeb and behind_a_lead.reason == "fcw"
    assert not Supervisor().step(tick(0, track=quiet_lead)).fcw


def test_braking_for_a_cut_in_holds_with_hysteresis() -> None:
    """Once braking, a cut-in that needs less than the trigger (but more than the release) keeps the brake on."""
    over = CFG.aeb.cut_in_offset_m - 0.1
    hold = (CFG.aeb.release_decel_mps2 + CFG.aeb.partial_decel_trigger_mps2) / 2
    room = 400.0 / (2.0 * hold)  # a stationary car: the gap at which exactly ``hold`` is required
    gap = room + CFG.aeb.standstill_gap_m + 20.0 * CFG.aeb.actuation_delay_s
    mild = _cutter(gap, over, closing=20.0)
    assert not Supervisor().step(with_neighbours(tick(0), mild)).aeb  # alone: below the trigger
    sup = Supervisor()
    assert sup.step(with_neighbours(tick(0), _cutter(8.0, over))).aeb
    held = sup.step(with_neighbours(tick(1), mild))
    assert held.aeb and held.parts["cut_in_required_decel_mps2"] == pytest.approx(hold)
