"""AEB rules: worked examples for TTC, RSS and required deceleration, then every threshold swept.

Every sweep takes its points from the config's constants (below, at, above each threshold, as opendbc
derives its safety sweeps from the car's class constants), so a changed threshold moves its sweep.
"""

from __future__ import annotations

import dataclasses

import pytest

from driveloop.safety import AebConfig
from driveloop.safety.aeb import (
    FULL,
    NONE,
    PARTIAL,
    REQ_DECEL_MAX_MPS2,
    TTC_MAX_S,
    assess,
    brake_level,
    cutting_in,
    lead_decel_mps2,
    model_brakes_enough,
    predict,
    required_decel_mps2,
    rss_safe_gap_m,
    time_to_collision_s,
)

CFG = AebConfig()
STEP = 0.1  # distance of the sweep points from each threshold (s, m/s^2)

TTC = [
    ("closing", 20.0, 5.0, 4.0),
    ("contact", 0.0, 5.0, 0.0),
    ("overlap even when opening", -1.0, -3.0, 0.0),
    ("steady", 20.0, 0.0, TTC_MAX_S),
    ("opening", 20.0, -2.0, TTC_MAX_S),
    ("far and slow is capped", 1000.0, 1.0, TTC_MAX_S),
    ("just below the cap", 98.0, 1.0, 98.0),
    ("exact contact while opening", 0.0, -1.0, 0.0),
    ("half a metre", 0.5, 5.0, 0.1),
]


@pytest.mark.parametrize(("name", "gap", "closing", "expected"), TTC, ids=[t[0] for t in TTC])
def test_time_to_collision(name: str, gap: float, closing: float, expected: float) -> None:
    assert time_to_collision_s(gap, closing) == pytest.approx(expected)


RSS = [
    # rho 0.5 s, accel 2 m/s^2 during rho, ego brakes >= 4, lead brakes <= 8 (defaults)
    ("same speed 20", 20.0, 20.0, 10.0 + 0.25 + 21.0**2 / 8.0 - 400.0 / 16.0),
    ("both stopped", 0.0, 0.0, 0.25 + 1.0 / 8.0),
    ("lead much faster clamps to zero", 10.0, 30.0, 0.0),
    ("stationary lead", 10.0, 0.0, 5.0 + 0.25 + 11.0**2 / 8.0),
    ("negative speeds count as zero", -5.0, -5.0, 0.25 + 1.0 / 8.0),
]


@pytest.mark.parametrize(("name", "ego", "lead", "expected"), RSS, ids=[r[0] for r in RSS])
def test_rss_safe_gap(name: str, ego: float, lead: float, expected: float) -> None:
    assert rss_safe_gap_m(ego, lead, CFG) == pytest.approx(expected)


def test_rss_parameters_each_matter() -> None:
    base = rss_safe_gap_m(20.0, 15.0, CFG)
    assert rss_safe_gap_m(20.0, 15.0, dataclasses.replace(CFG, response_time_s=1.0)) > base
    assert rss_safe_gap_m(20.0, 15.0, dataclasses.replace(CFG, max_accel_response_mps2=4.0)) > base
    assert rss_safe_gap_m(20.0, 15.0, dataclasses.replace(CFG, min_brake_mps2=6.0)) < base
    assert rss_safe_gap_m(20.0, 15.0, dataclasses.replace(CFG, max_brake_lead_mps2=10.0)) > base


REQ = [
    # name, gap, ego, lead, closing, lead_decel, expected  (delay 0.35 s, standstill gap 2 m)
    ("stationary lead", 50.0, 20.0, 0.0, 20.0, 0.0, 400.0 / (2.0 * (48.0 - 7.0))),
    ("slower lead", 30.0, 20.0, 10.0, 10.0, 0.0, 100.0 / (2.0 * (28.0 - 3.5))),
    ("opening", 30.0, 20.0, 25.0, -5.0, 0.0, 0.0),
    ("steady", 30.0, 20.0, 20.0, 0.0, 0.0, 0.0),
    ("closing capped by ego speed", 20.0, 5.0, 0.0, 8.0, 0.0, 25.0 / (2.0 * (18.0 - 1.75))),
    ("too close to stop", 3.0, 10.0, 0.0, 10.0, 0.0, REQ_DECEL_MAX_MPS2),
    ("braking lead: stopping distances decide", 12.0, 10.0, 10.0, 0.0, 6.0,
     100.0 / (2.0 * (10.0 + 100.0 / 12.0 - 3.5))),
    ("braking lead: relative motion decides", 30.0, 20.0, 10.0, 10.0, 1.0,
     1.0 + 10.35**2 / (2.0 * (28.0 - 3.5 - 0.5 * 0.35**2))),
    ("standing lead cannot brake further", 20.0, 10.0, 0.05, 10.0, 6.0, 100.0 / (2.0 * (18.0 - 3.5))),
    ("ego stopped", 5.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("ego stopped, lead braking", 5.0, 0.0, 3.0, -3.0, 4.0, 0.0),
    ("braking lead too close", 3.0, 20.0, 5.0, 15.0, 5.0, REQ_DECEL_MAX_MPS2),
    ("inside standstill gap, opening", 1.0, 10.0, 12.0, -2.0, 0.0, 0.0),
    ("far braking lead, steady", 100.0, 30.0, 30.0, 0.0, 5.0, 900.0 / (2.0 * (98.0 + 90.0 - 10.5))),
    ("lead at the standing threshold", 20.0, 10.0, 0.1, 9.9, 6.0, 9.9**2 / (2.0 * (18.0 - 9.9 * 0.35))),
    ("slow closing", 3.0, 10.0, 9.5, 0.5, 0.0, 0.25 / (2.0 * (1.0 - 0.175))),
    ("slow closing, small effective gap", 3.25, 10.0, 9.0, 1.0, 0.0, 1.0 / (2.0 * 0.9)),
    ("gently braking lead", 30.0, 20.0, 20.0, 0.0, 0.5, 400.0 / (2.0 * (28.0 + 400.0 - 7.0))),
    ("crawling ego, braking lead", 5.0, 0.5, 0.5, 0.0, 2.0, 0.25 / (2.0 * (3.0 + 0.0625 - 0.175))),
    ("little room, opening, braking lead", 2.75, 1.0, 2.0, -1.0, 4.0, 1.0 / (2.0 * 0.9)),
]


@pytest.mark.parametrize(("name", "gap", "ego", "lead", "closing", "a_l", "expected"), REQ, ids=[r[0] for r in REQ])
def test_required_decel(name: str, gap: float, ego: float, lead: float, closing: float, a_l: float,
                        expected: float) -> None:
    assert required_decel_mps2(gap, ego, lead, closing, a_l, CFG) == pytest.approx(expected)


def test_required_decel_really_avoids_the_lead() -> None:
    """Integrate the braking the formula asks for: the gap ends at the standstill gap, never below."""
    for gap, ego, lead, a_l in ((12.0, 13.9, 13.9, 6.0), (30.0, 20.0, 10.0, 1.0), (50.0, 22.0, 0.0, 0.0),
                                (25.0, 25.0, 20.0, 3.0)):
        need = required_decel_mps2(gap, ego, lead, ego - lead, a_l, CFG)
        x_e, v_e, x_l, v_l, t, dt, min_gap = 0.0, ego, gap, lead, 0.0, 1e-4, gap
        while v_e > 0.0 or v_l > 0.0:
            decel = need if t >= CFG.actuation_delay_s else 0.0
            v_e, v_l = max(v_e - decel * dt, 0.0), max(v_l - a_l * dt, 0.0)
            x_e, x_l, t = x_e + v_e * dt, x_l + v_l * dt, t + dt
            min_gap = min(min_gap, x_l - x_e)
        assert min_gap >= CFG.standstill_gap_m - 0.05
        assert min_gap <= CFG.standstill_gap_m + 1.0  # and it is not wildly over-braking


def _history(decel: float, n: int, v0: float = 20.0, t0: float = 3.0) -> tuple[tuple[float, float], ...]:
    return tuple((t0 + 0.1 * i, v0 - decel * 0.1 * i) for i in range(n))


LEAD = [
    ("steady braking", _history(6.0, 8), 6.0),
    ("gentle braking", _history(1.5, 8), 1.5),
    ("window not full yet", _history(6.0, 7), 0.0),
    ("accelerating lead counts as zero", _history(-2.0, 8), 0.0),
    ("constant speed", _history(0.0, 8), 0.0),
    ("all samples at one instant", tuple((1.0, 20.0 - i) for i in range(8)), 0.0),
    ("empty", (), 0.0),
]


@pytest.mark.parametrize(("name", "history", "expected"), LEAD, ids=[x[0] for x in LEAD])
def test_lead_decel_estimate(name: str, history: tuple[tuple[float, float], ...], expected: float) -> None:
    assert lead_decel_mps2(history, CFG) == pytest.approx(expected, abs=1e-9)


def test_lead_decel_window_is_configurable() -> None:
    assert lead_decel_mps2(_history(4.0, 3), dataclasses.replace(CFG, lead_decel_window_ticks=3)) == pytest.approx(4.0)
    assert lead_decel_mps2(_history(4.0, 2), dataclasses.replace(CFG, lead_decel_window_ticks=3)) == 0.0


# Threshold sweeps. Isolate one criterion by making the others unreachable.
TTC_ONLY = dataclasses.replace(CFG, partial_decel_trigger_mps2=90.0, full_decel_trigger_mps2=95.0)
DECEL_ONLY = dataclasses.replace(CFG, partial_ttc_s=0.02, full_ttc_s=0.01, release_ttc_s=0.02)


# The same sweeps run on the defaults and on a config with every stage threshold moved: the points follow.
SHIFTED = dataclasses.replace(CFG, full_ttc_s=0.8, partial_ttc_s=1.8, partial_decel_trigger_mps2=2.5,
                              full_decel_trigger_mps2=6.0, release_decel_mps2=0.8, cut_in_offset_m=2.8,
                              cut_in_lateral_speed_mps=0.4)
CONFIGS = pytest.mark.parametrize("cfg", [CFG, SHIFTED], ids=["defaults", "shifted"])


def ttc_sweep(cfg: AebConfig) -> list[tuple[float, int]]:
    return [
        (cfg.full_ttc_s - STEP, FULL), (cfg.full_ttc_s, FULL), (cfg.full_ttc_s + STEP, PARTIAL),
        (cfg.partial_ttc_s - STEP, PARTIAL), (cfg.partial_ttc_s, PARTIAL), (cfg.partial_ttc_s + STEP, NONE),
        (cfg.release_ttc_s * 2.5, NONE),
    ]


@CONFIGS
def test_ttc_sweep_points_are_ordered(cfg: AebConfig) -> None:
    """The points around one threshold must not reach the next one (else the sweep tests the wrong rule)."""
    assert cfg.full_ttc_s + STEP < cfg.partial_ttc_s - STEP


@CONFIGS
def test_ttc_thresholds_inside_rss_distance(cfg: AebConfig) -> None:
    ttc_only = dataclasses.replace(cfg, partial_decel_trigger_mps2=90.0, full_decel_trigger_mps2=95.0)
    closing = 4.0  # ego 20 behind a 16 m/s lead: RSS distance ~49 m, larger than every gap swept
    for ttc, expected in ttc_sweep(cfg):
        gap = ttc * closing
        assert gap < rss_safe_gap_m(20.0, 16.0, ttc_only)
        assert brake_level(gap, 20.0, 16.0, closing, 0.0, ttc_only)[0] == expected, ttc


def test_partial_ttc_stage_needs_the_rss_distance_violated() -> None:
    closing, ttc = 4.0, (CFG.full_ttc_s + CFG.partial_ttc_s) / 2
    lenient = dataclasses.replace(TTC_ONLY, response_time_s=0.01, min_brake_mps2=50.0, max_accel_response_mps2=0.0)
    gap = ttc * closing
    assert rss_safe_gap_m(20.0, 16.0, lenient) < gap  # RSS says the gap is safe
    assert brake_level(gap, 20.0, 16.0, closing, 0.0, lenient)[0] == NONE
    assert brake_level(gap, 20.0, 16.0, closing, 0.0, TTC_ONLY)[0] == PARTIAL
    full_ttc = CFG.full_ttc_s - STEP
    assert brake_level(full_ttc * closing, 20.0, 16.0, closing, 0.0, lenient)[0] == FULL  # full TTC ignores RSS


def _gap_for(need: float, ego: float = 20.0) -> float:
    """Gap behind a stationary lead at which exactly ``need`` deceleration is required."""
    return ego * ego / (2.0 * need) + CFG.standstill_gap_m + ego * CFG.actuation_delay_s


def decel_sweep(cfg: AebConfig) -> list[tuple[float, int]]:
    return [
        (cfg.partial_decel_trigger_mps2 - STEP, NONE), (cfg.partial_decel_trigger_mps2 + STEP, PARTIAL),
        (cfg.full_decel_trigger_mps2 - STEP, PARTIAL), (cfg.full_decel_trigger_mps2 + STEP, FULL),
    ]


BETWEEN = (CFG.partial_decel_trigger_mps2 + CFG.full_decel_trigger_mps2) / 2  # a need in the partial stage


@CONFIGS
def test_required_decel_thresholds(cfg: AebConfig) -> None:
    decel_only = dataclasses.replace(cfg, partial_ttc_s=0.02, full_ttc_s=0.01, release_ttc_s=0.02)
    for need, expected in decel_sweep(cfg):
        level, _, _, got = brake_level(_gap_for(need), 20.0, 0.0, 20.0, 0.0, decel_only)
        assert got == pytest.approx(need)
        assert level == expected, need


def test_required_decel_thresholds_are_inclusive() -> None:
    gap = _gap_for(BETWEEN)
    need = brake_level(gap, 20.0, 0.0, 20.0, 0.0, DECEL_ONLY)[3]
    at_partial = dataclasses.replace(DECEL_ONLY, partial_decel_trigger_mps2=need)
    assert brake_level(gap, 20.0, 0.0, 20.0, 0.0, at_partial)[0] == PARTIAL
    at_full = dataclasses.replace(DECEL_ONLY, full_decel_trigger_mps2=need)
    assert brake_level(gap, 20.0, 0.0, 20.0, 0.0, at_full)[0] == FULL


def test_ttc_thresholds_are_inclusive() -> None:
    gap, closing = 10.0, 4.0  # TTC exactly 2.5 s
    at_full = dataclasses.replace(TTC_ONLY, full_ttc_s=2.5, partial_ttc_s=2.5)
    assert brake_level(gap, 20.0, 16.0, closing, 0.0, at_full)[0] == FULL
    at_partial = dataclasses.replace(TTC_ONLY, partial_ttc_s=2.5, release_ttc_s=4.0)
    assert brake_level(gap, 20.0, 16.0, closing, 0.0, at_partial)[0] == PARTIAL


NO_BRAKE = [
    ("far stationary lead", 200.0, 25.0, 0.0, 25.0),
    ("opening lead", 8.0, 25.0, 30.0, -5.0),
    ("steady close follow", 15.0, 25.0, 25.0, 0.0),
    ("slightly closing at a safe gap", 60.0, 25.0, 24.0, 1.0),
    ("ego stopped behind stopped lead", 2.5, 0.0, 0.0, 0.0),
    ("noisy closing while ego stopped", 2.5, 0.0, 0.0, 0.5),
    ("noisy closing at standstill, lead very close", 0.4, 0.0, 0.0, 0.5),
    ("noisy closing faster than a crawling ego", 3.0, 0.5, 0.0, 2.0),
]


@pytest.mark.parametrize(("name", "gap", "ego", "lead", "closing"), NO_BRAKE, ids=[n[0] for n in NO_BRAKE])
def test_never_brakes_for_nothing(name: str, gap: float, ego: float, lead: float, closing: float) -> None:
    result = assess(gap, ego, lead, closing, (), False, CFG)
    assert (result.level, result.fcw, result.decel_mps2) == (NONE, False, 0.0)


def test_release_hysteresis() -> None:
    # required decel between release and the partial trigger, TTC long: holds only when braking
    hold = (CFG.release_decel_mps2 + CFG.partial_decel_trigger_mps2) / 2
    gap = _gap_for(hold)
    assert assess(gap, 20.0, 0.0, 20.0, (), False, DECEL_ONLY).level == NONE
    held = assess(gap, 20.0, 0.0, 20.0, (), True, DECEL_ONLY)
    assert held.level == PARTIAL
    assert held.decel_mps2 == pytest.approx(max(CFG.partial_decel_mps2, CFG.brake_gain * hold))
    # below the release deceleration but still a short TTC: holds
    gap_low = _gap_for(CFG.release_decel_mps2 - STEP)
    short_ttc = dataclasses.replace(DECEL_ONLY, release_ttc_s=gap_low / 20.0 + 0.5)
    assert assess(gap_low, 20.0, 0.0, 20.0, (), True, short_ttc).level == PARTIAL
    # both clear: releases
    assert assess(gap_low, 20.0, 0.0, 20.0, (), True, DECEL_ONLY).level == NONE
    # exactly at the release deceleration still holds
    need = brake_level(gap, 20.0, 0.0, 20.0, 0.0, DECEL_ONLY)[3]
    at_release = dataclasses.replace(DECEL_ONLY, release_decel_mps2=need)
    assert assess(gap, 20.0, 0.0, 20.0, (), True, at_release).level == PARTIAL
    # exactly at the release TTC still holds
    ttc_cfg = dataclasses.replace(DECEL_ONLY, release_ttc_s=gap_low / 20.0)
    assert assess(gap_low, 20.0, 0.0, 20.0, (), True, ttc_cfg).level == PARTIAL


def _partial_command(need: float) -> float:
    return min(max(CFG.partial_decel_mps2, CFG.brake_gain * need), CFG.full_decel_mps2)


@pytest.mark.parametrize(("need", "expected"), [
    (CFG.partial_decel_trigger_mps2 + STEP, _partial_command(CFG.partial_decel_trigger_mps2 + STEP)),
    (CFG.full_decel_trigger_mps2 - STEP, _partial_command(CFG.full_decel_trigger_mps2 - STEP)),
    (CFG.full_decel_trigger_mps2 + STEP, CFG.full_decel_mps2),
    (4 * CFG.full_decel_trigger_mps2, CFG.full_decel_mps2),
])
def test_brake_command_by_stage(need: float, expected: float) -> None:
    result = assess(_gap_for(need), 20.0, 0.0, 20.0, (), False, DECEL_ONLY)
    assert result.decel_mps2 == pytest.approx(expected)


def test_partial_stage_commands_at_least_the_partial_deceleration() -> None:
    need = CFG.partial_decel_trigger_mps2 + 2 * STEP
    cfg = dataclasses.replace(DECEL_ONLY, brake_gain=0.5)
    assert assess(_gap_for(need), 20.0, 0.0, 20.0, (), False, cfg).decel_mps2 == pytest.approx(CFG.partial_decel_mps2)
    cap = CFG.partial_decel_mps2 + 1.0
    capped = dataclasses.replace(DECEL_ONLY, brake_gain=5.0, full_decel_mps2=cap)
    assert assess(_gap_for(need), 20.0, 0.0, 20.0, (), False, capped).decel_mps2 == pytest.approx(cap)


@pytest.mark.parametrize("closing", [3.0, 5.0, 8.0, 12.0, 16.0, 22.0, 30.0])
@pytest.mark.parametrize("lead", [0.0, 8.0, 15.0])
def test_fcw_precedes_the_brake_by_the_r152_margin(closing: float, lead: float) -> None:
    """Steady approach from far away: FCW fires >= 0.8 s (here fcw_lead_time_s = 1.0 s) before braking."""
    ego, dt = lead + closing, 0.01
    gap = closing * 12.0 + 60.0
    t, first_fcw, first_brake = 0.0, None, None
    while first_brake is None:
        result = assess(gap, ego, lead, closing, (), False, CFG)
        if result.fcw and first_fcw is None:
            first_fcw = t
        if result.level > NONE:
            first_brake = t
        gap -= closing * dt
        t += dt
    assert first_fcw is not None and first_fcw > 0.0
    assert first_brake - first_fcw >= 0.8
    assert first_brake - first_fcw == pytest.approx(CFG.fcw_lead_time_s, abs=0.02)


def test_fcw_predicts_a_braking_lead() -> None:
    """A lead braking hard far ahead: the prediction includes its deceleration."""
    history = _history(6.0, 8, v0=20.0)
    lead_now = history[-1][1]
    result = assess(40.0, 20.0, lead_now, 20.0 - lead_now, history, False, CFG)
    assert result.lead_decel_mps2 == pytest.approx(6.0)
    ignoring = assess(40.0, 20.0, lead_now, 20.0 - lead_now, (), False, CFG)
    assert result.required_decel_mps2 > ignoring.required_decel_mps2
    assert result.fcw and not ignoring.fcw


def test_fcw_includes_the_current_brake_stage() -> None:
    result = assess(5.0, 20.0, 0.0, 20.0, (), False, CFG)
    assert result.level == FULL and result.fcw


YIELD_AT = -CFG.brake_gain * BETWEEN  # the partial stage yields to a valid model braking at least this hard


@pytest.mark.parametrize(("need", "model_accel", "expected"), [
    (BETWEEN, YIELD_AT + 0.5, False), (BETWEEN, YIELD_AT + 0.01, False),  # partial: yields at brake_gain x need
    (BETWEEN, YIELD_AT - 0.01, True), (BETWEEN, YIELD_AT - 0.5, True),
    (CFG.full_decel_trigger_mps2 + STEP, -CFG.full_decel_mps2 - 1.0, False),  # full never yields
    (CFG.partial_decel_trigger_mps2 - STEP, -10 * CFG.full_decel_mps2, False),  # no stage: nothing to yield
])
def test_partial_stage_yields_to_a_model_that_brakes_with_margin(need: float, model_accel: float,
                                                                 expected: bool) -> None:
    cfg = DECEL_ONLY
    result = assess(_gap_for(need), 20.0, 0.0, 20.0, (), False, cfg)
    assert result.required_decel_mps2 == pytest.approx(need)
    assert model_brakes_enough(result, model_accel, cfg) is expected


def test_yielding_threshold_is_inclusive() -> None:
    result = assess(_gap_for(BETWEEN), 20.0, 0.0, 20.0, (), False, DECEL_ONLY)
    exact = -DECEL_ONLY.brake_gain * result.required_decel_mps2
    assert model_brakes_enough(result, exact, DECEL_ONLY)
    assert not model_brakes_enough(result, exact + 1e-9, DECEL_ONLY)


PREDICT = [
    ("steady closing", (40.0, 12.0, 8.0, 0.0, 1.0), (32.0, 12.0, 8.0)),
    ("braking lead", (40.0, 12.0, 8.0, 4.0, 1.0), (30.0, 8.0, 12.0)),
    ("lead stops within the horizon", (40.0, 2.0, 18.0, 4.0, 1.0), (20.0, 0.0, 20.0)),
    ("half horizon", (40.0, 12.0, 8.0, 4.0, 0.5), (35.5, 10.0, 10.0)),
    ("opening", (20.0, 25.0, -5.0, 0.0, 2.0), (30.0, 25.0, -5.0)),
]


@pytest.mark.parametrize(("name", "args", "expected"), PREDICT, ids=[p[0] for p in PREDICT])
def test_prediction_for_the_warning(name: str, args: tuple[float, ...], expected: tuple[float, float, float]) -> None:
    assert predict(*args) == pytest.approx(expected)


def test_lead_decel_regression_is_exact_for_any_offset() -> None:
    history = tuple((10.0 + 0.1 * i, 30.0 - 2.5 * 0.1 * i + (0.3 if i % 2 else -0.3)) for i in range(8))
    # alternating +-0.3 m/s noise on a 2.5 m/s^2 deceleration: least squares by hand
    ts = [t for t, _ in history]
    vs = [v for _, v in history]
    mt, mv = sum(ts) / 8, sum(vs) / 8
    slope = sum((t - mt) * (v - mv) for t, v in history) / sum((t - mt) ** 2 for t in ts)
    assert lead_decel_mps2(history, CFG) == pytest.approx(-slope)
    shifted = tuple((t + 100.0, v) for t, v in history)
    assert lead_decel_mps2(shifted, CFG) == pytest.approx(-slope)


def test_rss_gate_is_strict() -> None:
    """Exactly at the RSS distance the gap counts as safe: only the TTC <= partial and gap < RSS stage differs."""
    cfg = dataclasses.replace(TTC_ONLY, partial_ttc_s=2.0)
    gap = rss_safe_gap_m(8.0, 0.0, cfg)
    assert brake_level(gap, 8.0, 0.0, 8.0, 0.0, cfg)[0] == NONE
    assert brake_level(gap - 1e-9, 8.0, 0.0, 8.0, 0.0, cfg)[0] == PARTIAL


def test_required_decel_at_exactly_no_room() -> None:
    """Zero effective room is 'cannot stop any more' (capped), never a division by zero."""
    cfg = dataclasses.replace(CFG, actuation_delay_s=0.5)  # exact binary arithmetic
    assert required_decel_mps2(12.0, 20.0, 0.0, 20.0, 0.0, cfg) == REQ_DECEL_MAX_MPS2  # 10 m margin - 20 m/s x 0.5 s
    assert required_decel_mps2(4.0, 6.0, 2.0, 4.0, 2.0, cfg) == REQ_DECEL_MAX_MPS2  # 2 + 1 - 3 = 0 m available


# Cut-ins: an object beside the lane counts once its side is over our marking and it moves further in.
def cut_in_sweep(cfg: AebConfig) -> list[tuple[float, float, bool]]:
    """(offset from our lane's centre, inward speed, cutting in?)"""
    return [
        (cfg.cut_in_offset_m + STEP, 2.0, False),  # still in its own lane, however fast it comes
        (cfg.cut_in_offset_m, 2.0, True),  # side exactly on the marking
        (cfg.cut_in_offset_m - STEP, 2.0, True),
        (cfg.cut_in_offset_m - STEP, cfg.cut_in_lateral_speed_mps - 0.01, False),  # too slow: lane keeping
        (cfg.cut_in_offset_m - STEP, cfg.cut_in_lateral_speed_mps, True),
        (cfg.cut_in_offset_m - STEP, 0.0, False),
        (cfg.cut_in_offset_m - STEP, -2.0, False),  # leaving our lane
        (0.5, 2.0, True),
        (0.0, 0.0, True),  # on our lane's centre line: in our path, whatever it does
    ]


@CONFIGS
@pytest.mark.parametrize("side", [1.0, -1.0])  # + left of our lane, - right
def test_cut_in_swept_across_offset_and_lateral_speed(cfg: AebConfig, side: float) -> None:
    for offset, inward, expected in cut_in_sweep(cfg):
        assert cutting_in(side * offset, -side * inward, cfg) is expected, (offset, inward)


def test_cut_in_thresholds_are_parameters() -> None:
    wide = dataclasses.replace(CFG, cut_in_offset_m=CFG.cut_in_offset_m + 1.0)
    assert cutting_in(CFG.cut_in_offset_m + 0.5, -1.0, wide) and not cutting_in(CFG.cut_in_offset_m + 0.5, -1.0, CFG)
    slow = dataclasses.replace(CFG, cut_in_lateral_speed_mps=0.1)
    assert cutting_in(-2.5, 0.15, slow) and not cutting_in(-2.5, 0.15, CFG)
