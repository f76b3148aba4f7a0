"""The fleet runner: N vehicles stepped together, one batched inference call per model per tick.

Dynamic batching: every tick the runner stacks the observations of all vehicles that run the same
model into one batch and makes one call; each vehicle's slice of the reply then goes through that
vehicle's own supervisor. Vehicles may run different models (an OTA canary cohort beside the rest),
and any model may also run in *shadow* beside a group: its outputs are compared, never actuated.

Timing: ``tick_ms`` is the fleet's per-tick cost of sensors + inference + supervisors (what must fit
the 100 ms control period); the simulator's own step is measured apart (``sim_ms``). Each vehicle is
charged its own group's call (``VehicleMetrics.inference_ms``) and gets its own rows of a shadow
comparison (``VehicleMetrics.shadow``): what a vehicle reports is what it measured.

A model call that raises anything (ONNX Runtime's untyped ``Fail``, a shape error, MemoryError…) is
"no model output" for that group's vehicles: the fallback brakes, ``model_errors`` counts it, one warning
per run of failures is logged, the loop goes on. KeyboardInterrupt and SystemExit are not caught.

Data plane (optional, :class:`DataPlane`): each tick, before deciding, the fleet asks it for each vehicle's
road-hazard advisory (from the hazards received so far) and passes it to the supervisor; after every vehicle
has decided, it hands it the tick to publish (telemetry, safety events). A data plane must never block or
raise: a broker that is down never stops a vehicle from driving (``edge.dataplane``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from driveloop.edge.agent import (
    AgentConfig,
    FaultSpec,
    RecorderFactory,
    ShadowStats,
    VehicleAgent,
    VehicleMetrics,
    sense_fleet,
)
from driveloop.core.exceptions import ConfigError
from driveloop.safety import Advisory, ModelReply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """One inference call's outcome for a whole batch: arrays, or None when no reply came in time."""

    actions: np.ndarray | None
    confidences: np.ndarray | None
    latency_s: float
    alive: bool
    error: str | None = None  # the model path raised ("Type: message"): no output, counted per vehicle
    delay_s: float | None = None  # when the reply reaches the loop, on its clock (None: after latency_s)


class _FailureLog:
    """Logs a failing model path once per run of failures: at 10 Hz a broken model must not flood the log."""

    def __init__(self, what: str) -> None:
        self.what, self.failures = what, 0

    def failed(self, e: Exception) -> str:
        self.failures += 1
        if self.failures == 1:
            logger.warning("%s: model call failed (%s); no model output until it answers again", self.what,
                           type(e).__name__, exc_info=e)
        else:
            logger.debug("%s: model call failed again: %s", self.what, e)
        return f"{type(e).__name__}: {e}"

    def answered(self) -> None:
        if self.failures:
            logger.info("%s: model answers again after %d failed calls", self.what, self.failures)
            self.failures = 0


class DataPlane(Protocol):
    """The fleet's live link to the cloud: advisories in, telemetry and events out (``edge.dataplane``)."""

    def advisories(self, agents: Sequence[VehicleAgent]) -> Sequence[Advisory | None]: ...

    def publish(self, agents: Sequence[VehicleAgent]) -> None: ...


class InferenceClient(Protocol):
    """How the fleet reaches a model: in-process ONNX Runtime or an isolated model process."""

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> BatchResult: ...

    def inject(self, kind: str, count: int | None = 1) -> None: ...


class InProcessInference:
    """A ModelRunner called in the loop's thread; a reply slower than the deadline counts as missed.

    ``clock`` times the call (tests pass one that does not depend on the host's speed). With
    ``simulated_deadline`` the reply is judged on the simulation's time, in which the model answers at
    once: a simulated fleet sharing one host (the demo's fleet, the gate's held-out suite) must not turn
    the host's stalls into a model's missed deadlines and so drive differently from run to run. The
    latency is still measured and reported (the rollout's p99 health gate judges it)."""

    def __init__(self, runner: object, clock: Callable[[], float] = time.perf_counter,
                 simulated_deadline: bool = False) -> None:
        self.runner = runner
        self._clock = clock
        self._simulated_deadline = simulated_deadline
        self._failures = _FailureLog(f"in-process model {getattr(runner, 'provider', type(runner).__name__)}")

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> BatchResult:
        t0 = self._clock()
        try:
            actions, conf = self.runner.run(batch)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - anything from the model path is "no output"; interrupts propagate
            return BatchResult(None, None, self._clock() - t0, alive=False, error=self._failures.failed(e))
        self._failures.answered()
        latency = self._clock() - t0
        if self._simulated_deadline:  # measured for the health report; on simulated time it arrives at once
            return BatchResult(actions, conf, latency, alive=True, delay_s=0.0)
        if latency > deadline_s:
            return BatchResult(None, None, latency, alive=True)
        return BatchResult(actions, conf, latency, alive=True)

    def inject(self, kind: str, count: int | None = 1) -> None:
        inject = getattr(self.runner, "inject", None)
        if inject is None:
            raise ConfigError("fault injection needs a FaultyRunner or an isolated model process")
        inject(kind, count)


class IsolatedInference:
    """An :class:`~driveloop.edge.isolated.IsolatedRuntime`: submit, then wait at most until the deadline.

    Times are on the runtime's own clock (``now()``), the one its deadlines, hang timeout and backoff use.
    """

    def __init__(self, runtime: object) -> None:
        self.runtime = runtime
        self._failures = _FailureLog("model process")

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> BatchResult:
        rt = self.runtime
        t0 = rt.now()  # type: ignore[attr-defined]
        try:
            if not rt.submit(batch, t0):  # type: ignore[attr-defined]
                return BatchResult(None, None, 0.0, alive=bool(rt.alive))  # type: ignore[attr-defined]
            reply = rt.poll(t0 + deadline_s)  # type: ignore[attr-defined]
            if reply is None:
                return BatchResult(None, None, rt.now() - t0, alive=bool(rt.alive))  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - the model process answered with an error, or the call failed
            return BatchResult(None, None, rt.now() - t0, alive=False,  # type: ignore[attr-defined]
                               error=self._failures.failed(e))
        self._failures.answered()
        return BatchResult(reply.action, reply.confidence, reply.latency_s, alive=True)

    def inject(self, kind: str, count: int | None = 1) -> None:
        self.runtime.inject(kind, count)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class VehiclePlan:
    """Which vehicle drives what, with which model (a key of the fleet's inference clients)."""

    vehicle_id: str
    scenario: str
    seed: int
    model: str = "default"


@dataclass
class FleetReport:
    """Fleet outcome: per-vehicle metrics, sums, and the loop's tick timing."""

    vehicles: list[VehicleMetrics]
    tick_ms: list[float] = field(repr=False)
    sim_ms: list[float] = field(repr=False)
    segments: list[Path]
    faults: dict[str, dict[str, float | None]]
    shadow: dict[str, ShadowStats]
    deadline_misses: int = 0
    inference_ms: list[float] = field(default_factory=list, repr=False)

    def _sum(self, name: str) -> float:
        return float(sum(getattr(v, name) for v in self.vehicles))

    @staticmethod
    def _pct(values: Sequence[float], q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else 0.0

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per scenario kind: episodes, interventions, collisions (for per-class gates)."""
        out: dict[str, dict[str, float]] = {}
        for v in self.vehicles:
            for attr, key in (("episodes_by_kind", "episodes"), ("interventions_by_kind", "interventions"),
                              ("collisions_by_kind", "collisions")):
                for kind, n in getattr(v, attr).items():
                    out.setdefault(kind, {"episodes": 0, "interventions": 0, "collisions": 0})[key] += n
        return out

    def summary(self) -> dict[str, object]:
        driven_h = self._sum("driven_s") / 3600.0
        interventions = int(self._sum("interventions"))
        set_m = self._sum("set_distance_m")
        ticks = int(self._sum("ticks"))
        return {
            "vehicles": len(self.vehicles),
            "ticks": ticks,
            "driven_s": round(self._sum("driven_s"), 3),
            "distance_km": round(self._sum("distance_m") / 1000.0, 4),
            "collisions": int(self._sum("collisions")),
            "interventions": interventions,
            "interventions_per_hour": round(interventions / driven_h, 3) if driven_h > 0 else 0.0,
            "fallback_ticks": int(self._sum("fallback_ticks")),
            "model_errors": int(self._sum("model_errors")),
            "deadline_misses": self.deadline_misses,
            "progress": round(self._sum("distance_m") / set_m, 4) if set_m > 0 else 0.0,
            "mean_abs_jerk_mps3": round(self._sum("abs_jerk_sum") / ticks, 4) if ticks else 0.0,
            "min_gap_m": round(min((v.min_gap_m for v in self.vehicles), default=math.inf), 3),
            "aeb_activations": int(self._sum("aeb_activations")),
            "aeb_activations_at_speed": int(self._sum("aeb_activations_at_speed")),
            "peak_decel_mps2": round(max((v.peak_decel_mps2 for v in self.vehicles), default=0.0), 3),
            "tick_ms_p50": round(self._pct(self.tick_ms, 50), 4),
            "tick_ms_p99": round(self._pct(self.tick_ms, 99), 4),
            "inference_ms_p99": round(self._pct(self.inference_ms, 99), 4),
            "sim_ms_p50": round(self._pct(self.sim_ms, 50), 4),
            "segments": len(self.segments),
            "by_kind": self.by_kind(),
        }


def _replies(result: BatchResult, n: int, now_s: float) -> list[ModelReply]:
    if result.actions is None:
        return [ModelReply(None, None, None, alive=result.alive)] * n
    actions, conf = np.asarray(result.actions), np.asarray(result.confidences)
    at = now_s + (result.latency_s if result.delay_s is None else result.delay_s)
    if actions.ndim == 0 or actions.shape[0] != n or conf.ndim == 0 or conf.shape[0] != n:
        return [ModelReply(actions, conf, at, alive=True)] * n  # wrong batch shape: the watchdog rejects it
    return [ModelReply(actions[i], conf[i], at, alive=True) for i in range(n)]


def _compare(group: ShadowStats, rows: Sequence[ShadowStats], main: BatchResult, shadow: BatchResult) -> None:
    """Compare row by row: row i's outcome goes to ``rows[i]`` (its vehicle) and to the group's total.

    A row compares when the actuating model gave a finite [accel, steer] for it (else there is nothing
    to compare against); an invalid or non-finite shadow row is a disagreement.
    """
    if main.actions is None or shadow.actions is None:
        return
    n = len(rows)
    a, b = np.asarray(main.actions, dtype=np.float64), np.asarray(shadow.actions, dtype=np.float64)
    if a.shape != (n, 2):
        return
    compared = np.isfinite(a).all(axis=1)
    if b.shape == (n, 2):
        valid = np.isfinite(b).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):  # rows with inf/NaN are masked out just below
            diff = np.where((compared & valid)[:, None], np.abs(a - b), 0.0)
        disagree = compared & (~valid | (diff[:, 0] > 1.0) | (diff[:, 1] > 0.05))
    else:
        diff, disagree = np.zeros((n, 2)), compared
    for i in np.flatnonzero(compared):
        rows[i].compared_ticks += 1
        rows[i].disagreements += int(disagree[i])
        rows[i].abs_diff_sum += float(diff[i, 0])
    group.compared_ticks += int(compared.sum())
    group.disagreements += int(disagree.sum())
    group.abs_diff_sum += float(diff[:, 0].sum())


def run_fleet(
    plans: Sequence[VehiclePlan],
    clients: Mapping[str, InferenceClient],
    duration_s: float,
    config: AgentConfig | None = None,
    recorder_factory: RecorderFactory | None = None,
    fault: FaultSpec | None = None,
    shadows: Mapping[str, InferenceClient] | None = None,
    on_tick: Callable[[int, int, Sequence[VehicleAgent]], None] | None = None,
    data_plane: DataPlane | None = None,
) -> FleetReport:
    """Drive every planned vehicle for ``duration_s`` of simulated time; returns the fleet's report.

    ``shadows`` maps a model key to a client run beside it on the same batch (compared, not actuated).
    ``on_tick(tick, total, agents)`` is called after each tick (progress bars, video frames).
    ``data_plane``: advisories from road hazards in, telemetry and events out (see the module docstring).
    """
    config = config or AgentConfig()
    if not plans:
        raise ConfigError("a fleet needs at least one vehicle")
    if duration_s <= 0 or not math.isfinite(duration_s):
        raise ConfigError(f"duration must be > 0 s, got {duration_s}")
    missing = {p.model for p in plans} - set(clients)
    if config.model_enabled and missing:
        raise ConfigError(f"no inference client for model(s) {sorted(missing)}")
    agents = [VehicleAgent(p.vehicle_id, p.scenario, p.seed, config, recorder_factory, fault) for p in plans]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault(p.model, []).append(i)
    shadows = shadows or {}
    shadow_stats = {k: ShadowStats() for k in shadows}
    for key in shadows.keys() & groups.keys():  # each vehicle beside a shadow keeps its own comparison
        for i in groups[key]:
            agents[i].metrics.shadow = ShadowStats()
    dt = config.sim.dt_s
    total = int(round(duration_s / dt))
    tick_ms: list[float] = []
    sim_ms: list[float] = []
    inference_ms: list[float] = []
    misses = 0
    try:
        for tick in range(total):
            now = tick * dt
            if fault is not None and fault.behaviour.side == "model" and abs(now - fault.at_s) < dt / 2:
                count = 1 if fault.behaviour.kills else max(1, int(round(fault.duration_s / dt)))
                for client in clients.values():
                    client.inject(fault.kind, count)
                logger.warning("fault %s injected at t=%.1f s", fault.kind, now)
            sense_before = [a.metrics.sense_s + a.metrics.supervise_s for a in agents]
            sim_before = sum(a.metrics.sim_s for a in agents)
            sensed = sense_fleet(agents)  # one vectorised sensor pass: the fleet's batch comes out stacked
            advised = data_plane.advisories(agents) if data_plane is not None else None
            infer_s = 0.0
            for key, idx in groups.items():
                latency_ms = 0.0
                if not config.model_enabled:
                    replies = [ModelReply(None, None, None, alive=False)] * len(idx)
                else:
                    batch = sensed if len(idx) == len(agents) else {k: v[idx] for k, v in sensed.items()}
                    result = clients[key].infer(batch, config.deadline_s)
                    infer_s += result.latency_s
                    latency_ms = result.latency_s * 1e3  # this group's call: what each of its vehicles waited
                    inference_ms.append(latency_ms)
                    if result.actions is None:
                        misses += 1
                    if key in shadows:
                        _compare(shadow_stats[key], [agents[i].metrics.shadow for i in idx],  # type: ignore[misc]
                                 result, shadows[key].infer(batch, config.deadline_s))
                    replies = _replies(result, len(idx), now)
                    for i in idx:
                        agents[i].metrics.inference_ms.append(latency_ms)
                        agents[i].metrics.model_errors += result.error is not None
                for i, reply in zip(idx, replies):
                    agents[i].decide(reply, latency_ms=latency_ms, advisory=advised[i] if advised else None)
            if data_plane is not None:
                data_plane.publish(agents)
            for agent in agents:  # every vehicle decided first: the safety code runs back to back, caches warm
                agent.advance()
            loop_s = sum(a.metrics.sense_s + a.metrics.supervise_s for a in agents) - sum(sense_before)
            tick_ms.append((loop_s + infer_s) * 1e3)
            sim_ms.append((sum(a.metrics.sim_s for a in agents) - sim_before) * 1e3)
            if on_tick is not None:
                on_tick(tick, total, agents)
    finally:
        for a in agents:
            a.close()
    segments: list[Path] = []
    if recorder_factory is not None:
        for a in agents:
            segments.extend(a.closed_segments)
    return FleetReport(
        vehicles=[a.metrics for a in agents],
        tick_ms=tick_ms,
        sim_ms=sim_ms,
        segments=segments,
        faults={a.vehicle_id: dict(a.fault_log) for a in agents} if fault else {},
        shadow=shadow_stats,
        deadline_misses=misses,
        inference_ms=inference_ms,
    )
