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
from itertools import chain

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


@dataclass(frozen=True)
class _Fleet:
    """Every (vehicle, other vehicle) pair of a tick, in the owning vehicle's ego frame (P = pairs)."""

    owner: np.ndarray  # (P,) index of the observing vehicle
    px: np.ndarray  # (P,) centre, ego frame
    py: np.ndarray
    vx: np.ndarray  # (P,) relative velocity, ego frame
    vy: np.ndarray
    dist: np.ndarray  # (P,) centre distance
    cos_h: np.ndarray  # (P,) relative heading
    sin_h: np.ndarray
    length: np.ndarray  # (P,)
    width: np.ndarray
    half_diag: np.ndarray  # (P,) half the outline diagonal: how far an outline reaches from its centre


def _pairs(snapshots: Sequence[WorldSnapshot]) -> _Fleet:
    """One pass over the fleet's ground truth; numpy calls on whole-fleet arrays, not per vehicle."""
    counts = [len(s.others) for s in snapshots]
    # fromiter over a flat float stream: cheaper than np.array's nested-sequence discovery.
    raw = np.fromiter(
        chain.from_iterable([(v.x_m, v.y_m, v.vx_mps, v.vy_mps, v.heading_rad, v.length_m, v.width_m)
                             for s in snapshots for v in s.others]),
        dtype=np.float64, count=7 * sum(counts),
    ).reshape(-1, 7)
    # The ego rotation is per vehicle: scalar math (B values), broadcast to its pairs below.
    ego = np.array(
        [(s.ego.x_m, s.ego.y_m, s.ego.vx_mps, s.ego.vy_mps, s.ego.heading_rad,
          math.cos(s.ego.heading_rad), math.sin(s.ego.heading_rad)) for s in snapshots],
        dtype=np.float64,
    ).reshape(-1, 7)
    owner = np.repeat(np.arange(len(snapshots)), counts)
    e = ego[owner] if len(snapshots) > 1 else ego
    c, s = e[:, 5:6], e[:, 6:7]
    rel = (raw[:, 0:5] - e[:, 0:5])
    along, across = rel[:, 0:4:2], rel[:, 1:4:2]  # (dx, dvx), (dy, dvy): positions and velocities rotate alike
    fwd, left = along * c + across * s, along * -s + across * c
    heading = rel[:, 4]
    length, width = raw[:, 5], raw[:, 6]
    px, py = fwd[:, 0], left[:, 0]
    return _Fleet(
        owner=owner, px=px, py=py, vx=fwd[:, 1], vy=left[:, 1], dist=np.hypot(px, py),
        cos_h=np.cos(heading), sin_h=np.sin(heading),
        length=length, width=width, half_diag=np.hypot(length, width) / 2,
    )


def _outline_points(f: _Fleet, keep: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template points (fractions of length/width) of the kept vehicles, ego frame: x, y as (K * T,)."""
    lx = template[:, 0] * f.length[keep, None]
    ly = template[:, 1] * f.width[keep, None]
    c, s = f.cos_h[keep, None], f.sin_h[keep, None]
    x = c * lx - s * ly + f.px[keep, None]
    y = s * lx + c * ly + f.py[keep, None]
    return x.ravel(), y.ravel()


def _kinematics(snapshots: Sequence[WorldSnapshot], f: _Fleet, range_m: np.ndarray) -> np.ndarray:
    out = np.zeros((len(snapshots), KIN_DIM), dtype=np.float32)
    out[:, : len(EGO_FEATURES)] = [
        (s.speed_mps, s.accel_mps2, s.heading_rel_rad, s.lane_offset_m, s.steering_rad, s.set_speed_mps)
        for s in snapshots
    ]
    dist = f.dist
    sel = np.flatnonzero(dist <= range_m[f.owner])
    # Per vehicle, nearest first; lexsort is stable, so equal distances keep the snapshot's order.
    if len(snapshots) == 1:
        order = sel[np.argsort(dist[sel], kind="stable")][:N_NEIGHBOURS]
        owner, rank = np.zeros(len(order), dtype=np.int64), np.arange(len(order))
    else:
        order = sel[np.lexsort((dist[sel], f.owner[sel]))]
        owner = f.owner[order]
        rank = np.arange(len(order)) - np.searchsorted(owner, owner, side="left")
        top = rank < N_NEIGHBOURS
        order, owner, rank = order[top], owner[top], rank[top]
    rows = out[:, len(EGO_FEATURES):].reshape(len(snapshots), N_NEIGHBOURS, len(NEIGHBOUR_FEATURES))
    rows[owner, rank, 0] = 1.0
    rows[owner, rank, 1] = f.px[order]
    rows[owner, rank, 2] = f.py[order]
    rows[owner, rank, 3] = f.vx[order]
    rows[owner, rank, 4] = f.vy[order]
    return out


def _lidar(snapshots: Sequence[WorldSnapshot], f: _Fleet) -> np.ndarray:
    n = len(snapshots)
    out = np.zeros((n, 2, LIDAR_CELLS), dtype=np.float32)
    out[:, 0] = LIDAR_RANGE_M
    # Only vehicles whose outline can come within range (centre distance − half diagonal).
    near = np.flatnonzero(f.dist - f.half_diag < LIDAR_RANGE_M)
    if not near.size:
        return out
    x, y = _outline_points(f, near, _OUTLINE)
    pair = np.repeat(near, len(_OUTLINE))
    owner = f.owner[pair]
    if len(snapshots) == 1:
        half_len, half_wid = snapshots[0].ego.length_m / 2, snapshots[0].ego.width_m / 2
    else:
        half_len = np.array([s.ego.length_m / 2 for s in snapshots])[owner]
        half_wid = np.array([s.ego.width_m / 2 for s in snapshots])[owner]
    r = np.maximum(np.hypot(x, y), 1e-9)
    # Distance from the ego centre to its own outline along the same direction.
    with np.errstate(divide="ignore"):
        own = np.minimum(half_len * r / np.abs(x), half_wid * r / np.abs(y))
    clearance = np.maximum(r - own, 0.0)
    # A point at or beyond range is never a return (a cell's nearest point either is in range or
    # reads no return): dropping them first leaves every cell's answer, and the order of ties, as is.
    keep = np.flatnonzero(clearance < LIDAR_RANGE_M)
    if not keep.size:
        return out
    x, y, r, clearance, pair, owner = x[keep], y[keep], r[keep], clearance[keep], pair[keep], owner[keep]
    cell = np.floor(np.arctan2(y, x) / LIDAR_CELL_RAD + 0.5).astype(np.int64) % LIDAR_CELLS
    # Nearest point per (vehicle, cell): sort on (cell, clearance) packed into one key (clearance < 1000 m).
    vcell = owner * LIDAR_CELLS + cell
    order = np.argsort(vcell * 1000.0 + clearance, kind="stable")
    sorted_cell = vcell[order]
    new_cell = np.empty(len(order), dtype=bool)
    new_cell[0] = True
    np.not_equal(sorted_cell[1:], sorted_cell[:-1], out=new_cell[1:])
    first = order[new_cell]
    r_first, hit = r[first], pair[first]
    closing = -(f.vx[hit] * (x[first] / r_first) + f.vy[hit] * (y[first] / r_first))
    out[owner[first], 0, cell[first]] = clearance[first]
    out[owner[first], 1, cell[first]] = closing
    return out


def _grid(snapshots: Sequence[WorldSnapshot], f: _Fleet) -> np.ndarray:
    n, cells = len(snapshots), GRID_H * GRID_W
    out = np.zeros((n, GRID_CHANNELS, GRID_H, GRID_W), dtype=np.float32)
    hd, x, y = f.half_diag, f.px, f.py
    near = (x + hd > GRID_X_MIN_M) & (x - hd < GRID_X_MIN_M + GRID_W * GRID_CELL_X_M)
    near &= (y + hd > GRID_Y_MIN_M) & (y - hd < _GRID_Y_MAX_M)
    keep = np.flatnonzero(near)
    if not keep.size:
        return out
    px, py = _outline_points(f, keep, _FOOTPRINT)
    weight = np.repeat(f.length[keep] * f.width[keep] / len(_FOOTPRINT), len(_FOOTPRINT))
    dvx = np.repeat(f.vx[keep], len(_FOOTPRINT))
    owner = np.repeat(f.owner[keep], len(_FOOTPRINT))
    col = np.floor((px - GRID_X_MIN_M) / GRID_CELL_X_M).astype(np.int64)
    row = np.floor((_GRID_Y_MAX_M - py) / GRID_CELL_Y_M).astype(np.int64)
    inside = (col >= 0) & (col < GRID_W) & (row >= 0) & (row < GRID_H)
    flat = owner[inside] * cells + row[inside] * GRID_W + col[inside]
    weight = weight[inside]
    # Each vehicle owns its own bins, in the same order as alone: per-cell sums are unchanged by batching.
    # (bincount returns int64 when nothing is inside the grid: the cast covers that, and copies nothing otherwise.)
    covered = np.bincount(flat, weights=weight, minlength=n * cells).astype(np.float64, copy=False)
    speed_sum = np.bincount(flat, weights=weight * dvx[inside], minlength=n * cells).astype(np.float64, copy=False)
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
    pairs = _pairs(snapshots)
    arrays = {
        "kinematics": _kinematics(snapshots, pairs, np.array([c.neighbour_range_m for c in cfgs])),
        "lidar": _lidar(snapshots, pairs),
        "grid": _grid(snapshots, pairs),
    }
    n = len(snapshots)
    dropped = [rng.random(len(INPUT_NAMES)) for rng in rngs]  # always drawn: noise does not depend on dropouts
    if any(prev is not None and any(cfg.dropout_p) for cfg, prev in zip(cfgs, previous)):
        live = np.array([[prev is None or d[k] >= cfg.dropout_p[k] for k in range(len(INPUT_NAMES))]
                         for d, cfg, prev in zip(dropped, cfgs, previous)], dtype=bool)
        all_live = live.all(axis=1).tolist()
    else:
        live = np.ones((n, len(INPUT_NAMES)), dtype=bool)
        all_live = [True] * n  # one numpy call per vehicle saved on every tick of a dropout-free drive
    if any(any(cfg.sigma) for cfg in cfgs):
        add_noise(arrays, rngs, np.array([c.sigma for c in cfgs], dtype=np.float64), live)
    frames = []
    kin, lidar, grid = arrays["kinematics"], arrays["lidar"], arrays["grid"]
    for i, (snap, prev) in enumerate(zip(snapshots, previous)):
        if all_live[i]:
            frames.append(SensorFrame(Observation(kin[i], lidar[i], grid[i]), dict.fromkeys(INPUT_NAMES, False),
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
        frames.append(SensorFrame(Observation(kin[i], lidar[i], grid[i]), stale, stamps))
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
