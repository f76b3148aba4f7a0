"""Hindsight auto-labeling: a privileged teacher that sees the segment's future and the logged ground truth.

On the vehicle the model only sees the present; in the cloud we know what happened next. The teacher
produces the action the model *should* have produced:

- **Longitudinal**: a hindsight planner. Knowing where the vehicle ahead *will* be over the next
  ``horizon_s`` (so a cut-in or a braking lead counts before it shows), it finds the gentlest constant
  acceleration, starting now after the brake lag, that keeps the gap at every future step at least
  ``min_gap_m`` plus the distance needed to match the lead's speed at ``comfort_decel_mps2``. Brake just
  enough, as early as the future demands: not harder (comfort), not longer or further back than needed
  (progress), and early enough that the fallback need not intervene. A car hidden in fog counts only from
  ``revealed_lead_anticipation_s`` before the vehicle's sensors see it (the vehicle could not know more); a
  car merging where merging traffic reacts to the ego (``reactive_merge_classes``: a work zone's zipper) from
  ``reactive_merge_anticipation_s`` before it is the lead (when it visibly moves over).
- **Base command**: the label is the base command (by default the fleet model's own logged command, the
  smallest change) lowered to the planner's acceleration where that brakes more; nominal frames keep
  the base exactly. Steering comes from the base.
- **Lateral** without an expert: lane keeping (steer against the lane offset and heading error).
- **Hazard**: ``hazard`` is True when within ``hazard_horizon_s`` the ground-truth TTC (from gaps and
  speeds in ``/vehicle/state``) falls below ``hazard_ttc_s`` or the ego collides; ``time_to_hazard_s``
  says how soon (inf when none).

``labeler_accuracy`` reports how well the teacher matches simulator ground truth: agreement with the
logged expert action on nominal frames, and hazard precision/recall against the vehicle's logged TTC
events and collisions. Everything here is pure numpy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from driveloop.cloud.mining import SegmentFrames, scenario_kind, widen_mask
from driveloop.contracts.observation import CONTROL_PERIOD_S
from driveloop.core.exceptions import ConfigError, ScenarioError
from driveloop.sim.scenarios import fog_sensor_degradation, parse_scenario

logger = logging.getLogger(__name__)

LABEL_VERSION = "hindsight-plan-5"


@dataclass(frozen=True)
class LabelerConfig:
    horizon_s: float = 4.0  # how far the planner looks into the recorded future
    time_gap_s: float = 1.5  # IDM (only where no base command is logged)
    min_gap_m: float = 4.0  # the planner keeps at least this gap (and the IDM's jam distance)
    plan_accel_step_mps2: float = 0.1  # resolution of the planner's acceleration search
    brake_lag_s: float = 0.25  # the vehicle's brake actuation lag: braking starts this much later
    max_accel_mps2: float = 2.0
    comfort_decel_mps2: float = 3.0
    max_decel_mps2: float = 6.0
    label_jerk_mps3: float = 4.0  # labels ramp at most this fast (only ever by braking earlier / releasing later)
    # A vehicle that becomes the lead later (a cut-in, a merge) is anticipated at most this long before it does:
    # the whole horizon by default (an aggressive cut-in 9 m ahead cannot be met without braking before the
    # cutter moves: at 0.5 s the aggressive adaptation found no candidate, held-out 1 -> 1).
    new_lead_anticipation_s: float = 4.0
    # ... except in the scenario classes whose merging traffic reacts to the ego: in a work zone a car in the
    # closing lane comes over when the ego comes close (zipper). Braking for it seconds ahead teaches hanging
    # back behind cars that then never merge; anticipated from 0.5 s (a car is the lead 0.3-0.4 s after it
    # starts to move over), the label brakes once the move is visible. construction-12-20 from v2's data: 4 s
    # -> held-out progress 0.72 -> 0.64 (rejected); 1 s -> 0.65; 0.5 s -> 0.66, interventions 2 -> 0 each.
    reactive_merge_classes: tuple[str, ...] = ("construction",)
    reactive_merge_anticipation_s: float = 0.5
    # A lead that comes out of the fog is anticipated at most this long before the sensors see it: the teacher
    # sees ground truth, the vehicle did not, and braking for a car still hidden teaches braking for the fog
    # itself (fog-25 from v2's data, 4 s: the candidate crawled, held-out progress 0.71 -> 0.22).
    revealed_lead_anticipation_s: float = 0.5
    lead_jump_m: float = 5.0  # a lead gap changing more than this in one period is another vehicle
    lead_jump_mps: float = 2.0  # ... as is a lead speed changing more than this in one period
    idm_delta: float = 4.0
    lane_gain_rad_per_m: float = 0.08
    heading_gain: float = 0.8
    max_steer_rad: float = 0.25
    hazard_ttc_s: float = 3.0
    hazard_horizon_s: float = 3.0
    agree_accel_mps2: float = 1.0
    agree_steer_rad: float = 0.05
    nominal_margin_s: float = 3.0  # frames this far from any event count as nominal
    # What the planner lowers: "model" the fleet model's own logged command (the smallest change that
    # brakes earlier), "expert" the simulator's logged expert, "idm" present-lead IDM + lane keeping.
    # Missing values fall back model -> expert -> idm.
    base_action: str = "model"

    def __post_init__(self) -> None:
        if self.base_action not in ("model", "expert", "idm"):
            raise ConfigError(f"labeler base_action must be model, expert or idm, got {self.base_action!r}")
        if not all(isinstance(c, str) for c in self.reactive_merge_classes):
            raise ConfigError("labeler reactive_merge_classes must be scenario class names")
        for name in self.__dataclass_fields__:
            if name in ("base_action", "reactive_merge_classes"):
                continue
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"labeler {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Labels:
    target_action: np.ndarray  # [T, 2] float32: [acceleration_mps2, steering_rad]
    hazard: np.ndarray  # [T] bool
    time_to_hazard_s: np.ndarray  # [T] float32, inf when no hazard within the horizon


def idm_accel(v_mps: np.ndarray, v0_mps: np.ndarray, gap_m: np.ndarray, v_lead_mps: np.ndarray, c: LabelerConfig) -> np.ndarray:
    """IDM acceleration; a NaN gap means a free road, a non-positive gap means full braking."""
    v0 = np.maximum(v0_mps, 1.0)
    free = c.max_accel_mps2 * (1.0 - (np.maximum(v_mps, 0.0) / v0) ** c.idm_delta)
    s_star = c.min_gap_m + np.maximum(
        0.0, v_mps * c.time_gap_s + v_mps * (v_mps - v_lead_mps) / (2.0 * math.sqrt(c.max_accel_mps2 * c.comfort_decel_mps2))
    )
    has_lead = np.isfinite(gap_m)
    safe_gap = np.where(has_lead, np.maximum(np.nan_to_num(gap_m, nan=1.0), 1e-3), 1.0)
    interaction = np.where(has_lead, (np.nan_to_num(s_star) / safe_gap) ** 2, 0.0)
    accel = free - c.max_accel_mps2 * interaction
    accel = np.where(has_lead & (np.nan_to_num(gap_m, nan=1.0) <= 0.0), -c.max_decel_mps2, accel)
    return np.clip(accel, -c.max_decel_mps2, c.max_accel_mps2)


def ground_truth_ttc(frames: SegmentFrames) -> np.ndarray:
    """TTC to the lead from logged gaps and speeds (inf when nothing closes)."""
    closing = frames.ego_speed_mps - frames.lead_speed_mps
    with np.errstate(divide="ignore", invalid="ignore"):
        ttc = np.where(np.isfinite(frames.lead_gap_m) & (closing > 1e-6), np.maximum(frames.lead_gap_m, 0.0) / closing, np.inf)
    return np.nan_to_num(ttc, nan=np.inf)


def _future_steps(n: int, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Index matrix [n, K+1] of t..t+K (clamped to the segment end) and a validity mask."""
    k = round(horizon_s / CONTROL_PERIOD_S)
    idx = np.arange(n)[:, None] + np.arange(k + 1)[None, :]
    return np.minimum(idx, n - 1), idx < n


def future_gaps(frames: SegmentFrames, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(gap to whoever will be ahead at t+k had the ego held its speed from t, that vehicle's speed),
    both [T, K+1] with NaN past the segment end or where nobody is ahead. The ego's own later braking
    is added back, so the gaps depend only on the other traffic."""
    n = len(frames)
    idx, valid = _future_steps(n, horizon_s)
    v = np.nan_to_num(frames.ego_speed_mps)
    x_ego = np.concatenate([[0.0], np.cumsum(v[:-1] * CONTROL_PERIOD_S)])
    steps = (idx - np.arange(n)[:, None]) * CONTROL_PERIOD_S
    ego_shift = (x_ego[idx] - x_ego[:, None]) - v[:, None] * steps
    gap = np.where(valid, frames.lead_gap_m[idx] + ego_shift, np.nan)
    return gap, np.where(valid, frames.lead_speed_mps[idx], np.nan)


def sensor_visibility_m(scenario: str) -> float:
    """How far the vehicle's sensors saw in the segment's scenario (fog cuts it), inf when clear or unknown."""
    try:
        return fog_sensor_degradation(parse_scenario(scenario))[0]
    except ScenarioError:
        return math.inf


def lead_seen(frames: SegmentFrames) -> np.ndarray:
    """Per frame: is there a lead the vehicle's sensors could see (within the scenario's visibility)?"""
    with np.errstate(invalid="ignore"):
        return np.isfinite(frames.lead_gap_m) & (frames.lead_gap_m <= sensor_visibility_m(frames.scenario))


def lead_since(frames: SegmentFrames, c: LabelerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the index of the frame where its lead became the lead the vehicle sees (the start of the run
    of frames with the same vehicle ahead), and how long before that the teacher may anticipate it: a run
    breaks where a lead appears or leaves (``new_lead_anticipation_s``), comes out of the fog
    (``revealed_lead_anticipation_s``), or its gap or speed jumps by more than one vehicle can move in a
    control period (``lead_jump_m``, ``lead_jump_mps``)."""
    n = len(frames)
    gap, speed = frames.lead_gap_m, frames.lead_speed_mps
    present = lead_seen(frames)
    breaks, revealed = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if n:
        breaks[0] = True
        with np.errstate(invalid="ignore"):
            jump = (np.abs(np.diff(gap)) > c.lead_jump_m) | (np.abs(np.diff(speed)) > c.lead_jump_mps)
        breaks[1:] = (present[1:] != present[:-1]) | (present[1:] & present[:-1] & jump)
        revealed[1:] = present[1:] & ~present[:-1] & np.isfinite(gap[:-1])  # there all along, hidden until now
    since = np.maximum.accumulate(np.where(breaks, np.arange(n), 0))
    new_lead = (c.reactive_merge_anticipation_s if scenario_kind(frames.scenario) in c.reactive_merge_classes
                else c.new_lead_anticipation_s)
    return since, np.where(revealed[since], c.revealed_lead_anticipation_s, new_lead)


def plan_accel(frames: SegmentFrames, c: LabelerConfig) -> np.ndarray:
    """Per frame, the highest constant acceleration (after ``brake_lag_s``) that keeps every future gap
    safe over the horizon: gap >= min_gap + (v^2 - v_lead^2) / (2 * comfort_decel),
    i.e. the lead's speed can still be matched comfortably, if that takes no more than
    ``comfort_decel_mps2``. Where it would, the state is already tight: the gentlest acceleration that
    keeps ``min_gap`` (but at least comfort braking), and ``-max_decel_mps2`` where even that fails.
    Steps inside the brake lag are skipped: no acceleration can change them; so are steps whose lead the
    sensors cannot see (beyond a fog's visibility: braking for it would teach braking for fog itself) or whose
    lead becomes the lead later than its anticipation limit after the frame (:func:`lead_since`).
    ``max_accel_mps2`` where nothing constrains."""
    gap_c, v_lead = future_gaps(frames, c.horizon_s)
    v = np.maximum(np.nan_to_num(frames.ego_speed_mps), 0.0)[:, None]
    tau = np.arange(gap_c.shape[1])[None, :] * CONTROL_PERIOD_S
    idx, _ = _future_steps(len(frames), c.horizon_s)
    since, limit = lead_since(frames, c)
    lead_from_s = (since[idx] - np.arange(len(frames))[:, None]) * CONTROL_PERIOD_S
    active = np.isfinite(gap_c) & (tau > c.brake_lag_s) & lead_seen(frames)[idx] & (lead_from_s <= limit[idx] + 1e-9)
    te = np.maximum(tau - c.brake_lag_s, 0.0)
    free = v * np.minimum(tau, c.brake_lag_s)  # driven before the brake acts
    v_lead2 = np.nan_to_num(v_lead) ** 2
    first = {"comfort": np.full(len(frames), np.nan), "contact": np.full(len(frames), np.nan)}
    for a in np.arange(c.max_accel_mps2, -c.max_decel_mps2 - 1e-9, -c.plan_accel_step_mps2):
        # highest a first; feasibility only grows as a falls, so the first feasible a is the gentlest
        if a < 0:
            disp = free + np.where(te < v / -a, v * te + 0.5 * a * te**2, v**2 / (-2.0 * a))
        else:
            disp = free + v * te + 0.5 * a * te**2
        v_a = np.maximum(v + a * te, 0.0)
        margin = gap_c + v * tau - disp - c.min_gap_m  # the ego covers disp, not v * tau
        closing = np.maximum(v_a**2 - v_lead2, 0.0) / (2.0 * c.comfort_decel_mps2)
        for name, need in (("contact", 0.0), ("comfort", closing)):
            ok = np.all(~active | (margin >= need), axis=1) & np.isnan(first[name])
            first[name][ok] = a
        if not np.isnan(first["comfort"]).any():
            break
    # Anticipation within comfort where it suffices; otherwise the gentlest braking that avoids contact,
    # at least at comfort_decel (the state is already tight); max braking where nothing avoids it.
    tight = np.minimum(np.nan_to_num(first["contact"], nan=-c.max_decel_mps2), -c.comfort_decel_mps2)
    return np.where(first["comfort"] >= -c.comfort_decel_mps2, first["comfort"], tight)


def jerk_limit(accel: np.ndarray, jerk_mps3: float) -> np.ndarray:
    """Rate-limit an acceleration sequence by lowering values only: braking starts earlier (backward
    pass) and is released more gradually (forward pass), so the targets are smooth and never less safe."""
    step = jerk_mps3 * CONTROL_PERIOD_S
    out = np.array(accel, dtype=np.float64, copy=True)
    for t in range(len(out) - 2, -1, -1):  # a[t] <= a[t+1] + step: reach a later brake level in time
        out[t] = min(out[t], out[t + 1] + step)
    for t in range(1, len(out)):  # a[t] <= a[t-1] + step: no sudden release
        out[t] = min(out[t], out[t - 1] + step)
    return out


def label_segment(frames: SegmentFrames, config: LabelerConfig) -> Labels:
    """Target actions and hazard labels for every frame of one segment.

    The label is a base command (``config.base_action``: by default the fleet model's own logged
    command) lowered to the hindsight planner's acceleration where that brakes more, then rate-limited:
    on nominal frames it is the base command unchanged, before a hazard it brakes just enough, earlier.
    Where no base is logged: the present-lead IDM and lane keeping.
    """
    v = np.nan_to_num(frames.ego_speed_mps)
    present = idm_accel(v, np.nan_to_num(frames.set_speed_mps), frames.lead_gap_m, np.nan_to_num(frames.lead_speed_mps), config)
    lane_keep = np.clip(
        -(config.lane_gain_rad_per_m * np.nan_to_num(frames.lane_offset_m) + config.heading_gain * np.nan_to_num(frames.heading_rad)),
        -config.max_steer_rad,
        config.max_steer_rad,
    )
    base = np.stack([present, lane_keep], axis=1)
    sources = {"model": frames.model_action, "expert": frames.expert_action}
    order = {"model": ("expert", "model"), "expert": ("expert",), "idm": ()}[config.base_action]
    for name in order:  # later sources win where they are logged
        logged = np.all(np.isfinite(sources[name]), axis=1)
        base = np.where(logged[:, None], np.nan_to_num(sources[name]), base)
    accel = jerk_limit(np.clip(np.minimum(base[:, 0], plan_accel(frames, config)), -config.max_decel_mps2, config.max_accel_mps2),
                       config.label_jerk_mps3)
    steer = base[:, 1]
    danger = (ground_truth_ttc(frames) < config.hazard_ttc_s) | frames.collision.astype(bool)
    idx, valid = _future_steps(len(frames), config.hazard_horizon_s)
    ahead = danger[idx] & valid
    hazard = ahead.any(axis=1)
    first = np.argmax(ahead, axis=1).astype(np.float32) * CONTROL_PERIOD_S
    tth = np.where(hazard, first, np.inf).astype(np.float32)
    target = np.stack([accel, steer], axis=1).astype(np.float32)
    return Labels(target_action=target, hazard=hazard, time_to_hazard_s=tth)


@dataclass(frozen=True)
class LabelerAccuracy:
    """The teacher against simulator ground truth (named parts, for the pipeline report)."""

    nominal_frames: int  # frames with a logged expert action and no event near them
    expert_accel_mae_mps2: float
    expert_steer_mae_rad: float
    expert_agreement: float  # share of nominal frames within agree_accel_mps2 and agree_steer_rad
    hazard_frames: int
    event_frames: int  # frames with a ground-truth TTC event within the hazard horizon
    hazard_precision: float
    hazard_recall: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def accuracy_parts(frames: SegmentFrames, labels: Labels, config: LabelerConfig) -> dict[str, np.ndarray]:
    """Per-frame ingredients of the accuracy report (so a distributed run can sum them later).

    ``nominal``: an expert action is logged and no event lies within ``nominal_margin_s``;
    ``accel_err``/``steer_err``: |label - expert|; ``event_ahead``: a logged TTC event (the vehicle's
    measured TTC below ``hazard_ttc_s``, or a collision) follows within ``hazard_horizon_s``.
    """
    truth = (frames.ttc_s < config.hazard_ttc_s) | frames.collision
    idx, valid = _future_steps(len(frames), config.hazard_horizon_s)
    margin = round(config.nominal_margin_s / CONTROL_PERIOD_S)
    near_event = widen_mask(frames.event, margin)
    err = np.abs(labels.target_action.astype(np.float64) - frames.expert_action)
    return {
        "nominal": ~near_event & np.all(np.isfinite(frames.expert_action), axis=1),
        "accel_err": np.nan_to_num(err[:, 0], nan=np.inf),
        "steer_err": np.nan_to_num(err[:, 1], nan=np.inf),
        "event_ahead": (truth[idx] & valid).any(axis=1),
        "hazard": labels.hazard.astype(bool),
    }


def summarize_accuracy(parts: dict[str, np.ndarray], config: LabelerConfig) -> LabelerAccuracy:
    """The accuracy report from (concatenated) ``accuracy_parts``."""
    nominal, hazard, event = (np.asarray(parts[k], dtype=bool) for k in ("nominal", "hazard", "event_ahead"))
    a, s = np.asarray(parts["accel_err"])[nominal], np.asarray(parts["steer_err"])[nominal]
    tp, fp, fn = int(np.sum(hazard & event)), int(np.sum(hazard & ~event)), int(np.sum(~hazard & event))
    agree = (a <= config.agree_accel_mps2) & (s <= config.agree_steer_rad)
    nan = float("nan")
    result = LabelerAccuracy(
        nominal_frames=len(a),
        expert_accel_mae_mps2=float(a.mean()) if len(a) else nan,
        expert_steer_mae_rad=float(s.mean()) if len(s) else nan,
        expert_agreement=float(agree.mean()) if len(a) else nan,
        hazard_frames=int(hazard.sum()),
        event_frames=int(event.sum()),
        hazard_precision=tp / (tp + fp) if tp + fp else nan,
        hazard_recall=tp / (tp + fn) if tp + fn else nan,
    )
    logger.info("labeler accuracy: %s", result)
    return result


def labeler_accuracy(segments: list[tuple[SegmentFrames, Labels]], config: LabelerConfig) -> LabelerAccuracy:
    """Agreement with the expert on nominal frames; hazard precision/recall vs logged TTC events."""
    per_segment = [accuracy_parts(f, lab, config) for f, lab in segments]
    keys = ("nominal", "accel_err", "steer_err", "event_ahead", "hazard")
    return summarize_accuracy({k: np.concatenate([p[k] for p in per_segment]) for k in keys}, config)
