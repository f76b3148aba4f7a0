"""Compiled (numba) sensor geometry: the numpy path of ``sim.sensors`` in three loops, same values bit for bit.

Why: at fleet sizes the sensor pass is ~60 small numpy calls per tick, and right after the simulator step
(caches cold) each call's fixed cost is most of what the control loop pays. Here the pair table, the
neighbour selection with the occupancy grid, and the lidar's nearest point per cell run as three compiled
loops over the same pairs.

Why the values are the same bit for bit (``tests/edge/test_sensors.py`` checks it against the reference
on random worlds, ``bench/edge_inference.py`` on every tick of real drives):
- every transcendental value (cos, sin, hypot, arctan2) is still computed by numpy, between the
  loops: numpy's ``arctan2`` is a SIMD routine that can differ from libm's in the last bit;
- the loops do only IEEE-754 additions, subtractions, multiplications, divisions, comparisons and
  ``floor``, in the numpy expressions' order (``a * b - c * d + e`` is ``((a*b) - (c*d)) + e``), with
  ``fastmath`` off, so nothing is reassociated or fused into an FMA, and float64 → float32 rounds once;
- sums accumulate in the order ``np.bincount`` uses (point order), and ties keep the first point.
``error_model="numpy"``: a division by zero gives inf, as in numpy (the lidar's own-outline distance
relies on it). Compiled once per machine (``cache=True``, next to this file), loaded in ~0.1 s after.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from driveloop.contracts.observation import (
    GRID_CELL_X_M,
    GRID_CELL_Y_M,
    GRID_CHANNELS,
    GRID_H,
    GRID_W,
    GRID_X_MIN_M,
    GRID_Y_MIN_M,
    KIN_DIM,
    LIDAR_CELLS,
    LIDAR_RANGE_M,
    N_NEIGHBOURS,
)

# Rows of the per-pair table ``geo`` (sim.sensors._Fleet).
_PRESENT, _PX, _PY, _VX, _VY, _COS, _SIN, _LEN, _WID, _EGO_HL, _EGO_HW = range(11)
_N_EGO = 6
_EGO_COLS = 11  # the ego block's first column in the per-vehicle rows
_ROW = 5
_GRID_X_MAX_M = GRID_X_MIN_M + GRID_W * GRID_CELL_X_M
_GRID_Y_MAX_M = GRID_Y_MIN_M + GRID_H * GRID_CELL_Y_M
_GRID_CELL_AREA_M2 = GRID_CELL_X_M * GRID_CELL_Y_M
_GRID_CELLS = GRID_H * GRID_W
_CELL_MASK = LIDAR_CELLS - 1  # LIDAR_CELLS is a power of two: & is the modulo, negatives included
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def pair_table(raw: np.ndarray, ego: np.ndarray, counts: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``edge._sensor_geometry._pairs`` without its cos/sin/hypot: (geo, owner, relative heading, kinematics).

    ``raw`` (P, 7) holds the other vehicles' states, ``ego`` (B, 11 + 6) each vehicle's row and its
    kinematics ego block, ``counts`` how many pairs each vehicle owns. The caller fills the ``_COS`` and
    ``_SIN`` rows from the heading with numpy; the kinematics batch comes back with the ego block filled.
    """
    n = ego.shape[0]
    kin = np.zeros((n, KIN_DIM), np.float32)
    for b in range(n):
        for k in range(_N_EGO):
            kin[b, k] = ego[b, _EGO_COLS + k]
    p = raw.shape[0]
    owner = np.empty(p, np.int64)
    j = 0
    for b in range(counts.shape[0]):
        for _ in range(counts[b]):
            owner[j] = b
            j += 1
    geo = np.empty((11, p))
    heading = np.empty(p)
    for j in range(p):
        e = ego[owner[j]]
        dx, dy, dvx, dvy = raw[j, 0] - e[0], raw[j, 1] - e[1], raw[j, 2] - e[2], raw[j, 3] - e[3]
        heading[j] = raw[j, 4] - e[4]
        geo[_PRESENT, j] = 1.0
        geo[_PX, j] = dx * e[5] + dy * e[7]  # a*cos + b*sin
        geo[_PY, j] = dx * e[6] + dy * e[8]  # a*(-sin) + b*cos
        geo[_VX, j] = dvx * e[5] + dvy * e[7]
        geo[_VY, j] = dvx * e[6] + dvy * e[8]
        geo[_LEN, j], geo[_WID, j] = raw[j, 5], raw[j, 6]
        geo[_EGO_HL, j], geo[_EGO_HW, j] = e[9], e[10]
    return geo, owner, heading, kin


@njit(**_JIT)
def neighbours_and_grid(geo: np.ndarray, owner: np.ndarray, dist: np.ndarray, half_diag: np.ndarray,
                        range_m: np.ndarray, outline_t: np.ndarray, footprint_t: np.ndarray, kin: np.ndarray,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fill the neighbour rows of ``kin``; return the grid batch and the lidar's candidate points.

    ``range_m`` holds the neighbour range per vehicle, or one for all. Returns (grid, x, y, pair): the
    outline points (pair-major) of every pair whose outline can come within lidar range, and the pair
    index of each such vehicle, for numpy's hypot/arctan2 and then :func:`lidar_nearest`.
    """
    n, p = kin.shape[0], owner.shape[0]
    grid = np.zeros((n, GRID_CHANNELS, GRID_H, GRID_W), np.float32)
    per_vehicle = range_m.shape[0] > 1
    start = np.zeros(n + 1, np.int64)
    for j in range(p):
        start[owner[j] + 1] += 1
    for b in range(n):
        start[b + 1] += start[b]
    # Kinematics: per vehicle the N_NEIGHBOURS nearest pairs in range, nearest first, ties in pair order.
    taken = np.zeros(p, np.bool_)
    for b in range(n):
        for rank in range(N_NEIGHBOURS):
            best = -1
            for j in range(start[b], start[b + 1]):
                if not taken[j] and dist[j] <= range_m[b if per_vehicle else 0] and (best < 0 or dist[j] < dist[best]):
                    best = j
            if best < 0:
                break
            taken[best] = True
            for k in range(_ROW):
                kin[b, _N_EGO + rank * _ROW + k] = geo[k, best]
    # Occupancy grid: footprint points of vehicles near the grid, binned in point order (np.bincount's).
    covered = np.zeros(n * _GRID_CELLS)
    speed_sum = np.zeros(n * _GRID_CELLS)
    n_foot = footprint_t.shape[1]
    for j in range(p):
        x, y, hd = geo[_PX, j], geo[_PY, j], half_diag[j]
        if not (x + hd > GRID_X_MIN_M and x - hd < _GRID_X_MAX_M and y + hd > GRID_Y_MIN_M and y - hd < _GRID_Y_MAX_M):
            continue
        c, s, length, width = geo[_COS, j], geo[_SIN, j], geo[_LEN, j], geo[_WID, j]
        weight = length * width / n_foot
        speed_weight = weight * geo[_VX, j]
        base = owner[j] * _GRID_CELLS
        for t in range(n_foot):
            lx = footprint_t[0, t] * length
            ly = footprint_t[1, t] * width
            px = c * lx - s * ly + x
            py = s * lx + c * ly + y
            col = np.int64(math.floor((px - GRID_X_MIN_M) / GRID_CELL_X_M))
            row = np.int64(math.floor((_GRID_Y_MAX_M - py) / GRID_CELL_Y_M))
            if 0 <= col < GRID_W and 0 <= row < GRID_H:
                k = base + row * GRID_W + col
                covered[k] += weight
                speed_sum[k] += speed_weight
    for b in range(n):
        for row in range(GRID_H):
            for col in range(GRID_W):
                k = b * _GRID_CELLS + row * GRID_W + col
                occupancy = covered[k] / _GRID_CELL_AREA_M2
                grid[b, 0, row, col] = min(1.0, occupancy)
                grid[b, 1, row, col] = speed_sum[k] / covered[k] if covered[k] > 0 else 0.0
    # Lidar candidates: outline points of the vehicles whose outline can come within range.
    near = np.empty(p, np.int64)
    k_near = 0
    for j in range(p):
        if dist[j] - half_diag[j] < LIDAR_RANGE_M:
            near[k_near] = j
            k_near += 1
    n_out = outline_t.shape[1]
    xs = np.empty(k_near * n_out)
    ys = np.empty(k_near * n_out)
    for i in range(k_near):
        j = near[i]
        c, s, length, width, x, y = geo[_COS, j], geo[_SIN, j], geo[_LEN, j], geo[_WID, j], geo[_PX, j], geo[_PY, j]
        for t in range(n_out):
            lx = outline_t[0, t] * length
            ly = outline_t[1, t] * width
            xs[i * n_out + t] = c * lx - s * ly + x
            ys[i * n_out + t] = s * lx + c * ly + y
    return grid, xs, ys, near[:k_near]


@njit(**_JIT)
def lidar_nearest(xs: np.ndarray, ys: np.ndarray, r: np.ndarray, angle: np.ndarray, pair: np.ndarray, geo: np.ndarray,
                  owner: np.ndarray, n: int, cell_rad: float) -> np.ndarray:
    """The lidar batch of ``n`` vehicles from the candidate points, their range ``r`` and bearing ``angle`` (numpy's)."""
    lidar = np.zeros((n, 2, LIDAR_CELLS), np.float32)
    lidar[:, 0, :] = LIDAR_RANGE_M
    n_out = xs.shape[0] // max(pair.shape[0], 1)
    best = np.full(n * LIDAR_CELLS, np.inf)
    first = np.full(n * LIDAR_CELLS, -1)
    for i in range(xs.shape[0]):
        j = pair[i // n_out]
        ri = max(1e-09, r[i])
        ax, ay = abs(xs[i]), abs(ys[i])
        own_x = geo[_EGO_HL, j] * ri / ax
        own_y = geo[_EGO_HW, j] * ri / ay
        own = min(own_x, own_y)
        clearance = ri - own
        if not clearance > 0.0:
            clearance = 0.0
        cell = np.int64(math.floor(angle[i] / cell_rad + 0.5)) & _CELL_MASK
        k = owner[j] * LIDAR_CELLS + cell
        if clearance < best[k]:  # strict: a tie keeps the first point
            best[k] = clearance
            first[k] = i
    for k in range(n * LIDAR_CELLS):
        i = first[k]
        if i < 0 or not best[k] < LIDAR_RANGE_M:
            continue
        j = pair[i // n_out]
        ri = max(1e-09, r[i])
        b, cell = k // LIDAR_CELLS, k % LIDAR_CELLS
        lidar[b, 0, cell] = best[k]
        lidar[b, 1, cell] = -(geo[_VX, j] * (xs[i] / ri) + geo[_VY, j] * (ys[i] / ri))
    return lidar
