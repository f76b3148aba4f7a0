"""Every config field is validated on construction: each bad value is a named case that must raise."""

from __future__ import annotations

import dataclasses

import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.safety import (
    AdvisoryConfig,
    AebConfig,
    FallbackConfig,
    LaneConfig,
    LimitsConfig,
    SupervisorConfig,
    WatchdogConfig,
)
from driveloop.safety.config import HeadwayConfig

POS, NONNEG = "finite and > 0", "finite and >= 0"
BAD = [
    # name, config class, bad field values, the rule the error message must state
    ("aeb response zero", AebConfig, {"response_time_s": 0.0}, POS),
    ("aeb response nan", AebConfig, {"response_time_s": float("nan")}, POS),
    ("aeb response inf", AebConfig, {"response_time_s": float("inf")}, POS),
    ("aeb response str", AebConfig, {"response_time_s": "1"}, POS),
    ("aeb min brake negative", AebConfig, {"min_brake_mps2": -1.0}, POS),
    ("aeb lead brake zero", AebConfig, {"max_brake_lead_mps2": 0.0}, POS),
    ("aeb accel during response negative", AebConfig, {"max_accel_response_mps2": -0.1}, NONNEG),
    ("aeb accel during response inf", AebConfig, {"max_accel_response_mps2": float("inf")}, NONNEG),
    ("aeb accel during response str", AebConfig, {"max_accel_response_mps2": "0"}, NONNEG),
    ("aeb actuation delay negative", AebConfig, {"actuation_delay_s": -0.1}, NONNEG),
    ("aeb standstill gap negative", AebConfig, {"standstill_gap_m": -0.1}, NONNEG),
    ("aeb partial ttc zero", AebConfig, {"partial_ttc_s": 0.0}, POS),
    ("aeb partial trigger zero", AebConfig, {"partial_decel_trigger_mps2": 0.0}, POS),
    ("aeb full ttc zero", AebConfig, {"full_ttc_s": 0.0}, POS),
    ("aeb full ttc above partial", AebConfig, {"full_ttc_s": 3.5}, "<= partial_ttc_s"),
    ("aeb full trigger below partial", AebConfig, {"full_decel_trigger_mps2": 2.5}, ">= partial_decel_trigger_mps2"),
    ("aeb partial decel zero", AebConfig, {"partial_decel_mps2": 0.0}, POS),
    ("aeb full decel below partial", AebConfig, {"full_decel_mps2": 2.0}, ">= partial_decel_mps2"),
    ("aeb release zero", AebConfig, {"release_decel_mps2": 0.0}, POS),
    ("aeb release above partial trigger", AebConfig, {"release_decel_mps2": 3.5}, "<= partial_decel_trigger_mps2"),
    ("aeb release ttc zero", AebConfig, {"release_ttc_s": 0.0}, POS),
    ("aeb release ttc below partial", AebConfig, {"release_ttc_s": 1.2}, ">= partial_ttc_s"),
    ("aeb fcw lead below R152", AebConfig, {"fcw_lead_time_s": 0.79}, ">= 0.8 s (UN R152)"),
    ("aeb fcw lead not a number", AebConfig, {"fcw_lead_time_s": None}, ">= 0.8 s (UN R152)"),
    ("aeb window one", AebConfig, {"lead_decel_window_ticks": 1}, "an int >= 2"),
    ("aeb window float", AebConfig, {"lead_decel_window_ticks": 5.0}, "an int >= 2"),
    ("aeb brake gain zero", AebConfig, {"brake_gain": 0.0}, POS),
    ("aeb track jump zero", AebConfig, {"track_jump_m": 0.0}, POS),
    ("aeb cut-in offset zero", AebConfig, {"cut_in_offset_m": 0.0}, POS),
    ("aeb cut-in offset nan", AebConfig, {"cut_in_offset_m": float("nan")}, POS),
    ("aeb cut-in lateral speed zero", AebConfig, {"cut_in_lateral_speed_mps": 0.0}, POS),
    ("aeb cut-in lateral speed negative", AebConfig, {"cut_in_lateral_speed_mps": -0.25}, POS),
    ("watchdog deadline zero", WatchdogConfig, {"deadline_s": 0.0}, POS),
    ("watchdog stale zero", WatchdogConfig, {"stale_ticks": 0}, "an int >= 1"),
    ("watchdog stale float", WatchdogConfig, {"stale_ticks": 2.5}, "an int >= 1"),
    ("watchdog accel min positive", WatchdogConfig, {"plausible_accel_min_mps2": 0.5}, "finite and < 0"),
    ("watchdog accel min zero", WatchdogConfig, {"plausible_accel_min_mps2": 0.0}, "finite and < 0"),
    ("watchdog accel min -inf", WatchdogConfig, {"plausible_accel_min_mps2": float("-inf")}, "finite and < 0"),
    ("watchdog accel max zero", WatchdogConfig, {"plausible_accel_max_mps2": 0.0}, POS),
    ("watchdog steer zero", WatchdogConfig, {"plausible_steer_abs_rad": 0.0}, POS),
    ("limits accel zero", LimitsConfig, {"max_accel_mps2": 0.0}, POS),
    ("limits decel negative", LimitsConfig, {"max_decel_mps2": -8.0}, POS),
    ("limits jerk zero", LimitsConfig, {"max_jerk_mps3": 0.0}, POS),
    ("limits emergency jerk below jerk", LimitsConfig, {"emergency_jerk_mps3": 4.0}, ">= max_jerk_mps3"),
    ("limits steer zero", LimitsConfig, {"max_steer_rad": 0.0}, POS),
    ("limits steer rate nan", LimitsConfig, {"max_steer_rate_radps": float("nan")}, POS),
    ("fallback comfort zero", FallbackConfig, {"comfort_decel_mps2": 0.0}, POS),
    ("fallback lane gain negative", FallbackConfig, {"lane_gain_radpm": -0.1}, NONNEG),
    ("fallback heading gain negative", FallbackConfig, {"heading_gain": -0.1}, NONNEG),
    ("lane offset zero", LaneConfig, {"max_offset_m": 0.0}, POS),
    ("lane offset negative", LaneConfig, {"max_offset_m": -1.4}, POS),
    ("lane offset nan", LaneConfig, {"max_offset_m": float("nan")}, POS),
    ("lane lookahead negative", LaneConfig, {"lookahead_s": -0.1}, NONNEG),
    ("lane lookahead inf", LaneConfig, {"lookahead_s": float("inf")}, NONNEG),
    ("advisory plan decel zero", AdvisoryConfig, {"plan_decel_mps2": 0.0}, POS),
    ("advisory plan decel nan", AdvisoryConfig, {"plan_decel_mps2": float("nan")}, POS),
    ("advisory plan decel above max", AdvisoryConfig, {"plan_decel_mps2": 3.5}, "<= max_decel_mps2"),
    ("advisory speed gain zero", AdvisoryConfig, {"speed_gain_per_s": 0.0}, POS),
    ("advisory gap gain zero", AdvisoryConfig, {"gap_gain_per_s2": 0.0}, POS),
    ("advisory gap speed gain negative", AdvisoryConfig, {"gap_speed_gain_per_s": -0.6}, POS),
    ("advisory max decel inf", AdvisoryConfig, {"max_decel_mps2": float("inf")}, POS),
    ("advisory max decel zero", AdvisoryConfig, {"max_decel_mps2": 0.0}, POS),
    ("advisory standstill negative", AdvisoryConfig, {"standstill_gap_m": -0.1}, NONNEG),
    ("advisory standstill str", AdvisoryConfig, {"standstill_gap_m": "5"}, NONNEG),
    ("headway time gap negative", HeadwayConfig, {"time_gap_s": -0.1}, NONNEG),
    ("headway time gap inf", HeadwayConfig, {"time_gap_s": float("inf")}, NONNEG),
    ("headway time gap str", HeadwayConfig, {"time_gap_s": "1"}, NONNEG),
    ("headway standstill negative", HeadwayConfig, {"standstill_gap_m": -0.1}, NONNEG),
    ("headway standstill nan", HeadwayConfig, {"standstill_gap_m": float("nan")}, NONNEG),
    ("headway gain zero", HeadwayConfig, {"gain_mps2": 0.0}, POS),
    ("headway gain negative", HeadwayConfig, {"gain_mps2": -3.0}, POS),
    ("headway gain inf", HeadwayConfig, {"gain_mps2": float("inf")}, POS),
    ("supervisor period zero", SupervisorConfig, {"control_period_s": 0.0}, POS),
    ("supervisor hold negative", SupervisorConfig, {"handback_hold_s": -1.0}, NONNEG),
    ("supervisor valid ticks zero", SupervisorConfig, {"handback_valid_ticks": 0}, "an int >= 1"),
    ("supervisor valid ticks float", SupervisorConfig, {"handback_valid_ticks": 2.0}, "an int >= 1"),
]
_LIMIT = LimitsConfig().max_decel_mps2
NESTED = [  # derived from the defaults: just beyond the limit, whatever the limit is
    ("supervisor comfort beyond limits", {"fallback": FallbackConfig(comfort_decel_mps2=_LIMIT + 1.0)},
     f"safety config: fallback.comfort_decel_mps2={_LIMIT + 1.0!r} must be <= limits.max_decel_mps2"),
    ("supervisor aeb beyond limits", {"limits": LimitsConfig(max_decel_mps2=AebConfig().full_decel_mps2 - 1.0)},
     f"safety config: aeb.full_decel_mps2={AebConfig().full_decel_mps2!r} must be <= limits.max_decel_mps2"),
    ("supervisor headway gain beyond limits", {"headway": HeadwayConfig(gain_mps2=_LIMIT + 1.0)},
     f"safety config: headway.gain_mps2={_LIMIT + 1.0!r} must be <= limits.max_decel_mps2"),
    ("supervisor advisory beyond limits",
     {"advisory": AdvisoryConfig(max_decel_mps2=_LIMIT + 1.0)},
     f"safety config: advisory.max_decel_mps2={_LIMIT + 1.0!r} must be <= limits.max_decel_mps2"),
]


@pytest.mark.parametrize(("name", "cls", "kwargs", "rule"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused(name: str, cls: type, kwargs: dict[str, object], rule: str) -> None:
    (field, value), = kwargs.items()
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert str(info.value) == f"safety config: {field}={value!r} must be {rule}"


@pytest.mark.parametrize(("name", "kwargs", "message"), NESTED, ids=[n[0] for n in NESTED])
def test_inconsistent_nested_configs_are_refused(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SupervisorConfig(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_defaults_are_the_documented_ones() -> None:
    """docs/SAFETY.md lists these values; changing one is a reviewed decision, not an accident."""
    assert dataclasses.asdict(SupervisorConfig()) == {
        "aeb": {
            "response_time_s": 0.5, "max_accel_response_mps2": 2.0, "min_brake_mps2": 4.0,
            "max_brake_lead_mps2": 8.0, "actuation_delay_s": 0.35, "standstill_gap_m": 2.0,
            "partial_ttc_s": 1.5, "partial_decel_trigger_mps2": 3.0, "full_ttc_s": 1.0,
            "full_decel_trigger_mps2": 5.0, "partial_decel_mps2": 3.0, "full_decel_mps2": 9.0,
            "brake_gain": 1.5, "release_decel_mps2": 1.0, "release_ttc_s": 4.0, "fcw_lead_time_s": 1.0,
            "lead_decel_window_ticks": 8, "track_jump_m": 5.0, "cut_in_offset_m": 3.0,
            "cut_in_lateral_speed_mps": 0.25,
        },
        "watchdog": {
            "deadline_s": 0.1, "stale_ticks": 3, "plausible_accel_min_mps2": -12.0,
            "plausible_accel_max_mps2": 6.0, "plausible_steer_abs_rad": 1.0,
        },
        "limits": {
            "max_accel_mps2": 3.0, "max_decel_mps2": 9.0, "max_jerk_mps3": 5.0, "emergency_jerk_mps3": 120.0,
            "max_steer_rad": 0.35, "max_steer_rate_radps": 0.6,
        },
        "fallback": {"comfort_decel_mps2": 3.0, "lane_gain_radpm": 0.02, "heading_gain": 0.3},
        "lane": {"max_offset_m": 1.4, "lookahead_s": 0.5},
        "advisory": {
            "plan_decel_mps2": 1.5, "speed_gain_per_s": 1.0, "gap_gain_per_s2": 0.2, "gap_speed_gain_per_s": 0.6,
            "standstill_gap_m": 5.0, "max_decel_mps2": 3.0,
        },
        "headway": {"time_gap_s": 1.0, "standstill_gap_m": 2.0, "gain_mps2": 3.0},
        "control_period_s": 0.1, "handback_hold_s": 1.0, "handback_valid_ticks": 5,
    }


GOOD = [
    ("defaults", AebConfig, {}),
    ("headway disabled", HeadwayConfig, {"time_gap_s": 0.0, "standstill_gap_m": 0.0}),
    ("headway gain at the limit", SupervisorConfig, {"headway": HeadwayConfig(gain_mps2=_LIMIT)}),
    ("fcw lead exactly R152", AebConfig, {"fcw_lead_time_s": 0.8}),
    ("full ttc equals partial", AebConfig, {"full_ttc_s": 1.5}),
    ("full trigger equals partial", AebConfig, {"full_decel_trigger_mps2": 3.0}),
    ("full decel equals partial", AebConfig, {"full_decel_mps2": 3.0}),
    ("release equals partial trigger", AebConfig, {"release_decel_mps2": 3.0}),
    ("release ttc equals partial", AebConfig, {"release_ttc_s": 1.5}),
    ("zero actuation delay", AebConfig, {"actuation_delay_s": 0.0}),
    ("window two", AebConfig, {"lead_decel_window_ticks": 2}),
    ("watchdog defaults", WatchdogConfig, {}),
    ("stale one tick", WatchdogConfig, {"stale_ticks": 1}),
    ("limits defaults", LimitsConfig, {}),
    ("emergency jerk equals jerk", LimitsConfig, {"max_jerk_mps3": 5.0, "emergency_jerk_mps3": 5.0}),
    ("fallback zero gains", FallbackConfig, {"lane_gain_radpm": 0.0, "heading_gain": 0.0}),
    ("lane defaults", LaneConfig, {}),
    ("lane no lookahead", LaneConfig, {"lookahead_s": 0.0}),
    ("advisory defaults", AdvisoryConfig, {}),
    ("advisory plan decel equals max", AdvisoryConfig, {"plan_decel_mps2": 3.0}),
    ("advisory no standstill gap", AdvisoryConfig, {"standstill_gap_m": 0.0}),
    ("supervisor defaults", SupervisorConfig, {}),
    ("supervisor zero hold", SupervisorConfig, {"handback_hold_s": 0.0}),
    ("supervisor comfort equals limit", SupervisorConfig, {"fallback": FallbackConfig(comfort_decel_mps2=_LIMIT)}),
]


@pytest.mark.parametrize(("name", "cls", "kwargs"), GOOD, ids=[g[0] for g in GOOD])
def test_good_config_is_accepted(name: str, cls: type, kwargs: dict[str, object]) -> None:
    config = cls(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_configs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        AebConfig().full_ttc_s = 0.1  # type: ignore[misc]
