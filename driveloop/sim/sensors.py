"""Sensors: ground truth (``WorldSnapshot``) → the float32 ``Observation`` of ``contracts.observation``.

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

Visibility (fog): nothing farther than ``visibility_m`` is seen: lidar cells beyond it read no return, grid
cells whose centre is farther ahead or behind are empty, neighbours farther (centre distance) are absent.
:meth:`SensorConfig.in_scenario` applies a scenario's degradation (``scenarios.fog_sensor_degradation``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from driveloop.contracts.observation import (
    GRID_CELL_X_M,
    GRID_W,
    GRID_X_MIN_M,
    INPUT_NAMES,
    LIDAR_RANGE_M,
    Observation,
)
from driveloop.core.exceptions import ConfigError
from driveloop.sim._sensor_geometry import LIDAR_CELL_RAD, backend, geometry  # noqa: F401 (cell width re-exported)
from driveloop.sim._sensor_noise import (  # noqa: F401 (units re-exported: documented here)
    EGO_NOISE_UNITS,
    GRID_OCCUPANCY_NOISE_UNIT,
    NEIGHBOUR_NOISE_UNITS,
    add_noise,
)
from driveloop.sim.scenarios import ScenarioSpec, fog_sensor_degradation
from driveloop.sim.world import WorldSnapshot

# Longitudinal centre of each grid column in the ego frame [m] (visibility cuts whole columns).
_GRID_COLUMN_X_M = GRID_X_MIN_M + GRID_CELL_X_M * (np.arange(GRID_W) + 0.5)


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
    visibility_m: float = math.inf  # fog: nothing farther is seen

    def __post_init__(self) -> None:
        for name in INPUT_NAMES:
            sigma, p = getattr(self, f"{name}_sigma"), getattr(self, f"{name}_dropout_p")
            if not (math.isfinite(sigma) and 0.0 <= sigma <= 10.0):
                raise ConfigError(f"{name}_sigma must be in [0, 10], got {sigma!r}")
            if not (math.isfinite(p) and 0.0 <= p < 1.0):
                raise ConfigError(f"{name}_dropout_p must be in [0, 1), got {p!r}")
        if not (math.isfinite(self.neighbour_range_m) and self.neighbour_range_m > 0):
            raise ConfigError("neighbour_range_m must be > 0")
        if not self.visibility_m > 0:  # inf is clear weather
            raise ConfigError(f"visibility_m must be > 0, got {self.visibility_m!r}")

    def in_scenario(self, spec: ScenarioSpec) -> SensorConfig:
        """These sensors as ``spec``'s weather leaves them: the shorter visibility, the more noise and dropout
        of either (itself when the scenario degrades nothing, so a clear fleet keeps one shared config)."""
        visibility, sigma, dropout_p = fog_sensor_degradation(spec)
        if math.isinf(visibility):
            return self
        return SensorConfig(*(max(v, sigma) for v in self.sigma), *(max(p, dropout_p) for p in self.dropout_p),
                            neighbour_range_m=self.neighbour_range_m, visibility_m=min(self.visibility_m, visibility))

    @property
    def seen_range_m(self) -> float:
        """How far a neighbour may be (centre distance) and still be reported: the range, cut by visibility."""
        return min(self.neighbour_range_m, self.visibility_m)

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


class SensorFrame(NamedTuple):
    """One tick of sensor output: the observation, which sensors are stale, and when each was measured.

    Immutable; a NamedTuple because one is built for every vehicle on every tick (cheaper than a frozen
    dataclass).
    """

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
    if uniform:
        range_m: float | np.ndarray = float(cfgs[0].seen_range_m if cfgs else _DEFAULT.neighbour_range_m)
        noisy, drops = bool(cfgs) and cfgs[0].has_noise, bool(cfgs) and cfgs[0].has_dropout
    else:
        range_m = np.array([c.seen_range_m for c in cfgs])
        noisy, drops = any(c.has_noise for c in cfgs), any(c.has_dropout for c in cfgs)
    kin, lidar, grid = geometry(snapshots, range_m)
    arrays = {"kinematics": kin, "lidar": lidar, "grid": grid}
    if any(not math.isinf(c.visibility_m) for c in cfgs):
        _cut_visibility(arrays, np.array([c.visibility_m for c in cfgs]))
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


def _cut_visibility(arrays: dict[str, np.ndarray], visibility_m: np.ndarray) -> None:
    """In place: lidar returns beyond each vehicle's visibility become no return, grid columns beyond it empty."""
    lidar = arrays["lidar"]
    hidden = lidar[:, 0] > visibility_m[:, None]
    lidar[:, 0][hidden] = LIDAR_RANGE_M
    lidar[:, 1][hidden] = 0.0
    far = np.abs(_GRID_COLUMN_X_M)[None, :] > visibility_m[:, None]  # (B, W)
    arrays["grid"][np.broadcast_to(far[:, None, None, :], arrays["grid"].shape)] = 0.0


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
        backend()  # load the geometry backend now, not in the first tick
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
