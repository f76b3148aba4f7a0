"""One vehicle's control loop: simulator → sensors → (model, owned by the fleet) → supervisor → actuators.

The supervisor always sits between the model and the actuators: the simulator only ever receives a
:class:`~driveloop.safety.Decision`'s command, never the model's raw output. Inference is not done
here: the fleet batches every vehicle's observation into one call per tick (dynamic batching) and
hands each agent its :class:`~driveloop.safety.ModelReply`.

A vehicle drives consecutive *episodes* (scenario + seed) until the fleet's duration is spent; each
episode is replayable from its (scenario, seed) and recorded into its own segments.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driveloop.contracts.observation import Observation, stack
from driveloop.sim.perception import forward_track, side_tracks
from driveloop.sim.scenarios import is_mix, parse_scenario
from driveloop.contracts.segment import TickRecord
from driveloop.sim.sensors import SensorConfig, SensorFrame, SensorSuite, observe_suites
from driveloop.sim.simulator import SimConfig, Simulator
from driveloop.sim.world import WorldSnapshot, gap_m
from driveloop.core.exceptions import ConfigError
from driveloop.core.logfmt import bind, log_event, new_span_id, new_trace_id, unbind
from driveloop.edge.faults import Fault, lookup
from driveloop.safety import Advisory, Decision, ModelReply, Supervisor, SupervisorConfig, SupervisorInputs

logger = logging.getLogger(__name__)

AEB_AT_SPEED_MPS = 10.0  # an AEB onset at this speed or more is an emergency at speed, not a creep in a queue


@dataclass(frozen=True)
class FaultSpec:
    """A fault injected at ``at_s`` into the drive, lasting ``duration_s`` (kill: one SIGKILL).

    ``kind`` names a row of :data:`~driveloop.edge.faults.FAULTS`; :attr:`behaviour` is that row.
    """

    kind: str
    at_s: float = 5.0
    duration_s: float = 3.0

    def __post_init__(self) -> None:
        lookup(self.kind)  # ConfigError listing the valid names
        if not (math.isfinite(self.at_s) and self.at_s >= 0 and self.duration_s > 0):
            raise ConfigError("fault time must be >= 0 and its duration > 0")

    @property
    def behaviour(self) -> Fault:
        return lookup(self.kind)

    def active(self, now_s: float) -> bool:
        return self.at_s - 1e-9 <= now_s < self.at_s + self.duration_s - 1e-9


@dataclass(frozen=True)
class AgentConfig:
    """Per-vehicle loop settings; ``deadline_s`` is the inference budget inside the control period."""

    sim: SimConfig = field(default_factory=SimConfig)
    sensors: SensorConfig = field(default_factory=SensorConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    deadline_s: float = 0.05
    model_enabled: bool = True  # False: fallback only (the model is treated as dead from the start)

    def __post_init__(self) -> None:
        if not 0 < self.deadline_s <= self.sim.dt_s:
            raise ConfigError(f"deadline_s must be in (0, {self.sim.dt_s}] s (the control period)")


@dataclass
class ShadowStats:
    """Shadow model vs the actuating model on the same inputs (never actuated)."""

    compared_ticks: int = 0
    disagreements: int = 0  # |Δaccel| > 1 m/s² or |Δsteer| > 0.05 rad
    abs_diff_sum: float = 0.0

    @property
    def mean_abs_diff(self) -> float:
        return self.abs_diff_sum / self.compared_ticks if self.compared_ticks else 0.0


@dataclass
class VehicleMetrics:
    """What one vehicle did; summed into fleet metrics. Distances in m, times in s."""

    vehicle_id: str
    ticks: int = 0
    driven_s: float = 0.0
    distance_m: float = 0.0
    set_distance_m: float = 0.0  # distance at the driver's set speed: the progress denominator
    collisions: int = 0
    interventions: int = 0  # fallback activations (model → fallback transitions)
    fallback_ticks: int = 0
    fcw: int = 0
    aeb_ticks: int = 0
    aeb_activations: int = 0  # AEB onsets: a braking tick after one without
    aeb_activations_at_speed: int = 0  # ... of them at AEB_AT_SPEED_MPS or faster (not creeping in a queue)
    peak_decel_mps2: float = 0.0  # the hardest deceleration the body felt
    watchdog: dict[str, int] = field(default_factory=dict)
    episodes: int = 0
    episodes_by_kind: dict[str, int] = field(default_factory=dict)
    interventions_by_kind: dict[str, int] = field(default_factory=dict)
    driven_s_by_kind: dict[str, float] = field(default_factory=dict)  # exposure per class: rates per hour
    collisions_by_kind: dict[str, int] = field(default_factory=dict)
    min_gap_m: float = math.inf
    abs_jerk_sum: float = 0.0
    sense_s: float = 0.0
    supervise_s: float = 0.0
    sim_s: float = 0.0
    model_errors: int = 0  # ticks without model output because the model call raised
    inference_ms: list[float] = field(default_factory=list, repr=False)  # its own group's call, per tick
    shadow: ShadowStats | None = None  # its own rows of a shadow comparison; None when no shadow ran beside it

    @property
    def inference_p99_ms(self) -> float:
        """p99 of the inference calls this vehicle waited for (what its health report carries)."""
        return float(np.percentile(self.inference_ms, 99)) if self.inference_ms else 0.0

    @property
    def interventions_per_hour(self) -> float:
        return self.interventions / (self.driven_s / 3600.0) if self.driven_s > 0 else 0.0

    @property
    def progress(self) -> float:
        return self.distance_m / self.set_distance_m if self.set_distance_m > 0 else 0.0

    @property
    def mean_abs_jerk_mps3(self) -> float:
        return self.abs_jerk_sum / self.ticks if self.ticks else 0.0


RecorderFactory = Callable[[str, str, int], object]  # (vehicle_id, scenario, seed) -> Recorder


class VehicleAgent:
    """One vehicle driving consecutive episodes; the fleet calls ``sense()`` then ``act(reply)`` per tick."""

    def __init__(
        self,
        vehicle_id: str,
        scenario: str,
        seed: int,
        config: AgentConfig | None = None,
        recorder_factory: RecorderFactory | None = None,
        fault: FaultSpec | None = None,
        log_expert: bool = True,
    ) -> None:
        self.vehicle_id = vehicle_id
        self.scenario_request = scenario  # a scenario name or "mix"
        self.base_seed = int(seed)
        self.config = config or AgentConfig()
        self.recorder_factory = recorder_factory
        self.fault = fault
        self.log_expert = log_expert
        self.metrics = VehicleMetrics(vehicle_id)
        self.supervisor = Supervisor(self.config.supervisor)
        self.t_s = 0.0  # vehicle clock across episodes
        self.last_decision: Decision | None = None
        self._pending: Decision | None = None  # decided, not yet applied
        self.fault_log: dict[str, float | None] = {"injected_at_s": None, "detected_at_s": None, "brake_at_s": None}
        self._mix_rng = np.random.default_rng([self.base_seed, 7])
        self._episode = -1
        self._sim: Simulator | None = None
        self._recorder = None
        self.closed_segments: list[Path] = []
        self._snap: WorldSnapshot | None = None
        self._obs: Observation | None = None
        self._sensor_stamp_s = 0.0
        self._last_accel = 0.0
        self.trace_id = new_trace_id()  # this vehicle's drive: its log lines and safety events share it
        self.model_version: str | None = None  # for its log lines when no recorder names the model
        self.new_episode()

    # -- episodes -----------------------------------------------------------------------------------
    def _episode_seed(self) -> int:
        return int(np.random.SeedSequence([self.base_seed, self._episode]).generate_state(1)[0])

    def new_episode(self) -> None:
        """Close the current episode (and its segments) and start the next (scenario, seed)."""
        self.end_episode()
        self._episode += 1
        if is_mix(self.scenario_request):
            from driveloop.sim.scenarios import draw_mix

            name = draw_mix(self._mix_rng, self.scenario_request)
        else:
            name = self.scenario_request
        self.spec = parse_scenario(name)
        self.seed = self.base_seed if self._episode == 0 else self._episode_seed()
        if self._sim is not None:
            self._sim.close()
        self._sim = Simulator(self.spec, self.seed, self.config.sim)
        self._snap = self._sim.reset()
        self.sensors = SensorSuite(self.config.sensors.in_scenario(self.spec), seed=self.seed)  # fog degrades them
        self.supervisor.reset()
        self._sensor_stamp_s = self.t_s
        self._last_accel = self._snap.accel_mps2
        self._aeb_before = False
        self.metrics.episodes += 1
        kind = self.spec.kind
        self.metrics.episodes_by_kind[kind] = self.metrics.episodes_by_kind.get(kind, 0) + 1
        if self.recorder_factory is not None:
            self._recorder = self.recorder_factory(self.vehicle_id, self.spec.name, self.seed)
        self.span_id = new_span_id()  # one span per episode of the trace
        logger.debug("%s: episode %d %s seed=%d", self.vehicle_id, self._episode, self.spec.name, self.seed)

    def end_episode(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
            self.closed_segments.extend(self._recorder.closed)
            self._recorder = None

    def close(self) -> None:
        self.end_episode()
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    @property
    def snapshot(self) -> WorldSnapshot:
        assert self._snap is not None
        return self._snap

    def render(self) -> np.ndarray:
        assert self._sim is not None
        return self._sim.render()

    # -- one tick -----------------------------------------------------------------------------------
    def sense(self) -> Observation:
        """Read the sensors for this tick (a stale-frame fault freezes them); the fleet uses :func:`sense_fleet`."""
        sense_fleet((self,))
        assert self._obs is not None
        return self._obs

    @property
    def observation(self) -> Observation | None:
        """What the sensors delivered this tick (None before the first ``sense``)."""
        return self._obs

    def _sensors_frozen(self) -> bool:
        frozen = self.fault is not None and self.fault.behaviour.freezes_sensors and self.fault.active(self.t_s)
        return frozen and self._obs is not None  # the sensor stack stopped delivering: the last frame repeats

    def _take_frame(self, frame: SensorFrame) -> None:
        self._obs = frame.observation
        # The oldest sensor decides: the watchdog must see any input that stopped updating.
        age_s = self.snapshot.t_s - min(frame.stamp_s.values())
        self._sensor_stamp_s = self.t_s - age_s

    def act(self, reply: ModelReply | None, latency_ms: float = 0.0) -> Decision:
        """Supervise the model's reply, actuate, record, and advance the simulator one period."""
        decision = self.decide(reply, latency_ms)
        self.advance()
        return decision

    def decide(self, reply: ModelReply | None, latency_ms: float = 0.0, advisory: Advisory | None = None) -> Decision:
        """Supervise the model's reply and record the tick; :meth:`advance` then actuates it.

        The fleet decides for every vehicle before it advances any: between two vehicles' safety code
        there is then no ~1 ms simulator step evicting the caches, which halves its cost per vehicle.
        Everything logged meanwhile carries this vehicle's log context (:attr:`log_fields`).
        """
        token = bind(**self.log_fields)
        try:
            return self._decide(reply, latency_ms, advisory)
        finally:
            unbind(token)

    @property
    def log_fields(self) -> dict[str, str]:
        """This vehicle's log context: id, trace, episode span, and the model that drives it."""
        version = getattr(self._recorder, "model_version", None) or self.model_version
        fields = {"vehicle_id": self.vehicle_id, "trace_id": self.trace_id, "span_id": self.span_id}
        return fields if version is None else {**fields, "model_version": str(version)}

    def _log_safety(self, before: Decision | None, d: Decision) -> None:
        """One searchable line per safety activation, at its onset (not every tick it lasts)."""
        onsets = (("aeb", d.aeb and not (before is not None and before.aeb)),
                  ("fcw", d.fcw and not (before is not None and before.fcw)),
                  ("watchdog", d.watchdog is not None and (before is None or before.watchdog != d.watchdog)))
        actions = [a for a, new in onsets if new]
        if d.activation and not actions:
            actions.append("fallback")  # another rule took over (lane guard, limits)
        ttc = d.parts.get("ttc_s")
        for action in actions:
            labels: dict[str, str | float] = {"t_s": round(self.t_s, 3), "scenario": self.spec.name,
                                              "source": d.source}
            if ttc is not None and math.isfinite(ttc):
                labels["ttc_s"] = round(float(ttc), 3)
            if action == "watchdog":
                labels["watchdog"] = str(d.watchdog)
            log_event(logger, logging.INFO, action, "%s activation at t=%.1f s: %s", action, self.t_s,
                      d.reason or d.watchdog or "no reason given", labels=labels)

    def _decide(self, reply: ModelReply | None, latency_ms: float, advisory: Advisory | None = None) -> Decision:
        snap, obs = self.snapshot, self._obs
        assert obs is not None, "sense() must be called before decide()"
        t0 = time.perf_counter()
        track = forward_track(obs)
        speed, accel, heading, offset = obs.kinematics[:4].tolist()  # one conversion, not four numpy scalars
        decision = self.supervisor.step(
            SupervisorInputs(
                now_s=self.t_s + self.config.deadline_s,  # the loop decides at the inference deadline
                ego_speed_mps=speed,
                ego_accel_mps2=accel,
                lane_offset_m=offset,
                heading_rel_rad=heading,
                track=track,
                sensor_stamp_s=self._sensor_stamp_s,
                reply=reply,
                model_enabled=self.config.model_enabled,
                neighbours=side_tracks(obs),  # the AEB brakes for one that cuts in
                road_friction=self.spec.friction_mu,  # the vehicle's friction estimate (slippery roads)
                advisory=advisory,  # a road hazard ahead (edge/hazards.py): may only make the command more careful
            )
        )
        self.metrics.supervise_s += time.perf_counter() - t0
        self._log_safety(self.last_decision, decision)
        self.last_decision = decision
        self._pending = decision
        self._track_fault(decision)
        self._record(snap, obs, reply, decision, latency_ms, track)
        return decision

    def advance(self) -> None:
        """Apply the decided command: step the simulator one period (a new episode after a crash or its end)."""
        token = bind(**self.log_fields)
        try:
            self._advance()
        finally:
            unbind(token)

    def _advance(self) -> None:
        decision, snap = self._pending, self.snapshot
        assert decision is not None, "decide() must be called before advance()"
        self._pending = None
        t1 = time.perf_counter()
        nxt = self._sim.step(decision.accel_mps2, decision.steering_rad)  # type: ignore[union-attr]
        self.metrics.sim_s += time.perf_counter() - t1
        self._account(snap, nxt, decision)
        self._snap = nxt
        self.t_s = round(self.t_s + self.config.sim.dt_s, 9)
        if nxt.crashed or self._sim.done:  # type: ignore[union-attr]
            self.new_episode()

    # -- bookkeeping --------------------------------------------------------------------------------
    def _track_fault(self, decision: Decision) -> None:
        f = self.fault
        if f is None or self.t_s < f.at_s - 1e-9:
            return
        log = self.fault_log
        if log["injected_at_s"] is None:
            log["injected_at_s"] = self.t_s
        if log["detected_at_s"] is None and decision.watchdog is not None:
            log["detected_at_s"] = self.t_s
        if log["brake_at_s"] is None and decision.source == "fallback" and log["detected_at_s"] is not None:
            log["brake_at_s"] = self.t_s

    def _record(self, snap: WorldSnapshot, obs: Observation, reply: ModelReply | None, d: Decision,
                latency_ms: float, track: object) -> None:
        if self._recorder is None:
            return
        action = conf = None
        valid = d.watchdog is None and reply is not None and reply.received_at_s is not None
        if reply is not None and reply.received_at_s is not None:
            try:
                action = [float(x) for x in np.asarray(reply.action, dtype=np.float64).reshape(-1)[:2]]
                conf = float(np.asarray(reply.confidence, dtype=np.float64).reshape(-1)[0])
                if not (len(action) == 2 and all(math.isfinite(x) for x in action) and math.isfinite(conf)):
                    action, conf = None, None
            except (TypeError, ValueError, IndexError):
                action, conf = None, None
        sensor_ttc = d.parts.get("ttc_s")
        expert = list(self._sim.expert_action()) if self.log_expert else None  # type: ignore[union-attr]
        self._recorder.record(
            TickRecord(
                t_s=snap.t_s,
                tick=self.metrics.ticks,
                kinematics=obs.kinematics,
                lidar=obs.lidar,
                grid=obs.grid,
                model_action=action,
                model_confidence=conf,
                model_latency_ms=float(latency_ms),
                model_valid=bool(valid),
                applied_accel_mps2=d.accel_mps2,
                applied_steering_rad=d.steering_rad,
                source=d.source,
                fcw=d.fcw,
                aeb=d.aeb,
                watchdog=d.watchdog,
                activation=d.activation,
                reason=d.reason,
                ttc_s=None if sensor_ttc is None or not math.isfinite(sensor_ttc) else float(sensor_ttc),
                state=snap.to_dict(),
                expert_action=expert,
            )
        )

    def _account(self, before: WorldSnapshot, after: WorldSnapshot, d: Decision) -> None:
        m, dt, kind = self.metrics, self.config.sim.dt_s, self.spec.kind
        m.ticks += 1
        m.driven_s += dt
        m.driven_s_by_kind[kind] = m.driven_s_by_kind.get(kind, 0.0) + dt
        m.distance_m += max(0.0, after.ego.x_m - before.ego.x_m)
        m.set_distance_m += before.set_speed_mps * dt
        if d.activation:
            m.interventions += 1
            m.interventions_by_kind[kind] = m.interventions_by_kind.get(kind, 0) + 1
        if d.source == "fallback":
            m.fallback_ticks += 1
        if d.fcw:
            m.fcw += 1
        if d.aeb:
            m.aeb_ticks += 1
        m.aeb_activations += d.aeb and not self._aeb_before
        m.aeb_activations_at_speed += d.aeb and not self._aeb_before and before.speed_mps >= AEB_AT_SPEED_MPS
        self._aeb_before = d.aeb
        m.peak_decel_mps2 = max(m.peak_decel_mps2, -after.accel_mps2)
        if d.watchdog:
            m.watchdog[d.watchdog] = m.watchdog.get(d.watchdog, 0) + 1
        if after.crashed and not before.crashed:
            m.collisions += 1
            m.collisions_by_kind[kind] = m.collisions_by_kind.get(kind, 0) + 1
            log_event(logger, logging.WARNING, "collision", "%s: collision in %s seed=%d at t=%.1f s", self.vehicle_id,
                      self.spec.name, self.seed, after.t_s)
        m.min_gap_m = min(m.min_gap_m, gap_m(after))
        m.abs_jerk_sum += abs(after.accel_mps2 - self._last_accel) / dt
        self._last_accel = after.accel_mps2


def sense_fleet(agents: Sequence[VehicleAgent]) -> dict[str, np.ndarray]:
    """Read every agent's sensors for this tick in one batch; returns the model inputs, row i = agent i.

    One :func:`~driveloop.sim.sensors.observe_suites` call covers every vehicle whose sensors are
    live (vectorised geometry; each vehicle's own noise stream), so the batch the model needs comes
    out of the sensors already stacked. A vehicle under a stale-sensor fault keeps its last frame.
    The time is shared equally among the agents' ``sense_s``.
    """
    t0 = time.perf_counter()
    live = [a for a in agents if not a._sensors_frozen()]
    if live:
        batch = observe_suites([a.sensors for a in live], [a.snapshot for a in live])
        for agent, frame in zip(live, batch.frames):
            agent._take_frame(frame)
    if live and len(live) == len(agents):
        arrays = batch.arrays
    else:
        arrays = stack([a._obs for a in agents])  # type: ignore[misc]
    share = (time.perf_counter() - t0) / max(len(agents), 1)
    for agent in agents:
        agent.metrics.sense_s += share
    return arrays
