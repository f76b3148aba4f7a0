"""Every config field is validated on construction: each bad value is a named case that must raise."""

from __future__ import annotations

import pytest

from driveloop.exceptions import ConfigError
from driveloop.safety import AebConfig, FallbackConfig, LimitsConfig, SupervisorConfig, WatchdogConfig

BAD = [
    ("aeb response zero", AebConfig, {"response_time_s": 0.0}),
    ("aeb response nan", AebConfig, {"response_time_s": float("nan")}),
    ("aeb response inf", AebConfig, {"response_time_s": float("inf")}),
    ("aeb response str", AebConfig, {"response_time_s": "1"}),
    ("aeb min brake negative", AebConfig, {"min_brake_mps2": -1.0}),
    ("aeb lead brake zero", AebConfig, {"max_brake_lead_mps2": 0.0}),
    ("aeb accel during response negative", AebConfig, {"max_accel_response_mps2": -0.1}),
    ("aeb actuation delay negative", AebConfig, {"actuation_delay_s": -0.1}),
    ("aeb standstill gap negative", AebConfig, {"standstill_gap_m": -0.1}),
    ("aeb partial ttc zero", AebConfig, {"partial_ttc_s": 0.0}),
    ("aeb full ttc above partial", AebConfig, {"full_ttc_s": 3.5}),
    ("aeb full trigger below partial", AebConfig, {"full_decel_trigger_mps2": 2.5}),
    ("aeb full decel below partial", AebConfig, {"full_decel_mps2": 2.0}),
    ("aeb release above partial trigger", AebConfig, {"release_decel_mps2": 3.5}),
    ("aeb release ttc below partial", AebConfig, {"release_ttc_s": 2.5}),
    ("aeb fcw lead below R152", AebConfig, {"fcw_lead_time_s": 0.79}),
    ("aeb fcw lead not a number", AebConfig, {"fcw_lead_time_s": None}),
    ("aeb window one", AebConfig, {"lead_decel_window_ticks": 1}),
    ("aeb window float", AebConfig, {"lead_decel_window_ticks": 5.0}),
    ("aeb brake gain zero", AebConfig, {"brake_gain": 0.0}),
    ("aeb track jump zero", AebConfig, {"track_jump_m": 0.0}),
    ("watchdog deadline zero", WatchdogConfig, {"deadline_s": 0.0}),
    ("watchdog stale zero", WatchdogConfig, {"stale_ticks": 0}),
    ("watchdog stale float", WatchdogConfig, {"stale_ticks": 2.5}),
    ("watchdog accel min positive", WatchdogConfig, {"plausible_accel_min_mps2": 0.5}),
    ("watchdog accel min zero", WatchdogConfig, {"plausible_accel_min_mps2": 0.0}),
    ("watchdog accel min -inf", WatchdogConfig, {"plausible_accel_min_mps2": float("-inf")}),
    ("watchdog accel max zero", WatchdogConfig, {"plausible_accel_max_mps2": 0.0}),
    ("watchdog steer zero", WatchdogConfig, {"plausible_steer_abs_rad": 0.0}),
    ("limits accel zero", LimitsConfig, {"max_accel_mps2": 0.0}),
    ("limits decel negative", LimitsConfig, {"max_decel_mps2": -8.0}),
    ("limits jerk zero", LimitsConfig, {"max_jerk_mps3": 0.0}),
    ("limits emergency jerk below jerk", LimitsConfig, {"emergency_jerk_mps3": 4.0}),
    ("limits steer zero", LimitsConfig, {"max_steer_rad": 0.0}),
    ("limits steer rate nan", LimitsConfig, {"max_steer_rate_radps": float("nan")}),
    ("fallback comfort zero", FallbackConfig, {"comfort_decel_mps2": 0.0}),
    ("fallback lane gain negative", FallbackConfig, {"lane_gain_radpm": -0.1}),
    ("fallback heading gain negative", FallbackConfig, {"heading_gain": -0.1}),
    ("supervisor period zero", SupervisorConfig, {"control_period_s": 0.0}),
    ("supervisor hold negative", SupervisorConfig, {"handback_hold_s": -1.0}),
    ("supervisor valid ticks zero", SupervisorConfig, {"handback_valid_ticks": 0}),
    ("supervisor comfort beyond limits", SupervisorConfig,
     {"fallback": FallbackConfig(comfort_decel_mps2=9.0)}),
    ("supervisor aeb beyond limits", SupervisorConfig, {"limits": LimitsConfig(max_decel_mps2=7.0)}),
]


@pytest.mark.parametrize(("name", "cls", "kwargs"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused(name: str, cls: type, kwargs: dict[str, object]) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ConfigError, match=field.split(".")[0] if cls is not SupervisorConfig else "."):
        cls(**kwargs)


GOOD = [
    ("defaults", AebConfig, {}),
    ("fcw lead exactly R152", AebConfig, {"fcw_lead_time_s": 0.8}),
    ("full ttc equals partial", AebConfig, {"full_ttc_s": 3.0}),
    ("full trigger equals partial", AebConfig, {"full_decel_trigger_mps2": 3.0}),
    ("full decel equals partial", AebConfig, {"full_decel_mps2": 3.0}),
    ("release equals partial trigger", AebConfig, {"release_decel_mps2": 3.0}),
    ("release ttc equals partial", AebConfig, {"release_ttc_s": 3.0}),
    ("zero actuation delay", AebConfig, {"actuation_delay_s": 0.0}),
    ("window two", AebConfig, {"lead_decel_window_ticks": 2}),
    ("watchdog defaults", WatchdogConfig, {}),
    ("stale one tick", WatchdogConfig, {"stale_ticks": 1}),
    ("limits defaults", LimitsConfig, {}),
    ("emergency jerk equals jerk", LimitsConfig, {"max_jerk_mps3": 5.0, "emergency_jerk_mps3": 5.0}),
    ("fallback zero gains", FallbackConfig, {"lane_gain_radpm": 0.0, "heading_gain": 0.0}),
    ("supervisor defaults", SupervisorConfig, {}),
    ("supervisor zero hold", SupervisorConfig, {"handback_hold_s": 0.0}),
    ("supervisor comfort equals limit", SupervisorConfig, {"fallback": FallbackConfig(comfort_decel_mps2=8.0)}),
]


@pytest.mark.parametrize(("name", "cls", "kwargs"), GOOD, ids=[g[0] for g in GOOD])
def test_good_config_is_accepted(name: str, cls: type, kwargs: dict[str, object]) -> None:
    config = cls(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_configs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        AebConfig().full_ttc_s = 0.1  # type: ignore[misc]
