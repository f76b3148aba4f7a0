"""Safety-layer configuration: frozen dataclasses with SI units in every field name.

Every config validates itself on construction and raises ``ConfigError`` with the offending field, so
that a bad limit can never reach the vehicle. Defaults are tuned for a passenger car at 10 Hz and are
documented with their rationale in docs/SAFETY.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from driveloop.core.exceptions import ConfigError

# UN R152 5.2.1.1: the collision warning must come at least 0.8 s before emergency braking.
R152_MIN_WARNING_S = 0.8


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    """Raise ConfigError naming the field unless ``ok``."""
    if not ok:
        raise ConfigError(f"safety config: {name}={value!r} must be {rule}")


def _positive(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, value, "finite and > 0")


def _non_negative(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, value, "finite and >= 0")


@dataclass(frozen=True)
class AebConfig:
    """Automatic emergency braking: TTC, RSS safe distance and required deceleration.

    RSS (Shalev-Shwartz et al. 2017) parameters: the ego reacts within ``response_time_s`` during which it
    may still accelerate at ``max_accel_response_mps2``; it can then brake at least ``min_brake_mps2``;
    the lead may brake at up to ``max_brake_lead_mps2``.
    """

    response_time_s: float = 0.5
    max_accel_response_mps2: float = 2.0
    min_brake_mps2: float = 4.0
    max_brake_lead_mps2: float = 8.0
    # Time from the brake decision to the deceleration: one tick plus the first-order brake lag.
    actuation_delay_s: float = 0.35
    standstill_gap_m: float = 2.0  # distance kept to the lead when both have stopped
    partial_ttc_s: float = 1.5  # partial braking only below this TTC and inside the RSS distance
    partial_decel_trigger_mps2: float = 3.0  # ... or when this deceleration is required
    full_ttc_s: float = 1.0
    full_decel_trigger_mps2: float = 5.0
    partial_decel_mps2: float = 3.0  # least deceleration commanded in the partial stage
    full_decel_mps2: float = 9.0
    brake_gain: float = 1.5  # partial stage commands gain x required deceleration (margin for lag/noise)
    release_decel_mps2: float = 1.0  # AEB releases once required deceleration is below this ...
    release_ttc_s: float = 4.0  # ... and TTC is above this (hysteresis against chattering)
    fcw_lead_time_s: float = 1.0  # FCW = brake condition predicted this far ahead (>= 0.8 s, R152)
    lead_decel_window_ticks: int = 8  # lead deceleration = least-squares slope of this many speeds (0.7 s)
    track_jump_m: float = 5.0  # a gap change beyond closing x dt + this is a new object: history restarts
    # Cut-in: an object beside our lane is braked for like a lead from the frame its side is over our lane
    # marking (its centre this close to our lane's centre: a 2 m car, a 4 m lane) while it moves further in ...
    cut_in_offset_m: float = 3.0
    cut_in_lateral_speed_mps: float = 0.25  # ... at least this fast (slower is lane keeping, not a cut-in)

    def __post_init__(self) -> None:
        for name in (
            "response_time_s", "min_brake_mps2", "max_brake_lead_mps2", "partial_ttc_s",
            "partial_decel_trigger_mps2", "full_ttc_s", "full_decel_trigger_mps2", "partial_decel_mps2",
            "full_decel_mps2", "brake_gain", "release_decel_mps2", "release_ttc_s", "track_jump_m",
            "cut_in_offset_m", "cut_in_lateral_speed_mps",
        ):
            _positive(name, getattr(self, name))
        for name in ("max_accel_response_mps2", "actuation_delay_s", "standstill_gap_m"):
            _non_negative(name, getattr(self, name))
        _require(self.full_ttc_s <= self.partial_ttc_s, "full_ttc_s", self.full_ttc_s, "<= partial_ttc_s")
        _require(
            self.full_decel_trigger_mps2 >= self.partial_decel_trigger_mps2,
            "full_decel_trigger_mps2", self.full_decel_trigger_mps2, ">= partial_decel_trigger_mps2",
        )
        _require(
            self.full_decel_mps2 >= self.partial_decel_mps2,
            "full_decel_mps2", self.full_decel_mps2, ">= partial_decel_mps2",
        )
        _require(
            self.release_decel_mps2 <= self.partial_decel_trigger_mps2,
            "release_decel_mps2", self.release_decel_mps2, "<= partial_decel_trigger_mps2",
        )
        _require(self.release_ttc_s >= self.partial_ttc_s, "release_ttc_s", self.release_ttc_s, ">= partial_ttc_s")
        _require(
            isinstance(self.fcw_lead_time_s, (int, float)) and self.fcw_lead_time_s >= R152_MIN_WARNING_S,
            "fcw_lead_time_s", self.fcw_lead_time_s, f">= {R152_MIN_WARNING_S} s (UN R152)",
        )
        _require(
            isinstance(self.lead_decel_window_ticks, int) and self.lead_decel_window_ticks >= 2,
            "lead_decel_window_ticks", self.lead_decel_window_ticks, "an int >= 2",
        )


@dataclass(frozen=True)
class WatchdogConfig:
    """What counts as a faulty model reply or stale input."""

    deadline_s: float = 0.1  # a reply older than this at the tick is late (a missed deadline)
    stale_ticks: int = 3  # sensor frames older than this many control periods are stale
    plausible_accel_min_mps2: float = -12.0  # outside this the model is wrong, not merely aggressive
    plausible_accel_max_mps2: float = 6.0
    plausible_steer_abs_rad: float = 1.0

    def __post_init__(self) -> None:
        _positive("deadline_s", self.deadline_s)
        _require(isinstance(self.stale_ticks, int) and self.stale_ticks >= 1, "stale_ticks", self.stale_ticks, "an int >= 1")
        _require(
            math.isfinite(self.plausible_accel_min_mps2) and self.plausible_accel_min_mps2 < 0,
            "plausible_accel_min_mps2", self.plausible_accel_min_mps2, "finite and < 0",
        )
        _positive("plausible_accel_max_mps2", self.plausible_accel_max_mps2)
        _positive("plausible_steer_abs_rad", self.plausible_steer_abs_rad)


@dataclass(frozen=True)
class LimitsConfig:
    """Actuator envelope applied to every command, model or fallback.

    Raising acceleration is always limited by ``max_jerk_mps3``; lowering it (braking harder) may use
    ``emergency_jerk_mps3`` when AEB or a fallback activation demands it, so a brake is never delayed by
    comfort limits.
    """

    max_accel_mps2: float = 3.0
    max_decel_mps2: float = 9.0
    max_jerk_mps3: float = 5.0
    emergency_jerk_mps3: float = 120.0
    max_steer_rad: float = 0.35
    max_steer_rate_radps: float = 0.6

    def __post_init__(self) -> None:
        for name in ("max_accel_mps2", "max_decel_mps2", "max_jerk_mps3", "emergency_jerk_mps3",
                     "max_steer_rad", "max_steer_rate_radps"):
            _positive(name, getattr(self, name))
        _require(
            self.emergency_jerk_mps3 >= self.max_jerk_mps3,
            "emergency_jerk_mps3", self.emergency_jerk_mps3, ">= max_jerk_mps3",
        )


@dataclass(frozen=True)
class FallbackConfig:
    """The minimal-risk manoeuvre: brake to a stop while a P controller holds the lane."""

    comfort_decel_mps2: float = 3.0
    lane_gain_radpm: float = 0.02  # steering per metre of lane offset
    heading_gain: float = 0.3  # steering per radian of heading error

    def __post_init__(self) -> None:
        _positive("comfort_decel_mps2", self.comfort_decel_mps2)
        _non_negative("lane_gain_radpm", self.lane_gain_radpm)
        _non_negative("heading_gain", self.heading_gain)


@dataclass(frozen=True)
class LaneConfig:
    """Lane-departure guard: the AEB only looks ahead, so a model that drifts sideways is caught here.

    The guard fires when the offset predicted ``lookahead_s`` ahead (straight-line, from the heading error)
    exceeds ``max_offset_m``. It prevents collisions, not line touches: a 2 m car in a 4 m lane touches the
    line at 1 m, and a same-size car centred in the next lane at 2 m, so 1.4 m leaves 0.6 m. The bootstrap
    model's sway stays within 0.62 m over 200 nominal episodes; a model that passes 1.4 m is driving badly.
    """

    max_offset_m: float = 1.4
    lookahead_s: float = 0.5

    def __post_init__(self) -> None:
        _positive("max_offset_m", self.max_offset_m)
        _non_negative("lookahead_s", self.lookahead_s)


@dataclass(frozen=True)
class AdvisoryConfig:
    """How a road-hazard advisory (``safety/advisory.py``) caps the command: gently, never past comfort.

    Speed: the allowed speed ``d`` metres before the hazard is ``sqrt(v_adv^2 + 2 plan_decel d)`` (a constant
    ``plan_decel_mps2`` slow-down that reaches the advised speed at the hazard); the cap is
    ``speed_gain_per_s`` x (allowed - ego speed). Time gap: a constant-time-gap law towards
    ``standstill_gap_m + time_gap x ego speed``, ``gap_gain_per_s2`` on the gap error and ``gap_speed_gain_per_s``
    on the speed difference (typical ACC gains). Neither cap brakes harder than ``max_decel_mps2``: an advisory
    slows the vehicle as a driver would; emergencies stay the AEB's.
    """

    plan_decel_mps2: float = 1.5
    speed_gain_per_s: float = 1.0
    gap_gain_per_s2: float = 0.2
    gap_speed_gain_per_s: float = 0.6
    standstill_gap_m: float = 5.0
    max_decel_mps2: float = 3.0

    def __post_init__(self) -> None:
        for name in ("plan_decel_mps2", "speed_gain_per_s", "gap_gain_per_s2", "gap_speed_gain_per_s",
                     "max_decel_mps2"):
            _positive(name, getattr(self, name))
        _non_negative("standstill_gap_m", self.standstill_gap_m)
        _require(self.plan_decel_mps2 <= self.max_decel_mps2, "plan_decel_mps2", self.plan_decel_mps2,
                 "<= max_decel_mps2")


@dataclass(frozen=True)
class HeadwayConfig:
    """The headway floor (``safety/headway.py``): while the model drives closer than ``time_gap_s`` x ego speed +
    ``standstill_gap_m`` behind its lead, its acceleration request is capped at ``-gain_mps2`` x shortfall / floor.

    Why: the AEB's partial stage waits for TTC <= ``AebConfig.partial_ttc_s``, so a model that tailgates at
    0.5 s with a small closing speed goes unchallenged until the lead stops abruptly (a wreck), and then even
    full braking is too late. 1.0 s is half the usual 2 s rule and below what any competent follower keeps
    (the IDM expert keeps 1.5 s); the cap brakes at most ``gain_mps2`` (comfort), emergencies stay the AEB's.
    Both distances 0 disable the floor.
    """

    time_gap_s: float = 1.0
    standstill_gap_m: float = 2.0
    gain_mps2: float = 3.0

    def __post_init__(self) -> None:
        _non_negative("time_gap_s", self.time_gap_s)
        _non_negative("standstill_gap_m", self.standstill_gap_m)
        _positive("gain_mps2", self.gain_mps2)


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything the supervisor needs, plus the arbitration (hand-back) rules."""

    aeb: AebConfig = field(default_factory=AebConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    lane: LaneConfig = field(default_factory=LaneConfig)
    advisory: AdvisoryConfig = field(default_factory=AdvisoryConfig)
    headway: HeadwayConfig = field(default_factory=HeadwayConfig)
    control_period_s: float = 0.1
    handback_hold_s: float = 1.0  # hazard must have been clear this long ...
    handback_valid_ticks: int = 5  # ... and the model valid this many ticks in a row

    def __post_init__(self) -> None:
        _positive("control_period_s", self.control_period_s)
        _non_negative("handback_hold_s", self.handback_hold_s)
        _require(
            isinstance(self.handback_valid_ticks, int) and self.handback_valid_ticks >= 1,
            "handback_valid_ticks", self.handback_valid_ticks, "an int >= 1",
        )
        _require(
            self.fallback.comfort_decel_mps2 <= self.limits.max_decel_mps2,
            "fallback.comfort_decel_mps2", self.fallback.comfort_decel_mps2, "<= limits.max_decel_mps2",
        )
        _require(
            self.advisory.max_decel_mps2 <= self.limits.max_decel_mps2,
            "advisory.max_decel_mps2", self.advisory.max_decel_mps2, "<= limits.max_decel_mps2",
        )
        _require(
            self.headway.gain_mps2 <= self.limits.max_decel_mps2,
            "headway.gain_mps2", self.headway.gain_mps2, "<= limits.max_decel_mps2",
        )
        _require(
            self.aeb.full_decel_mps2 <= self.limits.max_decel_mps2,
            "aeb.full_decel_mps2", self.aeb.full_decel_mps2, "<= limits.max_decel_mps2",
        )
