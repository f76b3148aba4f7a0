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
_ROW = len(NEIGHBOUR_FEATURES)
_PRESENT, _DX, _DY, _DVX = (NEIGHBOUR_FEATURES.index(f) for f in ("present", "dx_m", "dy_m", "dvx_mps"))


class Track(NamedTuple):
    """The object ahead in the ego lane, as the sensors see it (SI units); a NamedTuple: built every tick."""

    gap_m: float
    closing_speed_mps: float
    lead_speed_mps: float


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
