"""The fleet's data plane (``edge.fleet.DataPlane``): each vehicle's telemetry and safety events out through its
:class:`~driveloop.edge.stream_client.VehicleStream`, the hazards it receives in through its
:class:`~driveloop.edge.hazards.HazardFilter`, as advisories for its supervisor.

Rules it keeps:
- Telemetry every tick (10 Hz); events at their onset: AEB braking (``aeb``, ``aeb_full`` when the full stage
  brakes; an escalation from partial to full is a new event), a watchdog fault, the vehicle standing behind a
  standing lead (``slow_traffic``), and once per episode a sensor degradation (fog: ``sensor_degraded``). An
  event carries what the hazard service needs: the gap and the lead's speed as the vehicle's sensors saw them.
- The cloud's shift detector counts what a fleet report counts, per scenario class (the ``scenario`` field):
  an ``intervention`` event for each fallback activation (``Decision.activation``, on the tick it happens) and
  a ``collision`` event for each crash the agent's own accounting counted (``collisions_by_kind``, published on
  the tick after); telemetry every tick is the exposure.
- Only scenarios laid out on the fleet's shared road (``sim.scenarios.SHARED_ROAD_KINDS``) are on road
  ``SHARED_ROAD``; any other vehicle drives a world of its own, published under a road of its own, so its
  coordinates never touch another's hazards, and it watches no cells.
- A hazard received before a tick's decision becomes an advisory at that decision (the next tick after it
  arrived); a vehicle subscribes to the cell it is in (``HazardFilter.cells``: the cloud publishes each hazard
  on the cells up to ``HazardFilter.road_ahead``'s horizon before its area) and re-subscribes when it moves on.
- Every ``PRUNE_EVERY_S`` a vehicle's filter forgets the actions that can no longer be live
  (``HazardFilter.prune``), so a long drive's filter stays bounded.
- Nothing here may stop a vehicle: any failure of the stream client is counted and logged once, and the
  vehicle drives on (its client spools while the broker is away).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from driveloop.contracts.hazard import HazardVerifier
from driveloop.contracts.stream import EventKind, Telemetry, VehicleEvent, hazard_subject
from driveloop.edge.agent import VehicleAgent
from driveloop.edge.hazards import HazardFilter, p99
from driveloop.safety import Advisory
from driveloop.sim.perception import forward_track
from driveloop.sim.scenarios import SHARED_ROAD_KINDS

logger = logging.getLogger(__name__)

SHARED_ROAD = "hw1"
STANDING_MPS = 1.0  # the ego and its lead at most this fast: standing in a queue
QUEUE_GAP_M = 40.0
PRUNE_EVERY_S = 60.0  # wall seconds between prunes of a vehicle's hazard filter


class StreamLike(Protocol):
    """What the data plane needs of a vehicle's stream client (``VehicleStream``; a fake in tests)."""

    def publish(self, message: Telemetry | VehicleEvent) -> None: ...

    def next_seq(self) -> int: ...

    def watch_cells(self, road: str, cells: Sequence[int]) -> None: ...

    def received(self) -> list[tuple[str, bytes, float]]: ...


def road_of(vehicle_id: str, scenario_kind: str) -> str:
    """The road a vehicle's coordinates are on: the fleet's shared road, or one of its own."""
    if scenario_kind in SHARED_ROAD_KINDS:
        return SHARED_ROAD
    return "own-" + hashlib.blake2b(vehicle_id.encode(), digest_size=8).hexdigest()


@dataclass
class _Vehicle:
    stream: StreamLike
    filter: HazardFilter | None
    watched: tuple[str, tuple[int, ...]] | None = None
    aeb_level: int = 0  # 0 none, 1 partial, 2 full (at the last tick)
    watchdog: str | None = None
    standing: bool = False
    degraded_episode: int = -1
    pruned_at: float | None = None  # wall time of the filter's last prune
    collisions: dict[str, int] | None = None  # the agent's collisions_by_kind when last published


class StreamDataPlane:
    """Telemetry and events out, advisories in, for every vehicle of a fleet (see the module docstring)."""

    def __init__(self, streams: Mapping[str, StreamLike], verifier: HazardVerifier | None,
                 model_version: str | None = None, clock: Callable[[], float] = time.time,
                 full_decel_mps2: float = 9.0) -> None:
        self._vehicles = {vid: _Vehicle(s, HazardFilter(verifier) if verifier is not None else None)
                          for vid, s in streams.items()}
        self.model_version, self._clock, self._full_decel = model_version, clock, full_decel_mps2
        self.errors: Counter[str] = Counter()

    def _failed(self, vehicle_id: str, what: str, e: Exception) -> None:
        self.errors[what] += 1
        if self.errors[what] == 1:
            logger.warning("data plane: %s failed for %s (%s: %s); driving on", what, vehicle_id, type(e).__name__, e)

    # -- in: hazards -> advisories ------------------------------------------------------------------------------
    def advisories(self, agents: Sequence[VehicleAgent]) -> list[Advisory | None]:
        now = self._clock()
        return [self._advisory(agent, now) for agent in agents]

    def _advisory(self, agent: VehicleAgent, now: float) -> Advisory | None:
        v = self._vehicles[agent.vehicle_id]
        if v.filter is None:
            return None
        try:
            for subject, payload, received_at in v.stream.received():
                v.filter.offer(subject, payload, received_at)
        except Exception as e:  # noqa: BLE001 - a broken client must not stop the vehicle
            self._failed(agent.vehicle_id, "receive", e)
        if v.pruned_at is None or now - v.pruned_at >= PRUNE_EVERY_S:
            v.filter.prune(now)
            v.pruned_at = now
        if agent.spec.kind not in SHARED_ROAD_KINDS:
            return None
        x = agent.snapshot.ego.x_m
        cells = tuple(v.filter.cells(x))
        if v.watched != (SHARED_ROAD, cells):
            try:
                v.stream.watch_cells(SHARED_ROAD, cells)
                v.watched = (SHARED_ROAD, cells)
                v.filter.watching({hazard_subject(SHARED_ROAD, c) for c in cells}, now)
            except Exception as e:  # noqa: BLE001
                self._failed(agent.vehicle_id, "watch", e)
        return v.filter.advisory(x, now)

    # -- out: telemetry and events --------------------------------------------------------------------------
    def publish(self, agents: Sequence[VehicleAgent]) -> None:
        now = self._clock()
        for agent in agents:
            try:
                self._publish(agent, now)
            except Exception as e:  # noqa: BLE001 - a broken client must not stop the vehicle
                self._failed(agent.vehicle_id, "publish", e)

    def _base(self, agent: VehicleAgent, v: _Vehicle, now: float) -> dict[str, Any]:
        snap = agent.snapshot
        return {"vehicle_id": agent.vehicle_id, "seq": v.stream.next_seq(), "t_s": agent.t_s, "wall_ts": now,
                "road": road_of(agent.vehicle_id, agent.spec.kind), "x_m": snap.ego.x_m, "y_m": snap.ego.y_m,
                "lane": snap.ego.lane_index, "speed_mps": snap.speed_mps, "model_version": self.model_version,
                "scenario": agent.spec.kind}

    def _event(self, agent: VehicleAgent, v: _Vehicle, now: float, kind: EventKind, decel: float = 0.0,
               scenario: str | None = None, **detail: float | str) -> None:
        base = self._base(agent, v, now)
        if scenario is not None:  # the class the counted thing happened in (a crash is published a tick later)
            base["scenario"] = scenario
        v.stream.publish(VehicleEvent(**base, kind=kind, decel_mps2=max(decel, 0.0),
                                      detail={k: x for k, x in detail.items()
                                              if not isinstance(x, float) or math.isfinite(x)}))

    def _publish(self, agent: VehicleAgent, now: float) -> None:
        v = self._vehicles[agent.vehicle_id]
        d, snap = agent.last_decision, agent.snapshot
        if d is None:
            return
        v.stream.publish(Telemetry(**self._base(agent, v, now), accel_mps2=snap.accel_mps2, mode=d.source))
        if d.activation:
            self._event(agent, v, now, "intervention", cause=(d.reason or "")[:128])
        crashes = agent.metrics.collisions_by_kind
        for kind, n in sorted(crashes.items()):
            for _ in range(n - (v.collisions or {}).get(kind, 0)):
                self._event(agent, v, now, "collision", scenario=kind)
        v.collisions = dict(crashes)
        track = forward_track(agent.observation) if agent.observation is not None else None
        seen = {"gap_m": float(track.gap_m), "lead_speed_mps": float(track.lead_speed_mps)} if track else {}
        aeb_decel = float(d.parts.get("aeb_decel_mps2", 0.0))
        level = 0 if not d.aeb else 2 if aeb_decel >= self._full_decel else 1
        if level > v.aeb_level:
            self._event(agent, v, now, "aeb_full" if level == 2 else "aeb", aeb_decel,
                        ttc_s=float(d.parts.get("ttc_s", math.inf)), **seen)
        v.aeb_level = level
        if d.watchdog is not None and d.watchdog != v.watchdog:
            self._event(agent, v, now, "watchdog", fault=d.watchdog)
        v.watchdog = d.watchdog
        standing = (snap.speed_mps <= STANDING_MPS and track is not None and track.gap_m <= QUEUE_GAP_M
                    and track.lead_speed_mps <= STANDING_MPS)
        if standing and not v.standing:
            self._event(agent, v, now, "slow_traffic", **seen)
        v.standing = standing
        episode = agent.metrics.episodes
        if math.isfinite(agent.spec.visibility_m) and v.degraded_episode != episode:
            self._event(agent, v, now, "sensor_degraded", visibility_m=float(agent.spec.visibility_m))
            v.degraded_episode = episode

    # -- report ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``hazards_received`` (accepted versions), ``hazard_latency_ms_p99`` (event detected → first received,
        by vehicles that were watching), the filters' drop counts and the client failures."""
        filters = [v.filter for v in self._vehicles.values() if v.filter is not None]
        verdicts: Counter[str] = Counter()
        latencies: list[float] = []
        for f in filters:
            verdicts.update(f.counts)
            latencies.extend(f.latencies_ms)
        worst = p99(latencies)
        dropped = {k: n for k, n in verdicts.items() if k not in ("accepted", "terminated")}
        return {"hazards_received": verdicts["accepted"], "hazard_latency_ms_p99": None if worst is None else round(worst, 3),
                "hazard_latency_samples": len(latencies), "hazards_terminated": verdicts["terminated"],
                "hazards_dropped": dropped, "stream_errors": dict(self.errors)}
