"""1-D longitudinal closed loop for the safety tests: pure kinematics, dt 0.1 s, 0.25 s brake lag.

The ego follows the supervisor's acceleration command through a first-order actuator lag (exact
exponential update on 10 sub-steps per tick) and never reverses; the lead holds its speed or brakes at a
given deceleration to standstill. Gaps are bumper to bumper: a gap <= 0 is a collision.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from driveloop.safety import Advisory, Decision, ModelReply, Supervisor, SupervisorConfig, SupervisorInputs, TrackData
from driveloop.safety.config import HeadwayConfig

# mutmut sets MUTANT_UNDER_TEST in every phase; the slowest sweeps then run a subset (docs/BENCHMARKS.md (Safety layer))
UNDER_MUTMUT = "MUTANT_UNDER_TEST" in os.environ

DT_S = 0.1
LAG_S = 0.25
SUBSTEPS = 10
KMH = 1.0 / 3.6
START_TTC_S = 4.0  # Euro NCAP starts CCRs/CCRm at TTC 4 s
MIN_START_GAP_M = 10.0

# The AEB alone (the headway floor disabled): the CCR sweeps prove the AEB saves a blind model by itself.
NO_FLOOR = SupervisorConfig(headway=HeadwayConfig(time_gap_s=0.0, standstill_gap_m=0.0))

# A model maps (now_s, ego_speed_mps, gap_m | None, lead_speed_mps | None) to a reply.
Model = Callable[[float, float, "float | None", "float | None"], ModelReply]


@dataclass(frozen=True)
class Case:
    name: str
    ego_speed_mps: float
    lead_speed_mps: float
    gap_m: float
    lead_decel_mps2: float = 0.0
    lead_brake_at_s: float = math.inf
    duration_s: float = 20.0


def ccr_cases() -> list[Case]:
    """The 30 Euro NCAP car-to-car rear cases: 15 CCRs, 11 CCRm, 4 CCRb."""
    cases = []
    for kmh in range(10, 85, 5):
        v = kmh * KMH
        cases.append(Case(f"ccrs-{kmh}", v, 0.0, max(START_TTC_S * v, MIN_START_GAP_M)))
    for kmh in range(30, 85, 5):
        v, lead = kmh * KMH, 20 * KMH
        cases.append(Case(f"ccrm-{kmh}", v, lead, max(START_TTC_S * (v - lead), MIN_START_GAP_M)))
    for headway in (12, 40):
        for decel in (2, 6):
            v = 50 * KMH
            cases.append(Case(f"ccrb-{headway}-{decel}", v, v, float(headway), float(decel), lead_brake_at_s=2.0))
    return cases


def dead_model(now_s: float, ego: float, gap: float | None, lead: float | None) -> ModelReply:
    return ModelReply(None, None, None, alive=False)


def blind_model(now_s: float, ego: float, gap: float | None, lead: float | None) -> ModelReply:
    """A model that never sees the lead: holds its speed (the worst case AEB must catch)."""
    return ModelReply(np.array([0.0, 0.0], np.float32), np.array([0.9], np.float32), now_s)


def idm_model(now_s: float, ego: float, gap: float | None, lead: float | None) -> ModelReply:
    """A competent follower (IDM, 1.5 s headway): nominal driving that must never trigger the safety layer."""
    desired = 30.0
    free = 1.0 - (ego / desired) ** 4
    if gap is None or lead is None:
        accel = 1.5 * free
    else:
        s_star = 4.0 + ego * 1.5 + ego * (ego - lead) / (2.0 * math.sqrt(1.5 * 2.0))
        accel = 1.5 * (free - (max(s_star, 0.0) / max(gap, 0.1)) ** 2)
    accel = min(max(accel, -6.0), 1.5)
    return ModelReply(np.array([accel, 0.0], np.float32), np.array([0.9], np.float32), now_s)


TAILGATE_HEADWAY_S = 0.6
TAILGATE_GAP_GAIN_PER_S2 = 0.3
TAILGATE_SPEED_GAIN_PER_S = 0.8


def tailgater_model(now_s: float, ego: float, gap: float | None, lead: float | None) -> ModelReply:
    """A model that follows at 0.6 s + 2 m (what v2 did in the work zone): it tracks its lead's speed, so the
    AEB never sees a closing speed until the lead stops abruptly, and then the distance to brake in is gone."""
    if gap is None or lead is None:
        accel = 1.0
    else:
        accel = (TAILGATE_GAP_GAIN_PER_S2 * (gap - (2.0 + TAILGATE_HEADWAY_S * ego))
                 + TAILGATE_SPEED_GAIN_PER_S * (lead - ego))
    accel = min(max(accel, -6.0), 2.0)
    return ModelReply(np.array([accel, 0.0], np.float32), np.array([0.9], np.float32), now_s)


@dataclass
class Result:
    collision: bool
    min_gap_m: float
    activations: int
    first_fcw_s: float | None
    first_brake_s: float | None
    decisions: list[Decision] = field(default_factory=list)
    inputs: list[SupervisorInputs] = field(default_factory=list)


def run(case: Case, model: Model, *, noise_sigma: float = 0.0, seed: int = 0,
        config: SupervisorConfig | None = None, lead_accel: Callable[[float], float] | None = None,
        track_visible: bool = True, keep: bool = False, sensor_range_m: float = math.inf,
        advisory: Callable[[float], Advisory | None] | None = None) -> Result:
    """Drive one case to the end (or to a collision) and report what the safety layer did.

    ``sensor_range_m``: the lead is seen only within this gap (fog, a jam beyond sensor range);
    ``advisory(ego_x_m)``: the road-hazard advisory at the ego's position (the lead starts at x = gap)."""
    rng = np.random.default_rng(seed)
    supervisor = Supervisor(config)
    x_e, v_e, a_e = 0.0, case.ego_speed_mps, 0.0
    x_l, v_l = case.gap_m, case.lead_speed_mps
    min_gap, activations = math.inf, 0
    first_fcw = first_brake = None
    decisions: list[Decision] = []
    inputs_log: list[SupervisorInputs] = []
    alpha = 1.0 - math.exp(-(DT_S / SUBSTEPS) / LAG_S)
    for tick in range(int(round(case.duration_s / DT_S))):
        now = tick * DT_S
        gap = x_l - x_e
        min_gap = min(min_gap, gap)
        if gap <= 0.0:
            return Result(True, gap, activations, first_fcw, first_brake, decisions, inputs_log)
        noise = rng.normal(0.0, noise_sigma, 3) if noise_sigma > 0 else np.zeros(3)
        track = None
        if track_visible and gap <= sensor_range_m:
            track = TrackData(gap + noise[0], (v_e - v_l) + noise[1], max(v_l + noise[2], 0.0))
        reply = model(now, v_e, track.gap_m if track else None, track.lead_speed_mps if track else None)
        inputs = SupervisorInputs(now_s=now, ego_speed_mps=v_e, ego_accel_mps2=a_e, lane_offset_m=0.0,
                                  heading_rel_rad=0.0, track=track, sensor_stamp_s=now, reply=reply,
                                  advisory=advisory(x_e) if advisory is not None else None)
        decision = supervisor.step(inputs)
        activations += decision.activation
        if decision.fcw and first_fcw is None:
            first_fcw = now
        if decision.aeb and first_brake is None:
            first_brake = now
        if keep:
            decisions.append(decision)
            inputs_log.append(inputs)
        for _ in range(SUBSTEPS):
            h = DT_S / SUBSTEPS
            a_e += (decision.accel_mps2 - a_e) * alpha
            v_new = max(v_e + a_e * h, 0.0)
            x_e += 0.5 * (v_e + v_new) * h
            v_e = v_new
            if now + h >= case.lead_brake_at_s:
                a_l = -case.lead_decel_mps2
            else:
                a_l = lead_accel(now) if lead_accel is not None else 0.0
            v_l_new = max(v_l + a_l * h, 0.0)
            x_l += 0.5 * (v_l + v_l_new) * h
            v_l = v_l_new
    min_gap = min(min_gap, x_l - x_e)
    return Result(min_gap <= 0.0, min_gap, activations, first_fcw, first_brake, decisions, inputs_log)
