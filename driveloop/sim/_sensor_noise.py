"""Sensor noise for a batch of vehicles, each from its own random stream (units in ``sim.sensors``).

The reference drew a vehicle's noise sensor by sensor (kinematics ego block, then neighbour rows,
then lidar, then grid occupancy, then the grid speeds of occupied cells), a handful of small
``standard_normal`` calls per vehicle. numpy's ``Generator`` keeps no state between calls beyond the
bit generator, so one call for the concatenated sizes returns exactly the same numbers: here each
vehicle makes one draw, cut into those pieces, and the arithmetic runs on all vehicles' rows at once,
in the reference's order of operations (so the float64 results, and their float32 casts, are equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from driveloop.contracts.observation import (
    EGO_FEATURES,
    GRID_H,
    GRID_W,
    KIN_DIM,
    LIDAR_CELLS,
    LIDAR_RANGE_M,
    N_NEIGHBOURS,
    NEIGHBOUR_FEATURES,
)

EGO_NOISE_UNITS = np.array([0.1, 0.1, 0.005, 0.05, 0.0, 0.0])
NEIGHBOUR_NOISE_UNITS = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
GRID_OCCUPANCY_NOISE_UNIT = 0.1

_N_EGO = len(EGO_FEATURES)
_LIDAR_SIZE = 2 * LIDAR_CELLS
_GRID_CELLS = GRID_H * GRID_W


def _draw(rngs: Sequence[np.random.Generator], noisy: np.ndarray,
          occupied_counts: np.ndarray) -> list[list[np.ndarray]]:
    """Per sensor, the normals of each vehicle that needs them (vehicle order): one draw per vehicle."""
    pieces: list[list[np.ndarray]] = [[], [], []]
    for b in np.flatnonzero(noisy.any(axis=1)):
        sizes = (KIN_DIM if noisy[b, 0] else 0, _LIDAR_SIZE if noisy[b, 1] else 0,
                 _GRID_CELLS + int(occupied_counts[b]) if noisy[b, 2] else 0)
        block = rngs[b].standard_normal(sum(sizes))
        at = 0
        for k, size in enumerate(sizes):
            if size:
                pieces[k].append(block[at:at + size])
                at += size
    return pieces


def _kinematics(clean: np.ndarray, normals: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    noisy = clean.astype(np.float64)
    s = sigma[:, None]
    noisy[:, :_N_EGO] += normals[:, :_N_EGO] * EGO_NOISE_UNITS * s
    shape = (len(noisy), N_NEIGHBOURS, len(NEIGHBOUR_FEATURES))
    rows = noisy[:, _N_EGO:].reshape(shape)
    present = rows[:, :, 0:1] > 0.5
    rows = rows + normals[:, _N_EGO:].reshape(shape) * NEIGHBOUR_NOISE_UNITS * s[:, :, None] * present
    noisy[:, _N_EGO:] = rows.reshape(len(noisy), -1)
    noisy[:, 0] = np.maximum(noisy[:, 0], 0.0)  # a speedometer never reads negative
    return noisy


def _lidar(clean: np.ndarray, normals: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    noisy = clean.astype(np.float64)
    hit = noisy[:, 0:1] < LIDAR_RANGE_M  # no return: no noise (no phantom objects)
    noise = normals.reshape(noisy.shape) * sigma[:, None, None]
    noisy += np.where(hit, noise, 0.0)
    noisy[:, 0] = np.clip(noisy[:, 0], 0.0, LIDAR_RANGE_M)
    return noisy


def _grid(clean: np.ndarray, normals: list[np.ndarray], sigma: np.ndarray) -> np.ndarray:
    noisy = clean.astype(np.float64)
    occupancy = np.stack([n[:_GRID_CELLS] for n in normals]).reshape(len(noisy), GRID_H, GRID_W)
    noisy[:, 0] = np.clip(noisy[:, 0] + occupancy * GRID_OCCUPANCY_NOISE_UNIT * sigma[:, None, None], 0, 1)
    occupied = clean[:, 0] > 0
    speeds = np.concatenate([n[_GRID_CELLS:] for n in normals])
    per_cell_sigma = np.repeat(sigma, occupied.reshape(len(noisy), -1).sum(axis=1))
    speed = noisy[:, 1]
    speed[occupied] += speeds * per_cell_sigma
    return noisy


def add_noise(arrays: dict[str, np.ndarray], rngs: Sequence[np.random.Generator], sigma: np.ndarray,
              live: np.ndarray) -> None:
    """In place: noise on every row whose sensor is ``live`` (not dropped) with ``sigma`` > 0.

    ``arrays`` are the clean (B, ...) float32 sensor batches, ``sigma`` and ``live`` are (B, 3) in
    ``INPUT_NAMES`` order.
    """
    noisy = live & (sigma > 0)
    if not noisy.any():
        return
    grid = arrays["grid"]
    counts = (grid[:, 0] > 0).reshape(len(grid), -1).sum(axis=1)
    pieces = _draw(rngs, noisy, counts)
    for k, (name, fn) in enumerate((("kinematics", _kinematics), ("lidar", _lidar), ("grid", _grid))):
        idx = np.flatnonzero(noisy[:, k])
        if not idx.size:
            continue
        normals = pieces[k] if name == "grid" else np.stack(pieces[k])
        arrays[name][idx] = fn(arrays[name][idx], normals, sigma[idx, k])
