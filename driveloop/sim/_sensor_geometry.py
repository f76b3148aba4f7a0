"""Sensor geometry for a batch of vehicles: ground truth → clean kinematics, lidar and grid (``sim.sensors``).

One pass builds every (vehicle, other vehicle) pair of the tick in the owning vehicle's ego frame
(:func:`_pairs`); the three sensors are then computed for the whole fleet at once, by one of two
backends that give the same values bit for bit (and the per-vehicle reference's,
``edge/_sensors_ref.py``):

- ``"compiled"`` (default where numba is installed): the pair table, neighbour selection, occupancy grid
  and the lidar's nearest point per cell as three compiled loops (``edge/_sensor_kernels.py``), with
  numpy computing every transcendental value between them;
- ``"numpy"``: ~50 whole-fleet numpy calls (always available; the fallback without numba).

Why two: at fleet sizes the arrays are tiny and, right after the simulator step (caches cold), each
numpy call's fixed cost is most of the sensor pass; the compiled loops remove most of those calls.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from types import ModuleType
from typing import NamedTuple

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
    KIN_DIM,
    LIDAR_CELLS,
    LIDAR_RANGE_M,
    N_NEIGHBOURS,
    NEIGHBOUR_FEATURES,
)
from driveloop.core.exceptions import ConfigError
from driveloop.sim.world import VehicleState, WorldSnapshot

logger = logging.getLogger(__name__)

BACKENDS = ("compiled", "numpy")

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
# The templates' columns as contiguous rows (length fractions, width fractions), broadcast against pairs.
_OUTLINE_T = np.ascontiguousarray(_OUTLINE.T)
_FOOTPRINT_T = np.ascontiguousarray(_FOOTPRINT.T)

# Field readers: attrgetter builds each tuple in C (a comprehension of attribute reads costs 2-3x more,
# and this runs for every vehicle in view of every vehicle on every tick).
_STATE = attrgetter("x_m", "y_m", "vx_mps", "vy_mps", "heading_rad", "length_m", "width_m")
_EGO_BLOCK = attrgetter("speed_mps", "accel_mps2", "heading_rel_rad", "lane_offset_m", "steering_rad",
                        "set_speed_mps")


class _Fleet(NamedTuple):
    """Every (vehicle, other vehicle) pair of a tick, in the owning vehicle's ego frame (P = pairs).

    ``geo`` holds one column per pair and one row per quantity, so a sensor that needs a subset of the
    pairs gathers it in one call, and every elementwise call runs along P: rows ``_PRESENT`` (always 1),
    ``_PX``, ``_PY``, ``_VX``, ``_VY`` (the kinematics neighbour row: centre and relative velocity),
    ``_COS``, ``_SIN`` (relative heading), ``_LEN``, ``_WID`` (size) and ``_EGO_HL``, ``_EGO_HW`` (half
    length and half width of the observing vehicle). The arithmetic is the reference's, operation for
    operation, so every value is bit-identical; the layout is chosen for the fewest and cheapest numpy
    calls: at fleet sizes the arrays are tiny and each call's fixed cost, with caches cold after the
    simulator step, is most of what the loop pays.
    """

    owner: np.ndarray  # (P,) index of the observing vehicle
    geo: np.ndarray  # (11, P), rows above
    dist: np.ndarray  # (P,) centre distance
    half_diag: np.ndarray  # (P,) half the outline diagonal: how far an outline reaches from its centre


_PRESENT, _PX, _PY, _VX, _VY, _COS, _SIN, _LEN, _WID, _EGO_HL, _EGO_HW = range(11)


def _inputs(snapshots: Sequence[WorldSnapshot]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The fleet's ground truth as arrays: others (P, 7), each vehicle's row (B, 11 + 6), pairs per vehicle."""
    others = [s.others for s in snapshots]
    counts = [len(o) for o in others]
    # A flat float stream into fromiter: cheaper than np.array's nested-sequence discovery.
    raw = np.fromiter(chain.from_iterable(map(_STATE, chain.from_iterable(others))), dtype=np.float64,
                      count=7 * sum(counts)).reshape(-1, 7)
    # Per vehicle (scalar math, B values): position, velocity, heading, the rotation as the two
    # multiplier pairs (cos, -sin) and (sin, cos), half length and half width; then its kinematics ego block.
    ego_rows = []
    for s in snapshots:
        e = s.ego
        c, sn = math.cos(e.heading_rad), math.sin(e.heading_rad)
        ego_rows.append((e.x_m, e.y_m, e.vx_mps, e.vy_mps, e.heading_rad, c, -sn, sn, c,
                         e.length_m / 2, e.width_m / 2, *_EGO_BLOCK(s)))
    return raw, np.array(ego_rows, dtype=np.float64).reshape(-1, 11 + len(EGO_FEATURES)), counts


def _pairs(snapshots: Sequence[WorldSnapshot]) -> _Fleet:
    """One pass over the fleet's ground truth; numpy calls on whole-fleet arrays, not per vehicle."""
    raw, ego, counts = _inputs(snapshots)
    raw, ego, total = raw.T, ego.T, raw.shape[0]
    owner = np.repeat(np.arange(len(snapshots)), counts)
    e = ego[:, owner] if len(snapshots) > 1 else ego
    rel = raw[0:5] - e[0:5]
    geo = np.empty((11, total))
    geo[_PRESENT] = 1.0
    # Positions and velocities rotate alike: rows (dx, dvx) and (dy, dvy) at once, x' = a*cos + b*sin and
    # y' = a*(-sin) + b*cos, the reference's products and sums.
    along, across = rel[0:4:2], rel[1:4:2]
    np.add(along * e[5], across * e[7], out=geo[_PX:_VY + 1:2])
    np.add(along * e[6], across * e[8], out=geo[_PY:_VY + 1:2])
    np.cos(rel[4], out=geo[_COS])
    np.sin(rel[4], out=geo[_SIN])
    geo[_LEN:_WID + 1] = raw[5:7]
    geo[_EGO_HL:_EGO_HW + 1] = e[9:11]
    return _Fleet(owner=owner, geo=geo, dist=np.hypot(geo[_PX], geo[_PY]), half_diag=np.hypot(raw[5], raw[6]) / 2)


def _pairs_compiled(k: ModuleType, snapshots: Sequence[WorldSnapshot]) -> tuple[_Fleet, np.ndarray]:
    """:func:`_pairs` with its arithmetic in a compiled loop (cos, sin and hypot stay numpy's), and the
    kinematics batch with its ego block filled in."""
    raw, ego, counts = _inputs(snapshots)
    geo, owner, heading, kin = k.pair_table(raw, ego, np.array(counts, dtype=np.int64))
    np.cos(heading, out=geo[_COS])
    np.sin(heading, out=geo[_SIN])
    return _Fleet(owner=owner, geo=geo, dist=np.hypot(geo[_PX], geo[_PY]),
                  half_diag=np.hypot(geo[_LEN], geo[_WID]) / 2), kin


def _outline_points(g: np.ndarray, template_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template points (rows: fractions of length, of width) of each ``geo`` column's vehicle: x, y (K, T)."""
    lx = template_t[0] * g[_LEN, :, None]
    ly = template_t[1] * g[_WID, :, None]
    c, s = g[_COS, :, None], g[_SIN, :, None]
    x = c * lx - s * ly + g[_PX, :, None]
    y = s * lx + c * ly + g[_PY, :, None]
    return x, y


def _kinematics(snapshots: Sequence[WorldSnapshot], f: _Fleet, range_m: float | np.ndarray) -> np.ndarray:
    n = len(snapshots)
    out = _ego_kinematics(snapshots)
    dist = f.dist
    sel = np.flatnonzero(dist <= range_m)
    rows = out[:, len(EGO_FEATURES):].reshape(n, N_NEIGHBOURS, len(NEIGHBOUR_FEATURES))
    # Per vehicle, nearest first; lexsort is stable, so equal distances keep the snapshot's order.
    if n == 1:
        order = sel[np.argsort(dist[sel], kind="stable")][:N_NEIGHBOURS]
        rows[0, : len(order)] = f.geo[_PRESENT:_VY + 1, order].T
        return out
    order = sel[np.lexsort((dist[sel], f.owner[sel]))]
    owner = f.owner[order]
    rank = np.arange(len(order)) - np.searchsorted(owner, owner, side="left")
    top = rank < N_NEIGHBOURS
    rows[owner[top], rank[top]] = f.geo[_PRESENT:_VY + 1, order[top]].T
    return out


def _lidar(snapshots: Sequence[WorldSnapshot], f: _Fleet) -> np.ndarray:
    n = len(snapshots)
    out = _empty_lidar(n)
    # Only vehicles whose outline can come within range (centre distance − half diagonal).
    near = np.flatnonzero(f.dist - f.half_diag < LIDAR_RANGE_M)
    if not near.size:
        return out
    g = f.geo[:, near]
    x, y = _outline_points(g, _OUTLINE_T)
    r = np.hypot(x, y)
    np.maximum(r, 1e-9, out=r)
    # Distance from the ego centre to its own outline along the same direction.
    with np.errstate(divide="ignore"):
        own = np.minimum(g[_EGO_HL, :, None] * r / np.abs(x), g[_EGO_HW, :, None] * r / np.abs(y))
    clearance = r - own
    np.maximum(clearance, 0.0, out=clearance)
    clearance = clearance.ravel()
    cell = np.floor(np.arctan2(y, x) / LIDAR_CELL_RAD + 0.5).astype(np.int64)
    # Bin = (vehicle, cell); & (LIDAR_CELLS - 1) is % LIDAR_CELLS for a power of two, negatives included.
    vcell = ((cell & (LIDAR_CELLS - 1)) + (f.owner[near] * LIDAR_CELLS)[:, None]).ravel()
    # The nearest point per bin, ties to the first point in pair/outline order (the reference's stable sort).
    best = np.full(n * LIDAR_CELLS, np.inf)
    np.minimum.at(best, vcell, clearance)
    hit = np.flatnonzero(best < LIDAR_RANGE_M)
    if not hit.size:
        return out
    nearest = np.flatnonzero(clearance == best[vcell])
    first = np.full(n * LIDAR_CELLS, len(clearance))
    np.minimum.at(first, vcell[nearest], nearest)
    first = first[hit]
    pair = first // len(_OUTLINE)
    r_first = r.ravel()[first]
    closing = -(g[_VX, pair] * (x.ravel()[first] / r_first) + g[_VY, pair] * (y.ravel()[first] / r_first))
    vehicle, cell_hit = hit // LIDAR_CELLS, hit % LIDAR_CELLS
    out[vehicle, 0, cell_hit] = clearance[first]
    out[vehicle, 1, cell_hit] = closing
    return out


def _grid(snapshots: Sequence[WorldSnapshot], f: _Fleet) -> np.ndarray:
    n, cells = len(snapshots), GRID_H * GRID_W
    out = np.zeros((n, GRID_CHANNELS, GRID_H, GRID_W), dtype=np.float32)
    hd, x, y = f.half_diag, f.geo[_PX], f.geo[_PY]
    near = (x + hd > GRID_X_MIN_M) & (x - hd < GRID_X_MIN_M + GRID_W * GRID_CELL_X_M)
    near &= (y + hd > GRID_Y_MIN_M) & (y - hd < _GRID_Y_MAX_M)
    keep = np.flatnonzero(near)
    if not keep.size:
        return out
    g = f.geo[:, keep]
    px, py = _outline_points(g, _FOOTPRINT_T)
    col = np.floor((px - GRID_X_MIN_M) / GRID_CELL_X_M).astype(np.int64)
    row = np.floor((_GRID_Y_MAX_M - py) / GRID_CELL_Y_M).astype(np.int64)
    # Unsigned views: a negative index wraps to a huge one, so one comparison per axis bounds it.
    inside = (col.view(np.uint64) < GRID_W) & (row.view(np.uint64) < GRID_H)
    # Points outside the grid go to one spare bin that is never read.
    flat = np.where(inside, (f.owner[keep] * cells)[:, None] + row * GRID_W + col, n * cells).ravel()
    weight = g[_LEN] * g[_WID] / len(_FOOTPRINT)
    # Each vehicle owns its own bins, summed in the same order as alone: per-cell sums are unchanged by batching.
    covered = np.bincount(flat, weights=np.repeat(weight, len(_FOOTPRINT)), minlength=n * cells + 1)[: n * cells]
    speed_sum = np.bincount(flat, weights=np.repeat(weight * g[_VX], len(_FOOTPRINT)),
                            minlength=n * cells + 1)[: n * cells]
    out[:, 0] = np.minimum(covered / _GRID_CELL_AREA_M2, 1.0).reshape(n, GRID_H, GRID_W)
    out[:, 1] = np.divide(speed_sum, covered, out=np.zeros_like(covered), where=covered > 0).reshape(
        n, GRID_H, GRID_W)
    return out


def _ego_kinematics(snapshots: Sequence[WorldSnapshot]) -> np.ndarray:
    """The kinematics batch with the ego block filled in and every neighbour row absent (zero)."""
    n = len(snapshots)
    out = np.zeros((n, KIN_DIM), dtype=np.float32)
    out[:, : len(EGO_FEATURES)] = np.fromiter(chain.from_iterable(map(_EGO_BLOCK, snapshots)), dtype=np.float64,
                                              count=len(EGO_FEATURES) * n).reshape(n, len(EGO_FEATURES))
    return out


def _empty_lidar(n: int) -> np.ndarray:
    """A lidar batch with no return in any cell."""
    out = np.zeros((n, 2, LIDAR_CELLS), dtype=np.float32)
    out[:, 0] = LIDAR_RANGE_M
    return out


_kernels: ModuleType | None = None
_backend: str | None = None  # resolved on first use: "compiled" when numba imports, else "numpy"


def backend() -> str:
    """The geometry backend in use; the first call imports numba and loads (or compiles) the loops.

    ``SensorSuite`` asks at construction, so that one-time cost (~0.5 s, ~2.4 s the first time on a
    machine) is paid before a drive's first tick rather than inside it.
    """
    global _backend
    if _backend is None:
        try:
            _load_kernels()
            _backend = "compiled"
        except ImportError as e:  # numba is optional: the numpy path gives the same values
            logger.info("sensor geometry on numpy (compiled loops unavailable: %s)", e)
            _backend = "numpy"
    return _backend


def set_backend(name: str) -> None:
    """Choose the geometry backend (tests and benchmarks run both); ConfigError if unknown or unavailable."""
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"sensor backend must be one of {BACKENDS}, got {name!r}")
    if name == "compiled" and _kernels is None:
        _load_kernels()
    _backend = name


def _load_kernels() -> None:
    """Import the compiled loops and run them once on a one-vehicle world (loads their machine code)."""
    global _kernels
    kernels = importlib.import_module("driveloop.sim._sensor_kernels")
    ego = VehicleState(0, 0.0, 0.0, 20.0, 0.0, 0.0)
    lead = VehicleState(1, 20.0, 0.0, 15.0, 0.0, 0.0)
    _compiled(kernels, [WorldSnapshot(0.0, ego, 20.0, 0.0, 0.0, 0.0, 0.0, 20.0, 4.0, (lead,))], 100.0)
    _kernels = kernels


def geometry(snapshots: Sequence[WorldSnapshot], range_m: float | np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean (kinematics, lidar, grid) batches; ``range_m`` is the neighbour range, one or per vehicle."""
    if (_backend or backend()) == "numpy":
        pairs = _pairs(snapshots)
        per_pair = range_m if isinstance(range_m, float) else np.asarray(range_m)[pairs.owner]
        return _kinematics(snapshots, pairs, per_pair), _lidar(snapshots, pairs), _grid(snapshots, pairs)
    assert _kernels is not None
    return _compiled(_kernels, snapshots, range_m)


def _compiled(k: ModuleType, snapshots: Sequence[WorldSnapshot], range_m: float | np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`geometry` on the compiled loops of module ``k``."""
    pairs, kin = _pairs_compiled(k, snapshots)
    ranges = _ranges(range_m)
    grid, xs, ys, pair = k.neighbours_and_grid(pairs.geo, pairs.owner, pairs.dist, pairs.half_diag, ranges,
                                               _OUTLINE_T, _FOOTPRINT_T, kin)
    # Range and bearing by numpy: its arctan2 can differ from libm's in the last bit.
    lidar = k.lidar_nearest(xs, ys, np.hypot(xs, ys), np.arctan2(ys, xs), pair, pairs.geo, pairs.owner,
                            len(snapshots), LIDAR_CELL_RAD)
    return kin, lidar, grid


_RANGE_ARRAYS: dict[float, np.ndarray] = {}


def _ranges(range_m: float | np.ndarray) -> np.ndarray:
    """The neighbour range as the compiled loop takes it: per vehicle, or one value (cached) for all."""
    if not isinstance(range_m, float):
        return np.asarray(range_m, dtype=np.float64)
    arr = _RANGE_ARRAYS.get(range_m)
    if arr is None:
        arr = _RANGE_ARRAYS[range_m] = np.array([range_m])
        arr.flags.writeable = False
    return arr
