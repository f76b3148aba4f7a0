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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from operator import attrgetter
from typing import NamedTuple

import numpy as np
from driveloop.edge._sensor_noise import (  # noqa: F401 (units re-exported: documented here)
    EGO_NOISE_UNITS,
    GRID_OCCUPANCY_NOISE_UNIT,
    NEIGHBOUR_NOISE_UNITS,
    add_noise,
)
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

    @property
    def sigma(self) -> tuple[float, float, float]:
        """Noise sigmas in ``INPUT_NAMES`` order (the per-tick loop indexes, it does not format names)."""
        return (self.kinematics_sigma, self.lidar_sigma, self.grid_sigma)

    @property
    def dropout_p(self) -> tuple[float, float, float]:
        """Dropout probabilities in ``INPUT_NAMES`` order."""
        return (self.kinematics_dropout_p, self.lidar_dropout_p, self.grid_dropout_p)

    @cached_property
    def has_noise(self) -> bool:
        """Any sensor noisy (computed once: the per-tick loop asks for every vehicle)."""
        return any(self.sigma)

    @cached_property
    def has_dropout(self) -> bool:
        """Any sensor that can drop frames (computed once)."""
        return any(self.dropout_p)


_DEFAULT = SensorConfig()


@dataclass(frozen=True)
class SensorFrame:
    """One tick of sensor output: the observation, which sensors are stale, and when each was measured."""

    observation: Observation
    stale: dict[str, bool]
    stamp_s: dict[str, float]


@dataclass(frozen=True)
class SensorBatch:
    """One tick of several vehicles' sensors: the stacked model inputs and each vehicle's frame.

    ``arrays[name][i]`` is ``frames[i].observation.<name>`` (the frames hold views of these rows), so
    the fleet hands ``arrays`` to the model as is: batching the sensors is batching the inference input.
    """

    arrays: dict[str, np.ndarray]
    frames: tuple[SensorFrame, ...]


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


def _pairs(snapshots: Sequence[WorldSnapshot]) -> _Fleet:
    """One pass over the fleet's ground truth; numpy calls on whole-fleet arrays, not per vehicle."""
    others = [s.others for s in snapshots]
    counts = [len(o) for o in others]
    total = sum(counts)
    # A flat float stream into fromiter: cheaper than np.array's nested-sequence discovery.
    raw = np.fromiter(chain.from_iterable(map(_STATE, chain.from_iterable(others))), dtype=np.float64,
                      count=7 * total).reshape(total, 7).T
    # Per vehicle (scalar math, B values): position, velocity, heading, the rotation as the two
    # multiplier pairs (cos, -sin) and (sin, cos), half length and half width.
    ego_rows = []
    for s in snapshots:
        e = s.ego
        c, sn = math.cos(e.heading_rad), math.sin(e.heading_rad)
        ego_rows.append((e.x_m, e.y_m, e.vx_mps, e.vy_mps, e.heading_rad, c, -sn, sn, c,
                         e.length_m / 2, e.width_m / 2))
    ego = np.array(ego_rows, dtype=np.float64).reshape(-1, 11).T
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
    out = np.zeros((n, KIN_DIM), dtype=np.float32)
    out[:, : len(EGO_FEATURES)] = np.fromiter(chain.from_iterable(map(_EGO_BLOCK, snapshots)), dtype=np.float64,
                                              count=len(EGO_FEATURES) * n).reshape(n, len(EGO_FEATURES))
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
    out = np.zeros((n, 2, LIDAR_CELLS), dtype=np.float32)
    out[:, 0] = LIDAR_RANGE_M
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


def observe_batch(
    snapshots: Sequence[WorldSnapshot],
    rngs: Sequence[np.random.Generator],
    configs: Sequence[SensorConfig | None],
    previous: Sequence[SensorFrame | None],
) -> SensorBatch:
    """Sensor output for several vehicles at once: the same values as one :func:`observe` per vehicle.

    Geometry is computed in one pass over all (vehicle, other vehicle) pairs; each vehicle's noise
    and dropout are then drawn from its own ``rng`` in the same order as alone, so a vehicle's
    readings do not depend on which fleet it is batched with.
    """
    if not (len(snapshots) == len(rngs) == len(configs) == len(previous)):
        raise ConfigError("observe_batch needs one rng, config and previous frame per snapshot")
    cfgs = [c or _DEFAULT for c in configs]
    n = len(snapshots)
    # A fleet shares one config object: one identity count decides it (and the per-pair range gather goes).
    uniform = not cfgs or cfgs.count(cfgs[0]) == n
    pairs = _pairs(snapshots)
    if uniform:
        range_m: float | np.ndarray = cfgs[0].neighbour_range_m if cfgs else _DEFAULT.neighbour_range_m
        noisy, drops = bool(cfgs) and cfgs[0].has_noise, bool(cfgs) and cfgs[0].has_dropout
    else:
        range_m = np.array([c.neighbour_range_m for c in cfgs])[pairs.owner]
        noisy, drops = any(c.has_noise for c in cfgs), any(c.has_dropout for c in cfgs)
    arrays = {
        "kinematics": _kinematics(snapshots, pairs, range_m),
        "lidar": _lidar(snapshots, pairs),
        "grid": _grid(snapshots, pairs),
    }
    all_live = [True] * n
    if noisy or drops:
        # Drawn whenever the vehicle's sensors use their stream (noise does not depend on dropouts); a
        # vehicle without noise or dropout never reads its stream, so its draw would change nothing.
        dropped = [rng.random(len(INPUT_NAMES)) if cfg.has_noise or cfg.has_dropout else None
                   for rng, cfg in zip(rngs, cfgs)]
        live = np.ones((n, len(INPUT_NAMES)), dtype=bool)
        if drops and any(prev is not None for prev in previous):
            live = np.array([[prev is None or not cfg.has_dropout or d[k] >= cfg.dropout_p[k]
                              for k in range(len(INPUT_NAMES))]
                             for d, cfg, prev in zip(dropped, cfgs, previous)], dtype=bool)
            all_live = live.all(axis=1).tolist()
        if noisy:
            add_noise(arrays, rngs, np.array([c.sigma for c in cfgs], dtype=np.float64), live)
    frames = []
    kin, lidar, grid = arrays["kinematics"], arrays["lidar"], arrays["grid"]
    # Iterating the batches yields each vehicle's row views (one C loop instead of three indexings each).
    for i, (snap, prev, k_row, l_row, g_row) in enumerate(zip(snapshots, previous, kin, lidar, grid)):
        if all_live[i]:
            frames.append(SensorFrame(Observation(k_row, l_row, g_row), dict.fromkeys(INPUT_NAMES, False),
                                      dict.fromkeys(INPUT_NAMES, snap.t_s)))
            continue
        stale: dict[str, bool] = {}
        stamps: dict[str, float] = {}
        for k, name in enumerate(INPUT_NAMES):
            if live[i, k]:
                stale[name], stamps[name] = False, snap.t_s
            else:  # a lost frame: the last one repeats, with its old stamp
                arrays[name][i] = getattr(prev.observation, name)
                stale[name], stamps[name] = True, prev.stamp_s[name]
        frames.append(SensorFrame(Observation(k_row, l_row, g_row), stale, stamps))
    return SensorBatch(arrays=arrays, frames=tuple(frames))


def observe(
    snapshot: WorldSnapshot,
    rng: np.random.Generator,
    config: SensorConfig | None = None,
    previous: SensorFrame | None = None,
) -> SensorFrame:
    """Sensor output for ``snapshot``; ``previous`` is what a dropped frame repeats (none: never stale)."""
    return observe_batch((snapshot,), (rng,), (config,), (previous,)).frames[0]


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
        return observe_suites((self,), (snapshot,)).frames[0]


def observe_suites(suites: Sequence[SensorSuite], snapshots: Sequence[WorldSnapshot]) -> SensorBatch:
    """One tick of several vehicles' sensor suites in one batch (the fleet's path); each suite advances."""
    batch = observe_batch(snapshots, [s._rng for s in suites], [s.config for s in suites],
                          [s._last for s in suites])
    for suite, frame in zip(suites, batch.frames):
        suite._last = frame
    return batch
