"""The supervisor: arbitrates between the model and the fallback, every tick, under the actuator limits.

``step(state, inputs, config) -> (state, decision)`` is pure: the clock comes in ``inputs.now_s`` and the
whole memory is the frozen ``SupervisorState``, so a recorded drive replays to the same decisions.
``Supervisor`` is the thin stateful wrapper the control loop holds; it also logs each activation and
hand-back with its reason and timing.

Arbitration rules:
- A hazard is an AEB brake stage (the partial stage not if a valid model already brakes with margin), a
  watchdog fault, a predicted lane departure, or the model being disabled. The AEB assesses the lead and
  every neighbour that is cutting in (``aeb.cutting_in``) and brakes for the most demanding of them; while
  it brakes for a cut-in the wheel is held straight (lane keeping would steer back towards the lane's
  centre, into a car that is coming from that side). Any hazard puts the
  fallback in command on the same tick (``activation`` is True on the first such tick).
- Hand-back to the model needs the hazard clear for ``handback_hold_s`` and the model valid for
  ``handback_valid_ticks`` consecutive ticks (hysteresis); the jerk limit then ramps the command.
- Every command passes the actuator limits; braking for a hazard may use the emergency jerk.
- A road-hazard advisory (``inputs.advisory``) caps the request, model or fallback, before the limits: it
  can only lower a command (``safety/advisory.py``), never touch the AEB, watchdog or hand-back.
- The headway floor (``safety/headway.py``) caps the *model's* request while it follows its lead closer than
  ``headway.time_gap_s`` x speed + standstill gap: a limitation like the advisory, so it only lowers the
  request, before the limits (comfort jerk), never activates the fallback and is no intervention; it is
  reported in ``parts`` (``headway_cap_mps2``, ``headway_floor_m``) and as the reason when no other applies.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, cast

from driveloop.core.exceptions import SafetyError

from . import aeb, lane
from .advisory import accel_cap_mps2
from .config import SupervisorConfig
from .fallback import fallback_command
from .headway import NO_CAP_MPS2, floor_gap_m, headway_cap_mps2
from .limits import limit_command
from .types import Decision, SupervisorInputs
from .watchdog import Verdict, check_reply

logger = logging.getLogger(__name__)

TIME_TOLERANCE_S = 1e-9  # float sums of 0.1 s ticks must not miss a hold time by rounding


class SupervisorState(NamedTuple):
    """Everything the supervisor remembers between ticks (immutable; a NamedTuple because it is rebuilt
    every tick of every vehicle, and a tuple builds several times faster than a frozen dataclass)."""

    mode: str = "model"  # "model" or "fallback"
    last_now_s: float | None = None
    prev_accel_mps2: float | None = None
    prev_steering_rad: float = 0.0
    aeb_braking: bool = False
    lead_history: tuple[tuple[float, float], ...] = ()  # (time_s, lead_speed_mps), oldest first
    last_gap_m: float | None = None
    hazard_clear_since_s: float | None = None
    valid_streak: int = 0
    fallback_since_s: float | None = None


def _lead_history(state: SupervisorState, inputs: SupervisorInputs, dt_s: float,
                  config: SupervisorConfig) -> tuple[tuple[float, float], ...]:
    """The lead's speed history with this tick appended; restarted when the track vanishes or jumps."""
    track = inputs.track
    if track is None:
        return ()
    sample = (inputs.now_s, float(track.lead_speed_mps))
    if state.last_gap_m is not None:
        expected_change = abs(float(track.closing_speed_mps)) * dt_s + config.aeb.track_jump_m
        if abs(float(track.gap_m) - state.last_gap_m) <= expected_change:
            return (state.lead_history + (sample,))[-config.aeb.lead_decel_window_ticks:]
    return (sample,)


def _cut_in(inputs: SupervisorInputs, was_braking: bool,
            config: SupervisorConfig) -> tuple[aeb.AebAssessment, float] | None:
    """(AEB verdict, gap_m) for the most demanding neighbour that is cutting in, or None when none is."""
    worst = None
    for side in inputs.neighbours:
        if aeb.cutting_in(float(side.lane_offset_m), float(side.lateral_speed_mps), config.aeb):
            got = aeb.assess(float(side.gap_m), inputs.ego_speed_mps, float(side.lead_speed_mps),
                             float(side.closing_speed_mps), (), was_braking, config.aeb, inputs.road_friction)
            if worst is None or (got.level, got.decel_mps2) > (worst[0].level, worst[0].decel_mps2):
                worst = (got, float(side.gap_m))
    return worst


def _hazard_reason(verdict: Verdict, assessment: aeb.AebAssessment | None, model_enabled: bool,
                   departure_m: float | None, cut_in: bool) -> str | None:
    """Why the fallback must drive this tick, or None. Faults first: they are the least recoverable."""
    if not model_enabled:
        return "model disabled"
    if verdict.fault is not None:
        return f"watchdog {verdict.fault}: {verdict.detail}"
    if assessment is not None and assessment.level > aeb.NONE:
        stage = ("full" if assessment.level == aeb.FULL else "partial") + (" cut-in" if cut_in else "")
        return (f"aeb {stage}: ttc={assessment.ttc_s:.2f} s, required decel "
                f"{assessment.required_decel_mps2:.2f} m/s^2")
    if departure_m is not None:
        return f"lane departure: offset {departure_m:+.2f} m predicted"
    return None


def step(state: SupervisorState, inputs: SupervisorInputs, config: SupervisorConfig) -> tuple[SupervisorState, Decision]:
    """One control tick: the new state and the decision (pure; deterministic in its arguments)."""
    if state.last_now_s is None:
        dt = config.control_period_s
    else:
        dt = inputs.now_s - state.last_now_s
        if dt <= 0.0:
            raise SafetyError(f"supervisor clock did not advance: {state.last_now_s} -> {inputs.now_s}")

    history = _lead_history(state, inputs, dt, config)
    assessment = None
    track_parts: dict[str, float] = {}
    track = inputs.track
    if track is not None:
        assessment = aeb.assess(float(track.gap_m), inputs.ego_speed_mps, float(track.lead_speed_mps),
                                float(track.closing_speed_mps), history, state.aeb_braking, config.aeb,
                                inputs.road_friction)
        track_parts = {
            "gap_m": float(track.gap_m),
            "ttc_s": assessment.ttc_s,
            "rss_safe_gap_m": assessment.rss_safe_gap_m,
            "required_decel_mps2": assessment.required_decel_mps2,
            "lead_decel_mps2": assessment.lead_decel_mps2,
        }
    cut_in = _cut_in(inputs, state.aeb_braking, config)
    braking_for_cut_in = cut_in is not None and (
        assessment is None or (cut_in[0].level, cut_in[0].decel_mps2) > (assessment.level, assessment.decel_mps2))
    if cut_in is not None:
        side, track_parts["cut_in_gap_m"] = cut_in
        track_parts["cut_in_required_decel_mps2"] = side.required_decel_mps2
        if braking_for_cut_in:
            assessment = side
        elif side.fcw:
            assessment = assessment._replace(fcw=True)  # type: ignore[union-attr]  # the lead decides; warn too
    if inputs.model_enabled:
        verdict = check_reply(inputs.reply, inputs.now_s, inputs.sensor_stamp_s, config.control_period_s,
                              config.watchdog)
    else:
        verdict = Verdict(None)
    if assessment is not None and inputs.model_enabled and verdict.fault is None and \
            aeb.model_brakes_enough(assessment, verdict.accel_mps2, config.aeb):
        assessment = assessment._replace(level=aeb.NONE, decel_mps2=0.0)
    aeb_braking = assessment is not None and assessment.level > aeb.NONE
    departure_m = lane.departure(inputs.lane_offset_m, inputs.heading_rel_rad, inputs.ego_speed_mps, config.lane)
    reason = _hazard_reason(verdict, assessment, inputs.model_enabled, departure_m, braking_for_cut_in)
    model_valid = inputs.model_enabled and verdict.fault is None
    valid_streak = state.valid_streak + 1 if model_valid else 0
    if reason is not None:
        clear_since = None
    else:
        clear_since = state.hazard_clear_since_s if state.hazard_clear_since_s is not None else inputs.now_s

    activation = False
    if reason is not None:
        mode = "fallback"
        activation = state.mode == "model"
    elif state.mode == "fallback":
        held = clear_since is not None and inputs.now_s - clear_since >= config.handback_hold_s - TIME_TOLERANCE_S
        mode = "model" if held and valid_streak >= config.handback_valid_ticks else "fallback"
        reason = None if mode == "model" else "hand-back pending"
    else:
        mode = "model"
    fallback_since = (inputs.now_s if activation else state.fallback_since_s) if mode == "fallback" else None

    aeb_decel = assessment.decel_mps2 if assessment is not None else 0.0
    if mode == "model":
        request = (verdict.accel_mps2, verdict.steering_rad)
    else:
        request = fallback_command(inputs.ego_speed_mps, inputs.lane_offset_m, inputs.heading_rel_rad,
                                   aeb_decel, config.fallback)
        if braking_for_cut_in and aeb_braking:
            request = (request[0], 0.0)
    headway_binds = False
    if mode == "model":  # the fallback and the AEB brake by their own rules; the floor holds a tailgating model back
        headway_cap = headway_cap_mps2(inputs.ego_speed_mps, track, config.headway)
        if headway_cap != NO_CAP_MPS2:
            track_parts["headway_cap_mps2"] = headway_cap
            track_parts["headway_floor_m"] = floor_gap_m(inputs.ego_speed_mps, config.headway)
            headway_binds = headway_cap < request[0]
            request = (min(request[0], headway_cap), request[1])
    if inputs.advisory is not None:  # a road hazard ahead: only ever lowers the request (safety/advisory.py)
        track_parts["advisory_cap_mps2"] = cap = accel_cap_mps2(inputs.advisory, inputs.ego_speed_mps, track,
                                                                config.advisory)
        request = (min(request[0], cap), request[1])
    prev_accel = state.prev_accel_mps2 if state.prev_accel_mps2 is not None else inputs.ego_accel_mps2
    emergency = mode == "fallback" and (aeb_braking or verdict.fault is not None or activation)
    accel, steer = limit_command(request[0], request[1], prev_accel, state.prev_steering_rad, dt, emergency,
                                 config.limits)

    fcw = assessment is not None and assessment.fcw
    if reason is None and fcw:
        reason = "fcw"
    if reason is None and headway_binds:
        reason = (f"headway floor: gap {track_parts['gap_m']:.2f} m < {track_parts['headway_floor_m']:.2f} m, "
                  f"accel capped at {track_parts['headway_cap_mps2']:.2f} m/s^2")
    parts = {
        "dt_s": dt,
        "valid_streak": float(valid_streak),
        "aeb_decel_mps2": aeb_decel,
        "fallback_s": inputs.now_s - fallback_since if fallback_since is not None else 0.0,
        **track_parts,
    }
    decision = Decision(
        accel_mps2=accel,
        steering_rad=steer,
        source="model" if mode == "model" else "fallback",
        fcw=fcw,
        aeb=aeb_braking,
        watchdog=verdict.fault,
        activation=activation,
        reason=reason,
        parts=parts,
    )
    new_state = SupervisorState(
        mode=mode,
        last_now_s=inputs.now_s,
        prev_accel_mps2=accel,
        prev_steering_rad=steer,
        aeb_braking=aeb_braking,
        lead_history=history,
        last_gap_m=track_parts.get("gap_m"),
        hazard_clear_since_s=clear_since,
        valid_streak=valid_streak,
        fallback_since_s=fallback_since,
    )
    return new_state, decision


class Supervisor:
    """Stateful wrapper around ``step`` for the control loop; logs activations and hand-backs."""

    def __init__(self, config: SupervisorConfig | None = None) -> None:
        self.config = config if config is not None else SupervisorConfig()
        self.state = SupervisorState()

    def reset(self) -> None:
        """Forget everything (a new drive or a new episode)."""
        self.state = SupervisorState()

    def step(self, inputs: SupervisorInputs) -> Decision:
        """Decide this tick's command and advance the state."""
        before = self.state
        self.state, decision = step(before, inputs, self.config)
        if decision.activation:
            logger.info("fallback activation at t=%.3f s (ego %.2f m/s): %s", inputs.now_s,
                        inputs.ego_speed_mps, decision.reason)
        elif before.mode == "fallback" and decision.source == "model":
            held = inputs.now_s - cast(float, before.fallback_since_s)  # pragma: no mutate (cast is typing only)
            logger.info("hand-back to the model at t=%.3f s after %.2f s of fallback", inputs.now_s, held)
        return decision
