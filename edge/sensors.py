"""Sensors: ground truth (``WorldSnapshot``) → the float32 ``Observation`` of ``edge.contract``.

Three sensors, each a pure numpy function of the snapshot, in the ego frame (x forward, y left):

- **kinematics** [36]: ego block (speed, accel, heading vs lane, lane offset, steering, set speed),
  then the 6 nearest vehicles within ``neighbour_range_m`` (centre distance), nearest first:
  (present=1, dx, dy, dvx, dvy); absent rows are all zero.
- **lidar** [2, 32]: 32 angular cells of 11.25°, cell 0 centred straight ahead, counter-clockwise.
  Per cell: the distance from the ego's body outline to the nearest point of any vehicle outline inside
  the cell's sector (so a car 20 m ahead, centre to centre, reads 20 − 2.5 − 2.5 = 15 m), capped at
  80 m; and the closing speed along the beam to that point (m/s, + closing; 0 with no return).
  Outlines are sampled every ≤0.5 m, so a distance is exact to ~0.1 m.
- **grid** [2, 16, 32]: bird's-eye occupancy (fraction of each 3 m × 1.5 m cell covered by vehicles,
  the ego itself excluded) and the coverage-weighted relative longitudinal speed; row 0 leftmost,
  column 0 rearmost (x from −20 m).

Noise: ``sigma`` of a sensor multiplies a per-feature unit: 1 m on distances and positions, 1 m/s on
speeds, 0.1 on occupancy; on the ego block 0.1 m/s, 0.1 m/s², 0.005 rad, 0.05 m (odometry and lane
camera are far better than the object sensors); steering and set speed are known exactly.
So ``sigma=0.5`` means 0.5 m on a neighbour's dx and on a lidar distance, 0.5 m/s on its speeds.
Lidar cells without a return and absent neighbour rows stay noise-free (no phantom objects).

Dropout: with probability ``*_dropout_p`` a sensor's frame is lost; the previous frame of that sensor
is repeated, marked ``stale`` and keeps its old ``stamp_s``, so the watchdog can detect stale input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from driveloop.edge.contract import (
    EGO_FEATURES,
    GRID_CELL_X_M,
    GRID_CELL_Y_M,
    GRID_CHANNELS,
    GRID_H,
    GRID_W,
    GRID_X_MIN_M,
    GRID_Y_MIN_M,
    INPUT_NAMES,
    KIN_DIM,
    LIDAR_CELLS,
    LIDAR_RANGE_M,
    N_NEIGHBOURS,
    NEIGHBOUR_FEATURES,
    Observation,
)
from driveloop.edge.world import WorldSnapshot

from driveloop.exceptions import ConfigError

EGO_NOISE_UNITS = np.array([0.1, 0.1, 0.005, 0.05, 0.0, 0.0])
NEIGHBOUR_NOISE_UNITS = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
GRID_OCCUPANCY_NOISE_UNIT = 0.1
LIDAR_CELL_RAD = 2 * math.pi / LIDAR_CELLS
_GRID_Y_MAX_M = GRID_Y_MIN_M + GRID_H * GRID_CELL_Y_M
_GRID_CELL_AREA_M2 = GRID_CELL_X_M * GRID_CELL_Y_M

# Outline samples per vehicle, as fractions of (length, width) in the vehicle frame: 11 per long side,
# 5 per short side (≤0.5 m apart on a 5 m × 2 m car), corners included.
_LONG = np.linspace(-0.5, 0.5, 11)
_SHORT = np.linspace(-0.5, 0.5, 5)
_OUTLINE = np.concatenate([
    np.stack([_LONG, np.full_like(_LONG, 0.5)], 1),
    np.stack([_LONG, np.full_like(_LONG, -0.5)], 1),
    np.stack([np.full_like(_SHORT, 0.5), _SHORT], 1),
    np.stack([np.full_like(_SHORT, -0.5), _SHORT], 1),
])
# Footprint samples (10 × 4 cell centres) for the occupancy grid: each carries 1/40 of the area.
_FX, _FY = np.meshgrid((np.arange(10) + 0.5) / 10 - 0.5, (np.arange(4) + 0.5) / 4 - 0.5)
_FOOTPRINT = np.stack([_FX.ravel(), _FY.ravel()], 1)


@dataclass(frozen=True)
class SensorConfig:
    """Per-sensor Gaussian noise (``sigma`` × the units in the module docstring) and frame dropout."""

    kinematics_sigma: float = 0.0
    lidar_sigma: float = 0.0
    grid_sigma: float = 0.0
    kinematics_dropout_p: float = 0.0
    lidar_dropout_p: float = 0.0
    grid_dropout_p: float = 0.0
    neighbour_range_m: float = 100.0

    def __post_init__(self) -> None:
        for name in INPUT_NAMES:
            sigma, p = getattr(self, f"{name}_sigma"), getattr(self, f"{name}_dropout_p")
            if not (math.isfinite(sigma) and 0.0 <= sigma <= 10.0):
                raise ConfigError(f"{name}_sigma must be in [0, 10], got {sigma!r}")
            if not (math.isfinite(p) and 0.0 <= p < 1.0):
                raise ConfigError(f"{name}_dropout_p must be in [0, 1), got {p!r}")
        if not (math.isfinite(self.neighbour_range_m) and self.neighbour_range_m > 0):
            raise ConfigError("neighbour_range_m must be > 0")

    @classmethod
    def uniform(cls, sigma: float = 0.0, dropout_p: float = 0.0) -> SensorConfig:
        """The same noise and dropout on every sensor (``--noise SIGMA``)."""
        return cls(sigma, sigma, sigma, dropout_p, dropout_p, dropout_p)


@dataclass(frozen=True)
class SensorFrame:
    """One tick of sensor output: the observation, which sensors are stale, and when each was measured."""

    observation: Observation
    stale: dict[str, bool]
    stamp_s: dict[str, float]


@dataclass(frozen=True)
class _Others:
    """Other vehicles in the ego frame, as arrays (N = number of vehicles)."""

    pos: np.ndarray  # (N, 2) centre
    vel: np.ndarray  # (N, 2) relative velocity
    heading: np.ndarray  # (N,) relative heading
    size: np.ndarray  # (N, 2) length, width


def _others_in_ego_frame(snapshot: WorldSnapshot) -> _Others:
    ego = snapshot.ego
    n = len(snapshot.others)
    raw = np.array(
        [(v.x_m, v.y_m, v.vx_mps, v.vy_mps, v.heading_rad, v.length_m, v.width_m) for v in snapshot.others],
        dtype=np.float64,
    ).reshape(n, 7)
    c, s = math.cos(ego.heading_rad), math.sin(ego.heading_rad)
    rot = np.array([[c, -s], [s, c]])  # columns: ego x and y axes in the road frame
    pos = (raw[:, 0:2] - (ego.x_m, ego.y_m)) @ rot
    vel = (raw[:, 2:4] - (ego.vx_mps, ego.vy_mps)) @ rot
    return _Others(pos=pos, vel=vel, heading=raw[:, 4] - ego.heading_rad, size=raw[:, 5:7])


def _body_points(others: _Others, template: np.ndarray) -> np.ndarray:
    """Template points (fractions of length/width) of every vehicle, in the ego frame: (N, T, 2)."""
    local = template[None, :, :] * others.size[:, None, :]
    c, s = np.cos(others.heading)[:, None], np.sin(others.heading)[:, None]
    x = c * local[..., 0] - s * local[..., 1] + others.pos[:, 0:1]
    y = s * local[..., 0] + c * local[..., 1] + others.pos[:, 1:2]
    return np.stack([x, y], -1)


def _kinematics(snapshot: WorldSnapshot, others: _Others, neighbour_range_m: float) -> np.ndarray:
    out = np.zeros(KIN_DIM, dtype=np.float32)
    out[: len(EGO_FEATURES)] = (
        snapshot.speed_mps,
        snapshot.accel_mps2,
        snapshot.heading_rel_rad,
        snapshot.lane_offset_m,
        snapshot.steering_rad,
        snapshot.set_speed_mps,
    )
    dist = np.hypot(others.pos[:, 0], others.pos[:, 1])
    idx = np.flatnonzero(dist <= neighbour_range_m)
    idx = idx[np.argsort(dist[idx], kind="stable")][:N_NEIGHBOURS]
    rows = np.zeros((N_NEIGHBOURS, len(NEIGHBOUR_FEATURES)), dtype=np.float32)
    rows[: len(idx), 0] = 1.0
    rows[: len(idx), 1:3] = others.pos[idx]
    rows[: len(idx), 3:5] = others.vel[idx]
    out[len(EGO_FEATURES):] = rows.ravel()
    return out


def _subset(others: _Others, keep: np.ndarray) -> _Others:
    return _Others(pos=others.pos[keep], vel=others.vel[keep], heading=others.heading[keep], size=others.size[keep])


def _lidar(snapshot: WorldSnapshot, others: _Others) -> np.ndarray:
    out = np.zeros((2, LIDAR_CELLS), dtype=np.float32)
    out[0] = LIDAR_RANGE_M
    # Only vehicles whose outline can come within range (centre distance − half diagonal).
    reach = np.hypot(others.pos[:, 0], others.pos[:, 1]) - np.hypot(*others.size.T) / 2
    near = reach < LIDAR_RANGE_M
    if not near.any():
        return out
    sub = _subset(others, near)
    pts = _body_points(sub, _OUTLINE).reshape(-1, 2)
    owner = np.repeat(np.arange(len(sub.pos)), len(_OUTLINE))
    x, y = pts[:, 0], pts[:, 1]
    r = np.maximum(np.hypot(x, y), 1e-9)
    # Distance from the ego centre to its own outline along the same direction.
    with np.errstate(divide="ignore"):
        own = np.minimum(snapshot.ego.length_m / 2 * r / np.abs(x), snapshot.ego.width_m / 2 * r / np.abs(y))
    clearance = np.maximum(r - own, 0.0)
    cell = np.floor(np.arctan2(y, x) / LIDAR_CELL_RAD + 0.5).astype(np.int64) % LIDAR_CELLS
    # Nearest point per cell: sort on (cell, clearance) packed into one key (clearance < 1000 m).
    order = np.argsort(cell * 1000.0 + np.minimum(clearance, 999.0), kind="stable")
    sorted_cell = cell[order]
    first = order[np.r_[True, sorted_cell[1:] != sorted_cell[:-1]]]
    first = first[clearance[first] < LIDAR_RANGE_M]
    radial = pts[first] / r[first, None]
    out[0, cell[first]] = clearance[first]
    out[1, cell[first]] = -np.einsum("ij,ij->i", sub.vel[owner[first]], radial)
    return out


def _grid(snapshot: WorldSnapshot, others: _Others) -> np.ndarray:
    out = np.zeros((GRID_CHANNELS, GRID_H, GRID_W), dtype=np.float32)
    half_diag = np.hypot(*others.size.T) / 2
    x, y = others.pos[:, 0], others.pos[:, 1]
    near = (x + half_diag > GRID_X_MIN_M) & (x - half_diag < GRID_X_MIN_M + GRID_W * GRID_CELL_X_M)
    near &= (y + half_diag > GRID_Y_MIN_M) & (y - half_diag < _GRID_Y_MAX_M)
    if not near.any():
        return out
    sub = _subset(others, near)
    pts = _body_points(sub, _FOOTPRINT).reshape(-1, 2)
    weight = np.repeat(sub.size[:, 0] * sub.size[:, 1] / len(_FOOTPRINT), len(_FOOTPRINT))
    dvx = np.repeat(sub.vel[:, 0], len(_FOOTPRINT))
    col = np.floor((pts[:, 0] - GRID_X_MIN_M) / GRID_CELL_X_M).astype(np.int64)
    row = np.floor((_GRID_Y_MAX_M - pts[:, 1]) / GRID_CELL_Y_M).astype(np.int64)
    inside = (col >= 0) & (col < GRID_W) & (row >= 0) & (row < GRID_H)
    flat = row[inside] * GRID_W + col[inside]
    weight = weight[inside]
    # astype: bincount of an empty selection comes back int64, whatever the weights' dtype.
    covered = np.bincount(flat, weights=weight, minlength=GRID_H * GRID_W).astype(np.float64)
    speed_sum = np.bincount(flat, weights=weight * dvx[inside], minlength=GRID_H * GRID_W).astype(np.float64)
    out[0] = np.minimum(covered / _GRID_CELL_AREA_M2, 1.0).reshape(GRID_H, GRID_W)
    out[1] = np.divide(speed_sum, covered, out=np.zeros_like(covered), where=covered > 0).reshape(GRID_H, GRID_W)
    return out


def _add_noise(name: str, data: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return data
    noisy = data.astype(np.float64)
    if name == "kinematics":
        n_ego = len(EGO_FEATURES)
        noisy[:n_ego] += rng.standard_normal(n_ego) * EGO_NOISE_UNITS * sigma
        rows = noisy[n_ego:].reshape(N_NEIGHBOURS, len(NEIGHBOUR_FEATURES))
        present = rows[:, 0:1] > 0.5
        rows += rng.standard_normal(rows.shape) * NEIGHBOUR_NOISE_UNITS * sigma * present
        noisy[0] = max(noisy[0], 0.0)  # a speedometer never reads negative
    elif name == "lidar":
        hit = noisy[0] < LIDAR_RANGE_M
        noise = rng.standard_normal(noisy.shape) * sigma
        noisy[:, hit] += noise[:, hit]
        noisy[0] = np.clip(noisy[0], 0.0, LIDAR_RANGE_M)
    else:
        noisy[0] = np.clip(noisy[0] + rng.standard_normal(noisy[0].shape) * GRID_OCCUPANCY_NOISE_UNIT * sigma, 0, 1)
        occupied = data[0] > 0
        noisy[1][occupied] += rng.standard_normal(int(occupied.sum())) * sigma
    return noisy.astype(np.float32)


def observe(
    snapshot: WorldSnapshot,
    rng: np.random.Generator,
    config: SensorConfig | None = None,
    previous: SensorFrame | None = None,
) -> SensorFrame:
    """Sensor output for ``snapshot``; ``previous`` is what a dropped frame repeats (none: never stale)."""
    cfg = config or SensorConfig()
    others = _others_in_ego_frame(snapshot)
    dropped = rng.random(len(INPUT_NAMES))  # always drawn: the noise stream does not depend on dropouts
    arrays: dict[str, np.ndarray] = {}
    stale: dict[str, bool] = {}
    stamps: dict[str, float] = {}
    for i, name in enumerate(INPUT_NAMES):
        if previous is not None and dropped[i] < getattr(cfg, f"{name}_dropout_p"):
            arrays[name] = getattr(previous.observation, name)
            stale[name] = True
            stamps[name] = previous.stamp_s[name]
            continue
        if name == "kinematics":
            clean = _kinematics(snapshot, others, cfg.neighbour_range_m)
        elif name == "lidar":
            clean = _lidar(snapshot, others)
        else:
            clean = _grid(snapshot, others)
        arrays[name] = _add_noise(name, clean, getattr(cfg, f"{name}_sigma"), rng)
        stale[name] = False
        stamps[name] = snapshot.t_s
    return SensorFrame(observation=Observation(**arrays), stale=stale, stamp_s=stamps)


class SensorSuite:
    """A vehicle's sensors over time: its own seeded noise stream and the last frame for dropouts."""

    def __init__(self, config: SensorConfig | None = None, seed: int = 0) -> None:
        self.config = config or SensorConfig()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._last: SensorFrame | None = None

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._last = None

    def observe(self, snapshot: WorldSnapshot) -> SensorFrame:
        self._last = observe(snapshot, self._rng, self.config, self._last)
        return self._last
