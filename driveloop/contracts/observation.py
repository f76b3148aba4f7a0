"""The observation/action contract between the vehicle and its policy model (DESIGN.md: Observation).

Produced by ``edge`` (sensors), consumed by the ``cloud`` model, the ONNX export check and the
ModelRuntime's I/O verification. All tensors are float32 and carry SI units; normalisation lives
inside the model (so the ONNX graph owns it and the vehicle never guesses scales).

Per vehicle per tick:
- ``kinematics`` [KIN_DIM]: the ego block (EGO_FEATURES) then N_NEIGHBOURS rows of
  NEIGHBOUR_FEATURES for the nearest vehicles, nearest first, absent rows all zero.
- ``lidar`` [2, LIDAR_CELLS]: per angular cell (cell 0 straight ahead, counter-clockwise),
  [distance_m (LIDAR_RANGE_M when nothing is seen), closing speed along the beam (m/s, + closing)].
- ``grid`` [GRID_CHANNELS, GRID_H, GRID_W]: the "camera": a bird's-eye occupancy grid in the ego
  frame; channel 0 occupancy in [0, 1], channel 1 relative longitudinal speed (m/s). Row 0 is the
  leftmost lateral band (+y), column 0 the rearmost band (-x).
Outputs: ``action`` [2] = [acceleration_mps2, steering_rad]; ``confidence`` [1] in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBS_VERSION = 1
CONTROL_PERIOD_S = 0.1  # 10 Hz control loop

EGO_FEATURES = (
    "speed_mps",
    "accel_mps2",
    "heading_rad",  # relative to the lane direction
    "lane_offset_m",  # lateral offset from the lane centre, + to the left
    "steering_rad",  # last applied steering
    "set_speed_mps",  # cruise set speed the driver asked for
)
NEIGHBOUR_FEATURES = ("present", "dx_m", "dy_m", "dvx_mps", "dvy_mps")
N_NEIGHBOURS = 6
KIN_DIM = len(EGO_FEATURES) + N_NEIGHBOURS * len(NEIGHBOUR_FEATURES)

LIDAR_CELLS = 32
LIDAR_RANGE_M = 80.0

GRID_CHANNELS = 2
GRID_H = 16  # lateral cells
GRID_W = 32  # longitudinal cells
GRID_CELL_X_M = 3.0
GRID_CELL_Y_M = 1.5
GRID_X_MIN_M = -20.0  # rear edge of the grid, ego at x = 0
GRID_Y_MIN_M = -GRID_H * GRID_CELL_Y_M / 2

ACTION_NAMES = ("acceleration_mps2", "steering_rad")
INPUT_NAMES = ("kinematics", "lidar", "grid")
OUTPUT_NAMES = ("action", "confidence")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # without the batch axis
    dtype: str = "float32"


INPUTS = (
    TensorSpec("kinematics", (KIN_DIM,)),
    TensorSpec("lidar", (2, LIDAR_CELLS)),
    TensorSpec("grid", (GRID_CHANNELS, GRID_H, GRID_W)),
)
OUTPUTS = (TensorSpec("action", (len(ACTION_NAMES),)), TensorSpec("confidence", (1,)))


@dataclass
class Observation:
    """One vehicle's sensors at one tick (no batch axis)."""

    kinematics: np.ndarray
    lidar: np.ndarray
    grid: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"kinematics": self.kinematics, "lidar": self.lidar, "grid": self.grid}


def empty_batch(n: int) -> dict[str, np.ndarray]:
    """Zeroed float32 input batch of size n, shaped by the contract."""
    return {s.name: np.zeros((n, *s.shape), dtype=np.float32) for s in INPUTS}


def stack(observations: list[Observation]) -> dict[str, np.ndarray]:
    """Batch observations along a new leading axis (dynamic batching for the fleet)."""
    return {
        name: np.ascontiguousarray(np.stack([getattr(o, name) for o in observations]), dtype=np.float32)
        for name in INPUT_NAMES
    }


def io_contract() -> dict[str, object]:
    """The contract as plain data, for manifests and runtime checks."""
    return {
        "obs_version": OBS_VERSION,
        "inputs": {s.name: list(s.shape) for s in INPUTS},
        "outputs": {s.name: list(s.shape) for s in OUTPUTS},
    }
