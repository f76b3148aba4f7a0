"""The AEB on a slippery road: the vehicle's friction estimate scales every deceleration the rules assume.

Sweeps take their points from the config's constants (the dry-road braking, the partial and full triggers),
so a changed threshold moves its sweep; a dry road (friction 1.0) keeps today's verdicts exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from driveloop.core.exceptions import SafetyError
from driveloop.safety import AebConfig, ModelReply, Supervisor, SupervisorInputs, TrackData
from driveloop.safety.aeb import (
    FULL,
    GRAVITY_MPS2,
    NONE,
    PARTIAL,
    assess,
    brake_level,
    friction_scale,
    required_decel_mps2,
    rss_safe_gap_m,
)
from driveloop.safety.types import MIN_ROAD_FRICTION

CFG = AebConfig()
DRY_MU = CFG.full_decel_mps2 / GRAVITY_MPS2  # the friction at which the road gives all the braking the AEB uses
REL = 0.02  # sweep points sit this fraction below and above each threshold


@pytest.mark.parametrize(("mu", "expected"), [
    (DRY_MU * (1 + REL), 1.0), (DRY_MU, 1.0), (1.0, 1.0),
    (DRY_MU * (1 - REL), 1 - REL), (0.4, 0.4 * GRAVITY_MPS2 / CFG.full_decel_mps2),
])
def test_friction_scale(mu: float, expected: float) -> None:
    assert friction_scale(mu, CFG) == pytest.approx(expected)


# A lead 30 m ahead, 10 m/s slower, not braking: TTC 3 s (above both TTC triggers), so the deceleration
# triggers alone decide; the required deceleration is what a slippery road makes large relative to its grip.
EGO, LEAD, GAP = 20.0, 10.0, 30.0
NEED = required_decel_mps2(GAP, EGO, LEAD, EGO - LEAD, 0.0, CFG)


def _mu_at(trigger_mps2: float) -> float:
    """The friction at which ``trigger_mps2`` x friction_scale equals the state's required deceleration."""
    return NEED / trigger_mps2 * CFG.full_decel_mps2 / GRAVITY_MPS2


def test_premise_the_state_is_harmless_on_a_dry_road() -> None:
    assert GAP / (EGO - LEAD) > CFG.partial_ttc_s and NEED < CFG.partial_decel_trigger_mps2
    assert brake_level(GAP, EGO, LEAD, EGO - LEAD, 0.0, CFG)[0] == NONE
    assert _mu_at(CFG.full_decel_trigger_mps2) < _mu_at(CFG.partial_decel_trigger_mps2) < DRY_MU


SWEEP = [
    ("below the full trigger's friction", _mu_at(CFG.full_decel_trigger_mps2) * (1 - REL), FULL),
    ("above the full trigger's friction", _mu_at(CFG.full_decel_trigger_mps2) * (1 + REL), PARTIAL),
    ("below the partial trigger's friction", _mu_at(CFG.partial_decel_trigger_mps2) * (1 - REL), PARTIAL),
    ("above the partial trigger's friction", _mu_at(CFG.partial_decel_trigger_mps2) * (1 + REL), NONE),
    ("dry road", 1.0, NONE),
]


@pytest.mark.parametrize(("name", "mu", "level"), SWEEP, ids=[s[0] for s in SWEEP])
def test_triggers_scale_with_friction(name: str, mu: float, level: int) -> None:
    scale = friction_scale(mu, CFG)
    got, ttc, _, need = brake_level(GAP, EGO, LEAD, EGO - LEAD, 0.0, CFG, scale)
    assert got == level and need == pytest.approx(NEED) and ttc == pytest.approx(GAP / (EGO - LEAD))
    assert assess(GAP, EGO, LEAD, EGO - LEAD, (), False, CFG, friction_mu=mu).level == level


def test_rss_gap_grows_as_grip_falls() -> None:
    rho, a = CFG.response_time_s, CFG.max_accel_response_mps2
    v_after = EGO + rho * a
    for scale in (1.0, 0.5, 0.25):
        expected = (EGO * rho + 0.5 * a * rho * rho + v_after ** 2 / (2 * CFG.min_brake_mps2 * scale)
                    - LEAD ** 2 / (2 * CFG.max_brake_lead_mps2 * scale))
        assert rss_safe_gap_m(EGO, LEAD, CFG, scale) == pytest.approx(expected)
    assert rss_safe_gap_m(EGO, LEAD, CFG) == rss_safe_gap_m(EGO, LEAD, CFG, 1.0)


def test_fcw_comes_earlier_on_a_slippery_road() -> None:
    """A state the warning ignores on a dry road warns once grip falls (the predicted state uses the same scale)."""
    far = GAP + 10.0
    assert not assess(far, EGO, LEAD, EGO - LEAD, (), False, CFG).fcw
    wet = assess(far, EGO, LEAD, EGO - LEAD, (), False, CFG, friction_mu=_mu_at(CFG.partial_decel_trigger_mps2) * 0.8)
    assert wet.fcw


def test_dry_road_is_the_default_everywhere() -> None:
    for gap in (8.0, 15.0, 30.0, 60.0):
        assert assess(gap, EGO, LEAD, EGO - LEAD, (), False, CFG) == assess(gap, EGO, LEAD, EGO - LEAD, (), False, CFG,
                                                                            friction_mu=1.0)


def _inputs(**kw: object) -> SupervisorInputs:
    good = ModelReply(np.array([0.0, 0.0], np.float32), np.array([0.9], np.float32), 0.0)
    base = dict(now_s=0.0, ego_speed_mps=EGO, ego_accel_mps2=0.0, lane_offset_m=0.0, heading_rel_rad=0.0,
                track=TrackData(GAP, EGO - LEAD, LEAD), sensor_stamp_s=0.0, reply=good)
    return SupervisorInputs(**{**base, **kw})  # type: ignore[arg-type]


def test_supervisor_brakes_for_the_road_it_is_told() -> None:
    dry = Supervisor().step(_inputs())
    wet = Supervisor().step(_inputs(road_friction=_mu_at(CFG.full_decel_trigger_mps2) * (1 - REL)))
    assert dry.source == "model" and not dry.aeb
    assert wet.source == "fallback" and wet.aeb and wet.activation and wet.accel_mps2 < 0


@pytest.mark.parametrize("bad", [0.0, MIN_ROAD_FRICTION * 0.9, 1.0 + 1e-9, math.nan, math.inf, True, "1", None])
def test_bad_friction_estimates_are_refused(bad: object) -> None:
    with pytest.raises(SafetyError, match="road_friction"):
        _inputs(road_friction=bad)


@pytest.mark.parametrize("ok", [MIN_ROAD_FRICTION, 0.5, 1.0, 1])
def test_friction_estimates_in_range_are_accepted(ok: float) -> None:
    assert _inputs(road_friction=ok).road_friction == ok


def test_a_cut_in_is_braked_for_on_the_road_it_is_told() -> None:
    """The cut-in path uses the friction estimate too: a car cutting in (side over our marking, moving in) at the
    state above is no hazard on a dry road and one the AEB must brake for on a slippery one."""
    cutter = TrackData(GAP, EGO - LEAD, LEAD, lane_offset_m=CFG.cut_in_offset_m * 0.9,
                       lateral_speed_mps=-CFG.cut_in_lateral_speed_mps * 2)
    dry = Supervisor().step(_inputs(track=None, neighbours=(cutter,)))
    wet = Supervisor().step(_inputs(track=None, neighbours=(cutter,),
                                    road_friction=_mu_at(CFG.full_decel_trigger_mps2) * (1 - REL)))
    assert dry.source == "model" and not dry.aeb
    assert wet.source == "fallback" and wet.aeb and "cut-in" in (wet.reason or "")
