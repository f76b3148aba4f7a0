"""Hindsight auto-labeling: a privileged teacher that sees the segment's future and the logged ground truth.

On the vehicle the model only sees the present; in the cloud we know what happened next. The teacher
produces the action the model *should* have produced:

- **Longitudinal**: IDM (intelligent driver model) evaluated against the *future* lead over the next
  ``horizon_s``: for every future step k it takes the vehicle that will be ahead at t+k (so a cut-in or a
  braking lead counts before it shows), places it where it will be relative to an ego that keeps its
  current speed, and keeps the most cautious IDM acceleration. The label therefore brakes early and
  smoothly where the on-vehicle model braked late and the fallback had to intervene.
- **Expert blend**: where the simulator's privileged expert action is logged, the label is the expert's
  command plus only the *extra* braking that hindsight justifies (so nominal frames keep exactly the
  behaviour the model was bootstrapped on), and the expert's steering.
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

from driveloop.cloud.mining import SegmentFrames, widen_mask
from driveloop.edge.contract import CONTROL_PERIOD_S
from driveloop.exceptions import ConfigError

logger = logging.getLogger(__name__)

LABEL_VERSION = "hindsight-idm-3"


@dataclass(frozen=True)
class LabelerConfig:
    horizon_s: float = 2.0
    time_gap_s: float = 1.5
    min_gap_m: float = 4.0
    max_accel_mps2: float = 2.0
    comfort_decel_mps2: float = 3.0
    max_decel_mps2: float = 6.0
    anticipation_max_decel_mps2: float = 6.0  # hindsight may add at most this much braking: early, not harsh
    label_jerk_mps3: float = 4.0  # labels ramp at most this fast (only ever by braking earlier / releasing later)
    idm_delta: float = 4.0
    lane_gain_rad_per_m: float = 0.08
    heading_gain: float = 0.8
    max_steer_rad: float = 0.25
    hazard_ttc_s: float = 3.0
    hazard_horizon_s: float = 3.0
    agree_accel_mps2: float = 1.0
    agree_steer_rad: float = 0.05
    nominal_margin_s: float = 3.0  # frames this far from any event count as nominal
    # What the hindsight correction is added to: "model" the fleet model's own logged command (the
    # smallest change that brakes earlier), "expert" the simulator's logged expert, "idm" present-lead IDM
    # + lane keeping. Missing values fall back model -> expert -> idm.
    base_action: str = "expert"

    def __post_init__(self) -> None:
        if self.base_action not in ("model", "expert", "idm"):
            raise ConfigError(f"labeler base_action must be model, expert or idm, got {self.base_action!r}")
        for name in self.__dataclass_fields__:
            if name == "base_action":
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


def hindsight_accel(frames: SegmentFrames, c: LabelerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(most cautious IDM acceleration against the future leads over the horizon, the same IDM against
    the present lead only). Their difference is the braking that only hindsight justifies."""
    n = len(frames)
    idx, valid = _future_steps(n, c.horizon_s)
    v = np.nan_to_num(frames.ego_speed_mps)
    # Ego displacement actually driven minus the displacement at constant current speed: add it back so
    # the future gap is what it would be had the ego held its speed (the ego's own braking doesn't count).
    x_ego = np.concatenate([[0.0], np.cumsum(v[:-1] * CONTROL_PERIOD_S)])
    steps = (idx - np.arange(n)[:, None]) * CONTROL_PERIOD_S
    ego_shift = (x_ego[idx] - x_ego[:, None]) - v[:, None] * steps
    gap_future = frames.lead_gap_m[idx] + ego_shift
    gap_future = np.where(valid, gap_future, np.nan)
    accel = idm_accel(v[:, None], np.nan_to_num(frames.set_speed_mps)[:, None], gap_future, np.nan_to_num(frames.lead_speed_mps[idx]), c)
    accel = np.where(valid, accel, np.inf)
    return np.min(accel, axis=1), accel[:, 0]


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

    The label is a base command (``config.base_action``: by default the simulator's logged expert, which
    the model was bootstrapped on) plus the extra braking hindsight alone justifies (future-lead IDM
    minus present-lead IDM, never positive, capped at ``anticipation_max_decel_mps2``): on nominal frames
    it is the base command unchanged, before a hazard it brakes earlier. Where the base is not logged:
    the present-lead IDM plus the same extra, and lane keeping.
    """
    future_min, present = hindsight_accel(frames, config)
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
    # Only the braking that hindsight alone justifies (future-lead IDM below present-lead IDM), capped.
    extra = np.clip(future_min - present, -config.anticipation_max_decel_mps2, 0.0)
    accel = jerk_limit(np.clip(base[:, 0] + extra, -config.max_decel_mps2, config.max_accel_mps2), config.label_jerk_mps3)
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
