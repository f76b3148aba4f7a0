"""Automatic emergency braking: time-to-collision, the RSS safe distance and the required deceleration.

Rules (all pure functions of one tick's numbers):
- TTC = gap / closing speed; no hazard (``TTC_MAX_S``) when the gap is opening.
- RSS safe longitudinal distance (Shalev-Shwartz et al. 2017, Def. 1) for the ego behind its lead.
- Required deceleration: the least constant ego deceleration, starting after the actuation delay, that
  keeps ``standstill_gap_m`` to a lead that keeps braking at its estimated deceleration.
- Stages: *partial* braking when inside the RSS distance with TTC below ``partial_ttc_s`` or when the
  required deceleration passes ``partial_decel_trigger_mps2``; *full* braking below ``full_ttc_s`` or
  above ``full_decel_trigger_mps2``. Once braking, AEB holds until the hazard has clearly gone
  (hysteresis: required deceleration below ``release_decel_mps2`` and TTC above ``release_ttc_s``).
- The partial stage yields to a model that already brakes with margin (at least ``brake_gain`` x the
  required deceleration), as a real AEB yields to a driver who brakes; the full stage never yields.
- FCW is the brake condition evaluated on the state predicted ``fcw_lead_time_s`` ahead, so at a
  steady closing speed the warning always precedes the brake by that time (UN R152: >= 0.8 s).
- Cut-ins: an object beside the lane corridor counts as a lead from the first frame its side is over our
  lane's marking (centre within ``cut_in_offset_m`` of our lane's centre) while it moves further in at
  ``cut_in_lateral_speed_mps`` or more; perception puts it in the corridor only once its centre is there,
  which for a slow cut-in is seconds later. It has no speed history yet, so no lead deceleration.
- Road friction: the thresholds above are for a dry road, where the car brakes at ``full_decel_mps2``. On a
  road of friction coefficient mu it brakes at most mu x g, so every deceleration the rules assume (RSS
  braking of ego and lead, the partial and full triggers) shrinks by ``friction_scale`` (mu x g over
  ``full_decel_mps2``, at most 1): the same share of the braking that is left triggers the same stage, and
  braking starts earlier. The vehicle's friction estimate is an input (1.0: dry, today's behaviour exactly).
"""

from __future__ import annotations

from typing import NamedTuple

from .config import AebConfig

GRAVITY_MPS2 = 9.81
TTC_MAX_S = 99.0  # reported when nothing closes in; keeps parts finite and JSON-safe
REQ_DECEL_MAX_MPS2 = 99.0  # reported when no deceleration can avoid the lead any more
STOPPED_LEAD_MPS = 0.1  # below this the lead is standing and cannot brake further

NONE, PARTIAL, FULL = 0, 1, 2


class AebAssessment(NamedTuple):
    """One tick's AEB verdict: warning, brake stage and the deceleration to command.

    Immutable; a NamedTuple because one is built every tick a track exists (cheaper than a frozen dataclass).
    """

    fcw: bool
    level: int  # NONE, PARTIAL or FULL
    decel_mps2: float  # deceleration AEB asks for (0 when not braking)
    ttc_s: float
    rss_safe_gap_m: float
    required_decel_mps2: float
    lead_decel_mps2: float


def time_to_collision_s(gap_m: float, closing_speed_mps: float) -> float:
    """Seconds until contact at the current closing speed; TTC_MAX_S when the gap is not closing."""
    if gap_m <= 0.0:
        return 0.0
    if closing_speed_mps <= 0.0:
        return TTC_MAX_S
    return min(gap_m / closing_speed_mps, TTC_MAX_S)


def friction_scale(friction_mu: float, config: AebConfig) -> float:
    """Share of the dry-road braking (``full_decel_mps2``) a road of friction ``friction_mu`` allows, in (0, 1]."""
    return min(1.0, friction_mu * GRAVITY_MPS2 / config.full_decel_mps2)


def rss_safe_gap_m(ego_speed_mps: float, lead_speed_mps: float, config: AebConfig, scale: float = 1.0) -> float:
    """RSS minimal safe longitudinal distance for the ego (rear) behind the lead (front), >= 0; both brake at
    ``scale`` x their dry-road rates (``friction_scale``)."""
    rho = config.response_time_s
    v_r = max(ego_speed_mps, 0.0)
    v_f = max(lead_speed_mps, 0.0)
    v_after = v_r + rho * config.max_accel_response_mps2
    gap = (
        v_r * rho
        + 0.5 * config.max_accel_response_mps2 * rho * rho
        + v_after * v_after / (2.0 * config.min_brake_mps2 * scale)
        - v_f * v_f / (2.0 * config.max_brake_lead_mps2 * scale)
    )
    return max(gap, 0.0)


def required_decel_mps2(
    gap_m: float,
    ego_speed_mps: float,
    lead_speed_mps: float,
    closing_speed_mps: float,
    lead_decel_mps2: float,
    config: AebConfig,
) -> float:
    """Least ego deceleration (after the actuation delay) that keeps the standstill gap, >= 0.

    Two ways to hit the lead: while both still move (relative motion, D1) or after both have stopped
    (stopping distances, D2). When D2 is at most the lead's deceleration the relative speed never turns
    round before the lead stops, so D2 alone decides; otherwise the larger of both is safe.
    """
    v_e = max(ego_speed_mps, 0.0)
    v_l = max(lead_speed_mps, 0.0)
    a_l = lead_decel_mps2 if v_l > STOPPED_LEAD_MPS else 0.0
    v_c = min(closing_speed_mps, v_e)  # a lead that does not reverse cannot close faster than the ego moves
    t_r = config.actuation_delay_s
    margin = gap_m - config.standstill_gap_m

    v_rel = v_c + a_l * t_r
    d_eff = margin - v_c * t_r - 0.5 * a_l * t_r * t_r
    if v_rel <= 0.0:
        d1 = a_l
    elif d_eff <= 0.0:
        d1 = REQ_DECEL_MAX_MPS2
    else:
        d1 = a_l + v_rel * v_rel / (2.0 * d_eff)
    if a_l <= 0.0:
        return min(max(d1, 0.0), REQ_DECEL_MAX_MPS2)

    available = margin + v_l * v_l / (2.0 * a_l) - v_e * t_r
    if v_e <= 0.0:
        d2 = 0.0
    elif available <= 0.0:
        d2 = REQ_DECEL_MAX_MPS2
    else:
        d2 = v_e * v_e / (2.0 * available)
    needed = d2 if d2 <= a_l else max(d1, d2)
    return min(needed, REQ_DECEL_MAX_MPS2)


def lead_decel_mps2(history: tuple[tuple[float, float], ...], config: AebConfig) -> float:
    """Lead deceleration (>= 0) as minus the least-squares slope of its recent (time, speed) samples.

    Zero until the window is full: a regression over fewer samples amplifies sensor noise.
    """
    n = len(history)
    if n < config.lead_decel_window_ticks:
        return 0.0
    mean_t = sum(t for t, _ in history) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in history)
    if var_t <= 0.0:
        return 0.0
    slope = sum((t - mean_t) * v for t, v in history) / var_t  # centring t alone suffices
    return max(-slope, 0.0)


def predict(gap_m: float, lead_speed_mps: float, closing_speed_mps: float, lead_decel_mps2: float,
            horizon_s: float) -> tuple[float, float, float]:
    """(gap_m, lead_speed_mps, closing_speed_mps) ``horizon_s`` ahead: ego speed held, lead keeps braking
    until it stands (the gap ignores that stop: conservative)."""
    t = horizon_s
    gap = gap_m - closing_speed_mps * t - 0.5 * lead_decel_mps2 * t * t
    lead = max(lead_speed_mps - lead_decel_mps2 * t, 0.0)
    return gap, lead, closing_speed_mps + (lead_speed_mps - lead)


def brake_level(
    gap_m: float, ego_speed_mps: float, lead_speed_mps: float, closing_speed_mps: float,
    lead_decel: float, config: AebConfig, scale: float = 1.0,
) -> tuple[int, float, float, float]:
    """Brake stage for one state: (level, ttc_s, rss_safe_gap_m, required_decel_mps2); ``scale`` is the
    road's ``friction_scale`` (the deceleration triggers and RSS braking shrink with it)."""
    ttc = time_to_collision_s(gap_m, closing_speed_mps)
    rss = rss_safe_gap_m(ego_speed_mps, lead_speed_mps, config, scale)
    need = required_decel_mps2(gap_m, ego_speed_mps, lead_speed_mps, closing_speed_mps, lead_decel, config)
    if ttc <= config.full_ttc_s or need >= config.full_decel_trigger_mps2 * scale:
        return FULL, ttc, rss, need
    if (ttc <= config.partial_ttc_s and gap_m < rss) or need >= config.partial_decel_trigger_mps2 * scale:
        return PARTIAL, ttc, rss, need
    return NONE, ttc, rss, need


def assess(
    gap_m: float, ego_speed_mps: float, lead_speed_mps: float, closing_speed_mps: float,
    history: tuple[tuple[float, float], ...], was_braking: bool, config: AebConfig, friction_mu: float = 1.0,
) -> AebAssessment:
    """AEB verdict for this tick, given the lead's speed history, whether AEB braked last tick and the
    vehicle's estimate of the road's friction coefficient (1.0: dry)."""
    a_l = lead_decel_mps2(history, config)
    scale = friction_scale(friction_mu, config)
    closing = min(closing_speed_mps, max(ego_speed_mps, 0.0))  # a lead cannot close faster than we move
    level, ttc, rss, need = brake_level(gap_m, ego_speed_mps, lead_speed_mps, closing, a_l, config, scale)
    if level == NONE and was_braking and (need >= config.release_decel_mps2 or ttc <= config.release_ttc_s):
        level = PARTIAL  # hysteresis: keep braking until the hazard has clearly gone
    ahead = predict(gap_m, lead_speed_mps, closing, a_l, config.fcw_lead_time_s)
    level_ahead = brake_level(ahead[0], ego_speed_mps, ahead[1], ahead[2], a_l, config, scale)[0]
    if level == FULL:
        decel = config.full_decel_mps2
    elif level == PARTIAL:
        decel = min(max(config.partial_decel_mps2, config.brake_gain * need), config.full_decel_mps2)
    else:
        decel = 0.0
    return AebAssessment(
        fcw=level > NONE or level_ahead > NONE,
        level=level,
        decel_mps2=decel,
        ttc_s=ttc,
        rss_safe_gap_m=rss,
        required_decel_mps2=need,
        lead_decel_mps2=a_l,
    )


def cutting_in(lateral_from_lane_centre_m: float, lateral_speed_mps: float, config: AebConfig) -> bool:
    """An object beside the lane is cutting in: side over our marking and moving further in fast enough
    (speed towards our lane's centre >= the threshold; one already on the centre line is in our path)."""
    offset = lateral_from_lane_centre_m
    return (abs(offset) <= config.cut_in_offset_m
            and lateral_speed_mps * offset <= -config.cut_in_lateral_speed_mps * abs(offset))


def model_brakes_enough(assessment: AebAssessment, model_accel_mps2: float, config: AebConfig) -> bool:
    """True when AEB's partial stage may leave a valid model in command: it brakes with margin already."""
    return assessment.level == PARTIAL and model_accel_mps2 <= -config.brake_gain * assessment.required_decel_mps2
