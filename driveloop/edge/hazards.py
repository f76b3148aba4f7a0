"""The vehicle's hazard filter: which pushed hazards to believe, which cells to watch, and the advisory they make.

Everything a vehicle receives on ``haz.<road>.<cell>`` is untrusted. :meth:`HazardFilter.offer` keeps a hazard
only when it is well formed and addressed to the cell it came on (one of ``contracts.stream.hazard_cells``),
signed by a key the vehicle trusts, still valid, newer than what the vehicle already holds for that action (a
repetition, a copy read again from the stream after a move to the next cell, or a replay is not), and not
terminated — a termination removes the action for good. Each verdict is counted.

:meth:`HazardFilter.cells` is the cell to watch: the one the vehicle is in. The cloud publishes each hazard on its
relevance area's cells and the ``WATCH_HORIZON_M`` before them (``contracts.stream.hazard_cells``), so that one
subscription brings every hazard whose area meets the vehicle's road ahead (:meth:`HazardFilter.road_ahead`),
one copy each. :meth:`HazardFilter.advisory` turns the live hazards whose event still lies ahead (the vehicle
inside their relevance area) into one :class:`~driveloop.safety.Advisory`: the speed advisory whose envelope is
the tightest where the vehicle is now, reached ``margin_m`` before the event, and the longest time gap of any.

Pure logic: wall time comes in as an argument, I/O is the caller's (``edge.fleet``'s data plane).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from driveloop.contracts.hazard import Direction, Hazard, HazardVerifier, decode_hazard
from driveloop.contracts.stream import (
    HAZARD_MAX_VALIDITY_S,
    WATCH_HORIZON_M,
    cell_of,
    cells_ahead,
)
from driveloop.core.exceptions import StreamError
from driveloop.safety import Advisory, AdvisoryConfig
from driveloop.safety.advisory import allowed_speed_mps

logger = logging.getLogger(__name__)

HORIZON_M = WATCH_HORIZON_M  # a vehicle hears of a hazard this far ahead (the protocol's, set by the cloud)
MARGIN_M = 150.0  # be at the advised speed this far before the event (a queue's tail grows upstream)
MAX_CLOCK_SKEW_S = 30.0  # a hazard issued further in the future than this is refused
VERDICTS = ("accepted", "terminated", "malformed", "unsigned", "bad_signature", "expired", "future", "replayed",
            "cancelled_action", "other_direction")


@dataclass
class _Action:
    reference_time: float
    hazard: Hazard | None  # None once terminated


@dataclass
class HazardFilter:
    """One vehicle's hazard state (see the module docstring); ``counts`` holds every verdict."""

    verifier: HazardVerifier
    direction: Direction | None = "increasing"  # None: every direction (the fleet dashboard's whole-road view)
    margin_m: float = MARGIN_M
    advisory_config: AdvisoryConfig = field(default_factory=AdvisoryConfig)
    counts: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    _actions: dict[tuple[str, int], _Action] = field(default_factory=dict)
    _watch_since: dict[str, float] = field(default_factory=dict)  # subject -> wall time its watch began

    @staticmethod
    def cells(x_m: float) -> list[int]:
        """The cells to subscribe to at ``x_m``: the one holding it (a hazard ahead is published there too)."""
        return [cell_of(x_m)]

    def road_ahead(self, x_m: float) -> list[int]:
        """The cells whose hazards a vehicle at ``x_m`` hears of: its own through ``HORIZON_M`` ahead, in driving
        order (what :meth:`cells`' one subscription brings, by ``hazard_cells``)."""
        if self.direction == "decreasing":
            return cells_ahead(x_m - HORIZON_M, HORIZON_M)[::-1]
        return cells_ahead(x_m, HORIZON_M)

    def watching(self, subjects: set[str], now_wall_s: float) -> None:
        """Record which hazard subjects are watched from when (latency counts only for hazards issued after)."""
        self._watch_since = {s: self._watch_since.get(s, now_wall_s) for s in subjects}

    def offer(self, subject: str, payload: bytes, received_wall_s: float) -> str:
        """Judge one received message; returns (and counts) its verdict, one of ``VERDICTS``."""
        verdict = self._judge(subject, payload, received_wall_s)
        self.counts[verdict] += 1
        if verdict not in ("accepted", "terminated", "replayed"):
            logger.info("hazard on %s dropped: %s", subject, verdict)
        return verdict

    def _judge(self, subject: str, payload: bytes, now: float) -> str:
        try:
            hazard = decode_hazard(payload, subject)  # also: addressed to the cell it came on
        except StreamError:
            return "malformed"
        if not hazard.signature or not hazard.key_id:
            return "unsigned"
        if not self.verifier.verify(hazard):
            return "bad_signature"
        if hazard.reference_time > now + MAX_CLOCK_SKEW_S:
            return "future"
        key = (hazard.action_id.station_id, hazard.action_id.sequence_number)
        known = self._actions.get(key)
        if known is not None and known.hazard is None:
            return "cancelled_action"
        if known is not None and hazard.reference_time <= known.reference_time:
            return "replayed"
        if hazard.termination is not None:
            self._actions[key] = _Action(hazard.reference_time, None)
            return "terminated"
        if now >= hazard.expires_at():
            return "expired"
        if self.direction is not None and hazard.direction != self.direction:
            return "other_direction"
        if known is None:
            since = self._watch_since.get(subject)
            if since is not None and since <= hazard.detection_time:
                self.latencies_ms.append(max(now - hazard.detection_time, 0.0) * 1e3)
        self._actions[key] = _Action(hazard.reference_time, hazard)
        return "accepted"

    def active(self, now_wall_s: float) -> list[Hazard]:
        """The live hazards held (terminated and expired ones are dropped)."""
        for key, action in list(self._actions.items()):
            if action.hazard is not None and not action.hazard.live(now_wall_s):
                self._actions[key] = _Action(action.reference_time, None)
        return [a.hazard for a in self._actions.values() if a.hazard is not None]

    def prune(self, now_wall_s: float) -> int:
        """Forget terminated and expired actions no copy of which can still be live (every version of an action
        expires by its last reference time + ``HAZARD_MAX_VALIDITY_S``), so a long-running holder stays bounded;
        returns how many were forgotten."""
        self.active(now_wall_s)
        horizon = now_wall_s - HAZARD_MAX_VALIDITY_S - MAX_CLOCK_SKEW_S
        old = [k for k, a in self._actions.items() if a.hazard is None and a.reference_time < horizon]
        for key in old:
            del self._actions[key]
        return len(old)

    def advisory(self, x_m: float, now_wall_s: float) -> Advisory | None:
        """The advisory for a vehicle at ``x_m`` from the live hazards ahead of it, or None when none is."""
        best: tuple[float, float, float] | None = None  # (allowed speed now, distance, advised speed)
        gap: float | None = None
        for hazard in self.active(now_wall_s):
            ahead = hazard.upstream_distance_m(x_m)
            if ahead is None:
                continue
            distance = max(ahead - self.margin_m, 0.0)
            if hazard.advisory.speed_mps is not None:
                allowed = allowed_speed_mps(hazard.advisory.speed_mps, distance, self.advisory_config)
                if best is None or allowed < best[0]:
                    best = (allowed, distance, hazard.advisory.speed_mps)
            if hazard.advisory.time_gap_s is not None:
                gap = max(gap or 0.0, hazard.advisory.time_gap_s)
        if best is None and gap is None:
            return None
        if best is None:
            return Advisory(distance_m=0.0, time_gap_s=gap)
        return Advisory(distance_m=best[1], speed_mps=best[2], time_gap_s=gap)


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank) of ``values``; None without any."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
