"""Perception for the safety layer: the in-lane object ahead, from sensor data only.

The AEB (``safety/``) must not trust the model, and must not see ground truth either: it decides from
what the sensors report, noise and all. This module turns the kinematics neighbour rows of an
``Observation`` into one :class:`Track` (the forward object the AEB brakes for).

Rules:
- a row counts if ``present`` > 0.5, it is ahead (``dx`` > 0) and its centre lies in the ego's lane
  corridor (``|dy|`` < ``corridor_half_width_m``, 1.8 m: a 2 m car in a 4 m lane, with room for
  sensor noise, while the centre of a car in the next lane sits 4 m away);
- the nearest such row (smallest ``dx``) is the track;
- ``gap_m`` is bumper to bumper: ``dx`` minus one vehicle length (half the ego + half the other,
  both 5 m cars), so it can go negative on contact;
- ``closing_speed_mps`` = −``dvx`` (+ when the gap shrinks), ``lead_speed_mps`` = ego speed + ``dvx``.

:func:`side_tracks` reports the other present rows ahead (outside the corridor) with where they are across the
ego's *lane* (not its heading): the centre's offset from the lane's centre and the speed across the lane, from
the ego's lane offset and heading (a 0.03 rad yaw moves a car 20 m ahead by 0.6 m in the ego frame). The safety
layer decides which of them is cutting in (``safety.aeb.cutting_in``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from driveloop.contracts.observation import (
    EGO_FEATURES,
    KIN_DIM,
    NEIGHBOUR_FEATURES,
    Observation,
)
from driveloop.core.exceptions import SafetyError

VEHICLE_LENGTH_M = 5.0
CORRIDOR_HALF_WIDTH_M = 1.8

_N_EGO = len(EGO_FEATURES)
_SPEED = EGO_FEATURES.index("speed_mps")
_HEADING, _OFFSET = EGO_FEATURES.index("heading_rad"), EGO_FEATURES.index("lane_offset_m")
_ROW = len(NEIGHBOUR_FEATURES)
_PRESENT, _DX, _DY, _DVX, _DVY = (NEIGHBOUR_FEATURES.index(f)
                                  for f in ("present", "dx_m", "dy_m", "dvx_mps", "dvy_mps"))


class Track(NamedTuple):
    """An object ahead as the sensors see it (SI units); a NamedTuple: built every tick.

    ``lane_offset_m``/``lateral_speed_mps`` (+ left: its centre from the ego lane's centre, its speed across
    the lane) matter for side tracks; the forward track leaves them 0.
    """

    gap_m: float
    closing_speed_mps: float
    lead_speed_mps: float
    lane_offset_m: float = 0.0
    lateral_speed_mps: float = 0.0


def forward_track(
    observation: Observation | np.ndarray,
    corridor_half_width_m: float = CORRIDOR_HALF_WIDTH_M,
    vehicle_length_m: float = VEHICLE_LENGTH_M,
) -> Track | None:
    """The nearest in-corridor object ahead, or None; accepts an Observation or its kinematics vector.

    Raises SafetyError on a kinematics vector of the wrong shape; rows with non-finite numbers are
    ignored (a broken row is no evidence of an object, the watchdog reports the bad frame).
    """
    kin = observation.kinematics if isinstance(observation, Observation) else observation
    if not (isinstance(kin, np.ndarray) and kin.dtype.char in "fd"):  # float32/64 convert exactly in tolist()
        kin = np.asarray(kin, dtype=np.float64)
    if kin.shape != (KIN_DIM,):
        raise SafetyError(f"kinematics must have shape ({KIN_DIM},), got {kin.shape}")
    # Six rows of five numbers: plain floats beat numpy calls on arrays this small (it runs every tick).
    values = kin.tolist()
    best: list[float] | None = None
    for start in range(_N_EGO, KIN_DIM, _ROW):
        row = values[start:start + _ROW]
        if not (row[_PRESENT] > 0.5 and row[_DX] > 0 and abs(row[_DY]) < corridor_half_width_m):
            continue
        if not all(map(math.isfinite, row)):
            continue
        if best is None or row[_DX] < best[_DX]:
            best = row
    if best is None:
        return None
    ego_speed = values[_SPEED] if math.isfinite(values[_SPEED]) else 0.0
    return Track(
        gap_m=best[_DX] - vehicle_length_m,
        closing_speed_mps=-best[_DVX],
        lead_speed_mps=max(ego_speed + best[_DVX], 0.0),
    )


def side_tracks(
    observation: Observation | np.ndarray,
    corridor_half_width_m: float = CORRIDOR_HALF_WIDTH_M,
    vehicle_length_m: float = VEHICLE_LENGTH_M,
) -> tuple[Track, ...]:
    """Every present, finite row ahead *outside* the corridor, nearest first, placed across the ego's lane.

    The ego frame is turned by the ego's heading to the lane: offset = ego lane offset + dx sin h + dy cos h,
    speed across = (ego speed + dvx) sin h + dvy cos h. Empty when the ego block is not finite.
    """
    kin = observation.kinematics if isinstance(observation, Observation) else np.asarray(observation, np.float64)
    if kin.shape != (KIN_DIM,):
        raise SafetyError(f"kinematics must have shape ({KIN_DIM},), got {kin.shape}")
    values = kin.tolist()
    ego_speed, heading, offset = values[_SPEED], values[_HEADING], values[_OFFSET]
    if not all(map(math.isfinite, (ego_speed, heading, offset))):
        return ()
    sin_h, cos_h = math.sin(heading), math.cos(heading)
    rows = [values[start:start + _ROW] for start in range(_N_EGO, KIN_DIM, _ROW)]
    side = sorted((r for r in rows if r[_PRESENT] > 0.5 and r[_DX] > 0 and abs(r[_DY]) >= corridor_half_width_m
                   and all(map(math.isfinite, r))), key=lambda r: r[_DX])
    return tuple(Track(r[_DX] - vehicle_length_m, -r[_DVX], max(ego_speed + r[_DVX], 0.0),
                       offset + r[_DX] * sin_h + r[_DY] * cos_h, (ego_speed + r[_DVX]) * sin_h + r[_DVY] * cos_h)
                 for r in side)
