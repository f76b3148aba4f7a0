"""The hazard service's logic: vehicle events in, DENM-shaped hazards out (pure: wall time is an argument).

Rules (:class:`HazardBook`):
- Events become hazards by a table (``RULES``, by event kind): full or partial AEB braking for a slow or
  stopped lead, and stopped/slow traffic, are a *dangerous end of queue* (DENM cause 27) at the lead's position
  (the vehicle's x plus the gap it reported); AEB braking for a moving lead is a *collision risk* (97); sensor
  degradation is *adverse weather – visibility* (18), with an advisory speed that stops within the visibility;
  a watchdog or fault event of a vehicle standing in its lane (the fallback stopped it) is a *stationary
  vehicle* (94). Other events make no hazard.
- One place, one action: an event of the same cause within ``merge_m`` of a live action on the same road and
  direction updates that action (its position moves upstream to the event's when the queue grows; otherwise
  only its validity is refreshed, at most every ``refresh_s``) instead of making a new one.
- Each action is published on every cell of its relevance area (``upstream_m`` before the event in the
  traffic direction, ``downstream_m`` after) and the ``WATCH_CELLS`` before it, where vehicles that will reach
  the area within the watch horizon are (``contracts.stream.hazard_cells``: each vehicle subscribes to its own
  cell and gets one copy), again every ``repetition_s`` (for vehicles that just arrived),
  until it ends: when its validity runs out, or — for a queue, a standing vehicle or a collision risk
  (``CLEARED_BY_TRAFFIC``) — when a vehicle passes the spot at ``clear_speed_mps`` or more (the cloud then
  publishes a *cancellation* once).
- Rate limit per cell (each cell a version is published on): a token bucket of ``cell_burst`` messages refilled
  at ``cell_rate_per_s``, so a vehicle in any cell gets at most that many; new, updated
  and cancelled versions go before repetitions, and what does not fit waits for the next round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from driveloop.contracts.hazard import (
    CAUSES,
    ActionId,
    Direction,
    Hazard,
    HazardAdvisory,
    relevance_area,
)
from driveloop.contracts.stream import Telemetry, VehicleEvent, hazard_cells
from driveloop.core.exceptions import ConfigError

KMH = 1 / 3.6
STATION_ID = "driveloop-cloud"  # the DENM originating station: the hazard service itself
SLOW_LEAD_MPS = 3.0  # a lead at most this fast is a queue, not a moving car
STANDING_MPS = 1.0  # a vehicle at most this fast stands in its lane
VISIBILITY_REACTION_S = 1.0  # reaction time assumed when sizing the speed that stops within the visibility
# Hazards a vehicle passing at speed shows are over (a queue, a standing car); weather is not cleared that way.
CLEARED_BY_TRAFFIC = frozenset({CAUSES["dangerousEndOfQueue"], CAUSES["stationaryVehicle"], CAUSES["collisionRisk"]})


@dataclass(frozen=True)
class HazardPolicy:
    """The service's knobs (SI units); validated."""

    upstream_m: float = 2000.0
    downstream_m: float = 100.0
    merge_m: float = 300.0
    refresh_s: float = 60.0
    repetition_s: float = 10.0  # late joiners read the HAZARDS stream; repetition covers a lost live copy
    validity_s: float = 600.0
    clear_speed_mps: float = 15.0
    pass_m: float = 100.0  # a vehicle this far past the event at speed shows the road is clear
    cell_burst: int = 20
    cell_rate_per_s: float = 10.0
    comfort_decel_mps2: float = 3.0

    def __post_init__(self) -> None:
        for name in ("upstream_m", "downstream_m", "merge_m", "refresh_s", "repetition_s", "validity_s",
                     "clear_speed_mps", "pass_m", "cell_rate_per_s", "comfort_decel_mps2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"hazard policy {name}={value!r} must be finite and > 0")
        if not (isinstance(self.cell_burst, int) and self.cell_burst >= 1):
            raise ConfigError(f"hazard policy cell_burst={self.cell_burst!r} must be an int >= 1")


@dataclass(frozen=True)
class Finding:
    """What one event says: a hazard of ``cause`` at ``x_m`` with this advisory."""

    cause: int
    sub_cause: int
    x_m: float
    advisory: HazardAdvisory


def _num(detail: dict[str, object], key: str) -> float | None:
    value = detail.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


END_OF_QUEUE_ADVICE = HazardAdvisory(speed_mps=50 * KMH, time_gap_s=3.0)
COLLISION_RISK_ADVICE = HazardAdvisory(speed_mps=80 * KMH, time_gap_s=3.0)
STATIONARY_ADVICE = HazardAdvisory(speed_mps=60 * KMH, time_gap_s=3.0)


def _braking(ev: VehicleEvent, policy: HazardPolicy) -> Finding:
    gap = _num(ev.detail, "gap_m") or 0.0
    lead = _num(ev.detail, "lead_speed_mps")
    x = ev.x_m + max(gap, 0.0)
    if lead is not None and lead > SLOW_LEAD_MPS:
        return Finding(CAUSES["collisionRisk"], 0, x, COLLISION_RISK_ADVICE)
    return Finding(CAUSES["dangerousEndOfQueue"], 1, x, END_OF_QUEUE_ADVICE)  # 1: sudden end of queue


def _slow_traffic(ev: VehicleEvent, policy: HazardPolicy) -> Finding:
    gap = _num(ev.detail, "gap_m") or 0.0
    return Finding(CAUSES["dangerousEndOfQueue"], 0, ev.x_m + max(gap, 0.0), END_OF_QUEUE_ADVICE)


def visibility_speed_mps(visibility_m: float, decel_mps2: float) -> float:
    """The speed from which a vehicle stops within ``visibility_m`` at ``decel_mps2`` after the reaction time."""
    a, t = decel_mps2, VISIBILITY_REACTION_S
    return max(-a * t + math.sqrt((a * t) ** 2 + 2.0 * a * max(visibility_m, 0.0)), 0.0)


def _visibility(ev: VehicleEvent, policy: HazardPolicy) -> Finding | None:
    visibility = _num(ev.detail, "visibility_m")
    if visibility is None or visibility <= 0:
        return None
    speed = min(visibility_speed_mps(visibility, policy.comfort_decel_mps2), 70.0)
    return Finding(CAUSES["adverseWeatherCondition-Visibility"], 1, ev.x_m,  # 1: fog
                   HazardAdvisory(speed_mps=speed, time_gap_s=3.0))


def _stationary(ev: VehicleEvent, policy: HazardPolicy) -> Finding | None:
    if abs(ev.speed_mps) > STANDING_MPS:
        return None
    return Finding(CAUSES["stationaryVehicle"], 2, ev.x_m, STATIONARY_ADVICE)  # 2: vehicle breakdown


# Event kind -> how it becomes a hazard (a table: a new rule is one row; kinds missing here make none).
RULES: dict[str, Callable[[VehicleEvent, HazardPolicy], Finding | None]] = {
    "aeb_full": _braking, "aeb": _braking, "slow_traffic": _slow_traffic, "sensor_degraded": _visibility,
    "watchdog": _stationary, "fault": _stationary,
}


def finding(ev: VehicleEvent, policy: HazardPolicy) -> Finding | None:
    rule = RULES.get(ev.kind)
    return rule(ev, policy) if rule is not None else None


@dataclass
class _Entry:
    hazard: Hazard  # unsigned; the I/O layer signs what it publishes
    dirty: bool = True  # a new version not yet published
    last_sent_s: float = -math.inf


@dataclass
class HazardBook:
    """The live actions and what to publish next (see the module docstring)."""

    policy: HazardPolicy = field(default_factory=HazardPolicy)
    station_id: str = STATION_ID
    next_sequence: int = 0
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _tokens: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)  # cell -> (tokens, at)

    def on_event(self, ev: VehicleEvent, now_s: float, direction: Direction = "increasing") -> int | None:
        """Take one vehicle event; returns the sequence number of the action it created or updated, or None."""
        found = finding(ev, self.policy)
        if found is None or now_s - ev.wall_ts >= self.policy.validity_s:  # an old event's hazard has expired
            return None
        for seq, entry in self._entries.items():
            h = entry.hazard
            if (h.termination is None and h.road == ev.road and h.direction == direction and h.cause == found.cause
                    and abs(h.x_m - found.x_m) <= self.policy.merge_m):
                upstream = found.x_m < h.x_m if direction == "increasing" else found.x_m > h.x_m
                if upstream or now_s - h.reference_time >= self.policy.refresh_s:
                    x = found.x_m if upstream else h.x_m
                    entry.hazard = self._build(h.action_id, h.detection_time, now_s, found, ev, x, direction)
                    entry.dirty = True
                return seq
        seq = self.next_sequence
        self.next_sequence += 1
        action = ActionId(station_id=self.station_id, sequence_number=seq)
        detected = min(ev.wall_ts, now_s)
        self._entries[seq] = _Entry(self._build(action, detected, now_s, found, ev, found.x_m, direction))
        return seq

    def _build(self, action: ActionId, detected_s: float, now_s: float, found: Finding, ev: VehicleEvent,
               x_m: float, direction: Direction) -> Hazard:
        area = relevance_area(ev.road, x_m, direction, self.policy.upstream_m, self.policy.downstream_m)
        return Hazard(action_id=action, detection_time=detected_s, reference_time=max(now_s, detected_s),
                      validity_s=self.policy.validity_s, repetition_interval_s=self.policy.repetition_s,
                      cause=found.cause, sub_cause=found.sub_cause, road=ev.road, x_m=x_m, lane=ev.lane,
                      direction=direction, relevance=area, advisory=found.advisory)

    def on_telemetry(self, tel: Telemetry, now_s: float) -> list[int]:
        """A vehicle passing a live action's spot at speed cancels it; returns the cancelled sequence numbers."""
        cancelled = []
        for seq, entry in self._entries.items():
            h = entry.hazard
            if h.termination is not None or h.road != tel.road or tel.wall_ts <= h.reference_time \
                    or h.cause not in CLEARED_BY_TRAFFIC:
                continue
            past = tel.x_m - h.x_m if h.direction == "increasing" else h.x_m - tel.x_m
            if 0.0 <= past <= self.policy.pass_m and tel.speed_mps >= self.policy.clear_speed_mps:
                entry.hazard = h.model_copy(update={"termination": "cancellation",
                                                    "reference_time": max(now_s, h.reference_time)})
                entry.dirty = True
                cancelled.append(seq)
        return cancelled

    def active(self, now_s: float) -> list[Hazard]:
        """Live (not terminated, not expired) hazards, oldest action first."""
        return [e.hazard for _, e in sorted(self._entries.items()) if e.hazard.live(now_s)]

    def _take_tokens(self, road: str, cells: tuple[int, ...], now_s: float) -> bool:
        p = self.policy
        levels = {}
        for cell in cells:
            tokens, at = self._tokens.get((road, cell), (float(p.cell_burst), now_s))
            tokens = min(float(p.cell_burst), tokens + (now_s - at) * p.cell_rate_per_s)
            if tokens < 1.0:
                return False
            levels[cell] = tokens
        for cell, tokens in levels.items():
            self._tokens[(road, cell)] = (tokens - 1.0, now_s)
        return True

    def due(self, now_s: float) -> list[Hazard]:
        """The versions to publish now (each on its ``hazard_cells``): new/updated/cancelled first, then
        repetitions; what the per-cell rate limit does not allow waits. Ended actions are forgotten once their
        last version went out (or at once when they expired)."""
        out: list[Hazard] = []
        order = sorted(self._entries.items(), key=lambda kv: (not kv[1].dirty, kv[0]))
        for seq, entry in order:
            h = entry.hazard
            expired = h.termination is None and now_s >= h.expires_at()
            if expired:
                del self._entries[seq]
                continue
            repeat = h.termination is None and now_s - entry.last_sent_s >= self.policy.repetition_s
            if not (entry.dirty or repeat):
                continue
            if not self._take_tokens(h.road, hazard_cells(h.relevance.cells, h.direction), now_s):
                continue
            out.append(h)
            entry.dirty, entry.last_sent_s = False, now_s
            if h.termination is not None:
                del self._entries[seq]
        return out
