"""The per-vehicle sensor implementation as it was before batching: the reference for ``sim.sensors``.

Kept for two reasons: the equivalence test (``tests/edge/test_sensors.py``) checks that the batched
:func:`~driveloop.sim.sensors.observe_batch` gives the same values from the same seeds on random
worlds, and ``bench/edge_inference.py`` measures this path beside the batched one in the same run
(the "old / new" ratio). It is not used on the vehicle's control loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from driveloop.contracts.observation import (
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
from driveloop.sim._sensor_geometry import (
    _FOOTPRINT,
    _GRID_CELL_AREA_M2,
    _GRID_Y_MAX_M,
    _OUTLINE,
    LIDAR_CELL_RAD,
)
from driveloop.sim._sensor_noise import (
    EGO_NOISE_UNITS,
    GRID_OCCUPANCY_NOISE_UNIT,
    NEIGHBOUR_NOISE_UNITS,
)
from driveloop.sim.sensors import SensorConfig, SensorFrame
from driveloop.sim.world import WorldSnapshot


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


def observe_reference(
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
