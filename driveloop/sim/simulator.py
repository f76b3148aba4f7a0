"""The simulator adapter: one ego vehicle in a highway-env scene, stepped at the control period.

This is the only module that speaks highway-env's stringly config and its y-down frame; everything
it returns is a :class:`~driveloop.sim.world.WorldSnapshot` in the road frame (y left, SI units).

Rules it keeps:
- continuous commands (acceleration m/s², steering rad, + left) are clipped to the actuator ranges of
  :class:`SimConfig` and braking to what the road's friction allows (``ScenarioSpec.max_decel_mps2``);
  non-finite commands are refused (the safety supervisor must never send them);
- braking goes through a first-order lag (``brake_lag_s``, exact exponential update per sub-step);
- ego speed stays in [0, ``max_speed_mps``]: no reversing;
- the ego never changes lane by itself: ``expert_action()`` is IDM on its own lane plus lane keeping,
  the longitudinal/lateral controllers of highway-env's IDM/MOBIL vehicle without MOBIL;
- same scenario + seed + commands → same trajectory (all randomness from seeded generators).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from driveloop.contracts.observation import CONTROL_PERIOD_S
from driveloop.core.exceptions import ConfigError, SafetyError
from driveloop.sim.scenarios import ScenarioSpec, parse_scenario
from driveloop.sim.world import VehicleState, WorldSnapshot

if TYPE_CHECKING:
    from highway_env.vehicle.kinematics import Vehicle

    from driveloop.sim._scenes import Scene

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    """Physical and numerical settings of the simulator (validated on construction)."""

    # brake_lag_s is the time constant of the longitudinal actuator (brake and drive alike): the
    # applied acceleration follows the command as a first-order lag.
    dt_s: float = CONTROL_PERIOD_S
    sim_frequency_hz: float = 10.0
    brake_lag_s: float = 0.25
    accel_min_mps2: float = -9.0
    accel_max_mps2: float = 3.0
    max_steer_rad: float = 0.5
    max_speed_mps: float = 40.0
    render_width_px: int = 600
    render_height_px: int = 150

    def __post_init__(self) -> None:
        if not (self.dt_s > 0 and self.sim_frequency_hz > 0):
            raise ConfigError("dt_s and sim_frequency_hz must be > 0")
        substeps = self.dt_s * self.sim_frequency_hz
        if abs(substeps - round(substeps)) > 1e-6 or round(substeps) < 1:
            raise ConfigError(f"dt_s × sim_frequency_hz must be a whole number ≥ 1, got {substeps:g}")
        if self.brake_lag_s < 0:
            raise ConfigError("brake_lag_s must be >= 0")
        if not self.accel_min_mps2 < 0 < self.accel_max_mps2:
            raise ConfigError("need accel_min_mps2 < 0 < accel_max_mps2")
        if not 0 < self.max_steer_rad < math.pi / 2:
            raise ConfigError("max_steer_rad must be in (0, pi/2)")
        if not 0 < self.max_speed_mps <= 60:
            raise ConfigError("max_speed_mps must be in (0, 60]")
        if self.render_width_px < 16 or self.render_height_px < 16:
            raise ConfigError("render size must be at least 16 px")

    @property
    def substeps(self) -> int:
        return round(self.dt_s * self.sim_frequency_hz)


def _env_class() -> type:
    """A highway-env env whose scene is built by ``_sim_scenes`` (imported lazily: pygame, gymnasium)."""
    from highway_env.envs.common.abstract import AbstractEnv

    class _DriveloopEnv(AbstractEnv):
        """Holds the road for highway-env's renderer; stepping is done by :class:`Simulator`."""

        def __init__(self, scene_builder: Any, **kwargs: Any) -> None:
            self.scene_builder = scene_builder
            super().__init__(**kwargs)

        def _reset(self) -> None:
            scene = self.scene_builder()
            self.road = scene.road
            self.controlled_vehicles = [scene.ego]
            self.scene = scene

        def _reward(self, action: object) -> float:
            return 0.0

        def _is_terminated(self) -> bool:
            return bool(self.vehicle.crashed)

        def _is_truncated(self) -> bool:
            return False

    return _DriveloopEnv


class Simulator:
    """One seeded scenario: ``reset()``, then ``step(accel, steering)`` once per control period.

    ``spec`` may also be a scenario name (parsed with ``parse_scenario``, ScenarioError if unknown).
    """

    def __init__(self, spec: ScenarioSpec | str, seed: int, config: SimConfig | None = None) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.spec = parse_scenario(spec) if isinstance(spec, str) else spec
        self.seed = int(seed)
        self.config = config or SimConfig()
        self._env: Any = None
        self._scene: Scene | None = None
        self._rng = np.random.default_rng(self.seed)
        self._ids: dict[int, int] = {}
        self.t_s = 0.0
        self.collisions = 0
        self._crashed_before = False

    # -- lifecycle -------------------------------------------------------------------------------------
    def reset(self) -> WorldSnapshot:
        """Build the scene afresh from (spec, seed) and return the first snapshot."""
        from driveloop.sim._scenes import build_scene

        cfg = self.config
        spec, seed = self.spec, self.seed
        # Fresh generators on every build: highway-env resets once in its constructor too.
        self._rng = np.random.default_rng([seed, 1])  # traffic recycling while driving

        def builder() -> Scene:
            return build_scene(spec, np.random.default_rng(seed), np.random.RandomState(seed), cfg.brake_lag_s,
                               cfg.max_speed_mps)

        if self._env is None:
            self._env = _env_class()(
                builder,
                config={
                    "observation": {"type": "Kinematics", "vehicles_count": 1},  # unused: we compute our own sensors
                    "action": {"type": "ContinuousAction"},
                    "simulation_frequency": cfg.sim_frequency_hz,
                    "policy_frequency": 1.0 / cfg.dt_s,
                    "screen_width": cfg.render_width_px,
                    "screen_height": cfg.render_height_px,
                    "offscreen_rendering": True,
                },
                render_mode="rgb_array",
            )
        self._env.reset(seed=self.seed)
        self._scene = self._env.scene
        self._ids = {id(v): i for i, v in enumerate(self._scene.road.vehicles)}
        self.t_s = 0.0
        self.collisions = 0
        self._crashed_before = False
        logger.debug("reset %s seed=%d meta=%s", self.spec.name, self.seed, self._scene.meta)
        return self.snapshot()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._scene = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stepping --------------------------------------------------------------------------------------
    def _need_scene(self) -> Scene:
        if self._scene is None:
            raise ConfigError("Simulator.reset() must be called before stepping")
        return self._scene

    def step(self, accel_cmd_mps2: float, steering_cmd_rad: float) -> WorldSnapshot:
        """Apply one command for one control period and return the new snapshot."""
        scene = self._need_scene()
        accel, steer = float(accel_cmd_mps2), float(steering_cmd_rad)
        if not (math.isfinite(accel) and math.isfinite(steer)):
            raise SafetyError(f"non-finite actuator command ({accel_cmd_mps2!r}, {steering_cmd_rad!r})")
        cfg = self.config
        # The road's friction limits braking (slippery: friction x g); on a dry road the actuator's range decides.
        accel = min(max(accel, cfg.accel_min_mps2, -self.spec.max_decel_mps2), cfg.accel_max_mps2)
        steer = min(max(steer, -cfg.max_steer_rad), cfg.max_steer_rad)
        scene.ego.command(accel, -steer)  # highway-env steers + to the right (y down)
        h = 1.0 / cfg.sim_frequency_hz
        road = scene.road
        for _ in range(cfg.substeps):
            road.act()
            road.step(h)
        self.t_s = round(self.t_s + cfg.dt_s, 9)
        if scene.recycle:
            from driveloop.sim._scenes import recycle_traffic

            recycle_traffic(scene, self._rng)
        if scene.ego.crashed and not self._crashed_before:
            self.collisions += 1
            self._crashed_before = True
            logger.info("%s seed=%d: ego collision at t=%.1f s", self.spec.name, self.seed, self.t_s)
        return self.snapshot()

    @property
    def crashed(self) -> bool:
        return bool(self._scene is not None and self._scene.ego.crashed)

    @property
    def done(self) -> bool:
        """The scenario's natural length has elapsed (nominal scenes may be driven longer)."""
        return self.t_s >= self.spec.duration_s - 1e-9

    def expert_action(self) -> tuple[float, float]:
        """(acceleration m/s², steering rad + left) of the IDM + lane-keeping expert at the current state."""
        scene = self._need_scene()
        accel, steer_hw = scene.ego.expert((self.config.accel_min_mps2, self.config.accel_max_mps2),
                                           self.config.max_steer_rad)
        return accel, -steer_hw

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 of the scene centred on the ego (offscreen pygame surface)."""
        self._need_scene()
        if not os.environ.get("XDG_RUNTIME_DIR"):
            # SDL prints "XDG_RUNTIME_DIR is invalid" on every headless init; give it a private dir.
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="driveloop-xdg-")
        frame = self._env.render()
        return np.asarray(frame, dtype=np.uint8)

    # -- ground truth ----------------------------------------------------------------------------------
    def _state(self, v: Vehicle) -> VehicleState:
        vel = v.velocity
        return VehicleState(
            id=self._ids.setdefault(id(v), len(self._ids)),
            x_m=float(v.position[0]),
            y_m=-float(v.position[1]),
            vx_mps=float(vel[0]),
            vy_mps=-float(vel[1]),
            heading_rad=-float(v.heading),
            length_m=float(v.LENGTH),
            width_m=float(v.WIDTH),
            lane_index=int(v.lane_index[2]) if v.lane_index else 0,
        )

    def snapshot(self) -> WorldSnapshot:
        """The ground truth now."""
        scene = self._need_scene()
        ego = scene.ego
        lane = ego.road.network.get_lane(ego.own_lane_index())
        s, lateral = lane.local_coordinates(ego.position)
        heading_rel = math.remainder(float(ego.heading - lane.heading_at(s)), math.tau)
        return WorldSnapshot(
            t_s=self.t_s,
            ego=self._state(ego),
            speed_mps=float(ego.speed),
            accel_mps2=float(ego.accel_mps2),
            steering_rad=-float(ego.steering_cmd_rad),
            heading_rel_rad=-heading_rel,
            lane_offset_m=-float(lateral),
            set_speed_mps=float(ego.set_speed_mps),
            lane_width_m=float(lane.width_at(s)),
            others=tuple(self._state(v) for v in scene.road.vehicles if v is not ego),
            crashed=bool(ego.crashed),
            off_road=not bool(ego.on_road),
        )
