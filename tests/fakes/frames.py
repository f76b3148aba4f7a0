"""Hand-built ground-truth segments (``SegmentFrames``) for the cloud pipeline's pure tests.

``make_frames`` simulates, at the contract's 10 Hz, an ego following a lead in its lane with exact
kinematics: the lead's speed profile is given, the ego follows a simple scripted controller, and the
on-vehicle signals (model action, applied action, TTC, events) are derived the way the vehicle logs them.
"""

from __future__ import annotations

import numpy as np

from driveloop.cloud.labeling import LabelerConfig, idm_accel
from driveloop.cloud.mining import SegmentFrames
from driveloop.contracts.observation import CONTROL_PERIOD_S, GRID_CHANNELS, GRID_H, GRID_W, KIN_DIM, LIDAR_CELLS

DT = CONTROL_PERIOD_S


def make_frames(
    lead_speed_mps: np.ndarray,
    *,
    ego_speed0_mps: float = 25.0,
    gap0_m: float = 45.0,
    set_speed_mps: float = 25.0,
    model_react_ttc_s: float = 1.5,
    model_decel_mps2: float = 3.0,
    aeb_ttc_s: float = 1.0,
    scenario: str = "ccrb",
    segment_id: str = "seg",
    confidence: float = 0.9,
    expert: bool = True,
) -> SegmentFrames:
    """A late-braking 'model': it brakes only once TTC < model_react_ttc_s; AEB takes over below aeb_ttc_s."""
    n = len(lead_speed_mps)
    v = np.zeros(n)
    gap = np.zeros(n)
    model = np.zeros((n, 2))
    applied = np.zeros((n, 2))
    ttc = np.full(n, np.inf)
    aeb = np.zeros(n, dtype=bool)
    v[0], gap[0] = ego_speed0_mps, gap0_m
    for t in range(n):
        closing = v[t] - lead_speed_mps[t]
        ttc[t] = gap[t] / closing if closing > 1e-6 else np.inf
        model[t, 0] = -model_decel_mps2 if ttc[t] < model_react_ttc_s else min(1.0, 0.5 * (set_speed_mps - v[t]))
        aeb[t] = ttc[t] < aeb_ttc_s
        applied[t, 0] = -8.0 if aeb[t] else model[t, 0]
        if t + 1 < n:
            v[t + 1] = max(0.0, v[t] + applied[t, 0] * DT)
            gap[t + 1] = gap[t] + (lead_speed_mps[t] - v[t]) * DT
    kin = np.zeros((n, KIN_DIM), dtype=np.float32)
    kin[:, 0] = v
    kin[:, 5] = set_speed_mps
    expert_action = np.full((n, 2), np.nan)
    if expert:
        # The simulator's expert is a present-time IDM driver (it sees no future).
        expert_action[:, 0] = idm_accel(v, np.full(n, set_speed_mps), gap, np.asarray(lead_speed_mps), LabelerConfig())
        expert_action[:, 1] = 0.0
    zeros = np.zeros(n)
    return SegmentFrames(
        segment_id=segment_id,
        scenario=scenario,
        t_s=np.arange(n) * DT,
        kinematics=kin,
        lidar=np.zeros((n, 2, LIDAR_CELLS), dtype=np.float32),
        grid=np.zeros((n, GRID_CHANNELS, GRID_H, GRID_W), dtype=np.float32),
        model_action=model,
        applied_action=applied,
        confidence=np.full(n, confidence),
        fallback=aeb.copy(),
        aeb=aeb,
        fcw=np.zeros(n, dtype=bool),
        watchdog=np.zeros(n, dtype=bool),
        collision=gap <= 0,
        ttc_s=ttc,
        ego_speed_mps=v,
        lane_offset_m=zeros.copy(),
        heading_rad=zeros.copy(),
        set_speed_mps=np.full(n, set_speed_mps),
        lead_gap_m=gap,
        lead_speed_mps=np.asarray(lead_speed_mps, dtype=np.float64),
        expert_action=expert_action,
    )


def braking_lead(
    n: int = 150, v0_mps: float = 25.0, brake_at_s: float = 8.0, decel_mps2: float = 5.0, v_end_mps: float = 8.0
) -> np.ndarray:
    """Lead speed profile: cruise, then brake hard down to v_end_mps."""
    t = np.arange(n) * DT
    return np.maximum(v_end_mps, v0_mps - decel_mps2 * np.maximum(0.0, t - brake_at_s))
