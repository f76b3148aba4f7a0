"""The fleet dashboard's live view: the latest telemetry of each vehicle and the hazards active on the road.

Pure state, fed by :mod:`driveloop.ota.live_feed` (which does the NATS I/O) with raw ``(subject, payload)``
pairs and the server's wall time. Everything arriving is untrusted, so every message gets a verdict and every
verdict is counted:

- Telemetry (``tel.<vehicle>``) is checked by :func:`~driveloop.contracts.stream.decode_telemetry` (body and
  subject must agree); a vehicle keeps only its newest message (by ``seq``: a redelivery or replay is "old").
  At most ``max_vehicles`` are held; a vehicle not heard from for ``stale_after_s`` is dropped (by the
  server's clock, not the vehicle's); when the view is full of live vehicles a new one is refused
  ("over_capacity") rather than evicting one the operator is watching.
- Hazards (``haz.<road>.<cell>``) are judged by the vehicles' own
  :class:`~driveloop.edge.hazards.HazardFilter` (one definition of "believe this hazard": well formed,
  addressed to its cell, signed by the cloud's key, unexpired, not replayed, not terminated), watching every
  direction. Without a configured hazard key nothing can be verified: every hazard is dropped as
  "unverifiable". At most ``max_hazards`` are shown (the soonest to expire are left out first).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from driveloop.contracts.hazard import CAUSES, Hazard, HazardVerifier
from driveloop.contracts.stream import Telemetry, decode_telemetry
from driveloop.core.exceptions import ConfigError, StreamError
from driveloop.edge.hazards import HazardFilter

logger = logging.getLogger(__name__)

__all__ = ["TELEMETRY_VERDICTS", "LivePolicy", "LiveView"]

TELEMETRY_VERDICTS = ("accepted", "malformed", "old", "over_capacity")
_CAUSE_NAMES = {code: name for name, code in CAUSES.items()}


@dataclass(frozen=True)
class LivePolicy:
    """Bounds of the live view (the view lives in the fleet server's memory for as long as it runs)."""

    max_vehicles: int = 2000
    stale_after_s: float = 10.0  # telemetry is 10 Hz: 10 s of silence means gone (or out of coverage)
    max_hazards: int = 500

    def __post_init__(self) -> None:
        if self.max_vehicles < 1 or self.max_hazards < 1:
            raise ConfigError("the live view must hold at least one vehicle and one hazard")
        if not self.stale_after_s > 0:
            raise ConfigError(f"stale_after_s must be > 0, got {self.stale_after_s}")


@dataclass
class _Seen:
    telemetry: Telemetry
    seen_s: float  # the server's wall time when it arrived


@dataclass
class LiveView:
    """Vehicles and hazards as last heard (see the module docstring). Not thread-safe: the feed locks it."""

    policy: LivePolicy = field(default_factory=LivePolicy)
    hazard_keys: tuple[bytes, ...] = ()
    telemetry_counts: Counter[str] = field(default_factory=Counter)
    hazard_counts: Counter[str] = field(default_factory=Counter)
    stale_dropped: int = 0
    _vehicles: dict[str, _Seen] = field(default_factory=dict)
    _filter: HazardFilter | None = None

    def __post_init__(self) -> None:
        if self.hazard_keys:
            self._filter = HazardFilter(HazardVerifier(list(self.hazard_keys)), direction=None)

    @property
    def verifies_hazards(self) -> bool:
        return self._filter is not None

    def on_telemetry(self, subject: str, payload: bytes, now_s: float) -> str:
        """Take one telemetry message; returns (and counts) its verdict, one of ``TELEMETRY_VERDICTS``."""
        verdict = self._take_telemetry(subject, payload, now_s)
        self.telemetry_counts[verdict] += 1
        if verdict in ("malformed", "over_capacity"):
            logger.info("live view: telemetry on %.100s dropped: %s", subject, verdict)
        return verdict

    def _take_telemetry(self, subject: str, payload: bytes, now_s: float) -> str:
        try:
            tel = decode_telemetry(payload, subject)
        except StreamError:
            return "malformed"
        known = self._vehicles.get(tel.vehicle_id)
        if known is not None and tel.seq <= known.telemetry.seq:
            return "old"
        if known is None and len(self._vehicles) >= self.policy.max_vehicles:
            self._drop_stale(now_s)
            if len(self._vehicles) >= self.policy.max_vehicles:
                return "over_capacity"
        self._vehicles[tel.vehicle_id] = _Seen(tel, now_s)
        return "accepted"

    def on_hazard(self, subject: str, payload: bytes, now_s: float) -> str:
        """Take one hazard message; returns (and counts) its verdict: the vehicles' filter's, or
        ``"unverifiable"`` when no hazard key is configured."""
        if self._filter is None:
            self.hazard_counts["unverifiable"] += 1
            return "unverifiable"
        verdict = self._filter.offer(subject, payload, now_s)
        self.hazard_counts[verdict] += 1
        return verdict

    def _drop_stale(self, now_s: float) -> None:
        stale = [vid for vid, s in self._vehicles.items() if now_s - s.seen_s > self.policy.stale_after_s]
        for vid in stale:
            del self._vehicles[vid]
        self.stale_dropped += len(stale)

    def hazards(self, now_s: float) -> list[Hazard]:
        """The live, verified hazards, at most ``max_hazards`` (the longest-valid kept), by road and position."""
        if self._filter is None:
            return []
        self._filter.prune(now_s)
        live = sorted(self._filter.active(now_s), key=lambda h: -h.expires_at())[: self.policy.max_hazards]
        return sorted(live, key=lambda h: (h.road, h.x_m, h.action_id.station_id, h.action_id.sequence_number))

    def snapshot(self, now_s: float) -> dict[str, Any]:
        """The view as plain JSON at ``now_s`` (stale vehicles dropped first)."""
        self._drop_stale(now_s)
        vehicles = [_vehicle_row(s, now_s) for _, s in sorted(self._vehicles.items())]
        hazards = [_hazard_row(h, now_s) for h in self.hazards(now_s)]
        return {
            "now_s": now_s, "vehicles": vehicles, "hazards": hazards,
            "roads": sorted({v["road"] for v in vehicles} | {h["road"] for h in hazards}),
            "hazard_verification": self.verifies_hazards,
            "counts": {"telemetry": dict(self.telemetry_counts), "hazards": dict(self.hazard_counts),
                       "stale_dropped": self.stale_dropped},
        }  # fmt: skip


def _vehicle_row(seen: _Seen, now_s: float) -> dict[str, Any]:
    t = seen.telemetry
    return {"vehicle_id": t.vehicle_id, "road": t.road, "x_m": t.x_m, "y_m": t.y_m, "lane": t.lane,
            "speed_mps": t.speed_mps, "accel_mps2": t.accel_mps2, "mode": t.mode, "model_version": t.model_version,
            "scenario": t.scenario, "seq": t.seq, "age_s": round(max(now_s - seen.seen_s, 0.0), 3)}


def _hazard_row(h: Hazard, now_s: float) -> dict[str, Any]:
    return {"action": f"{h.action_id.station_id}/{h.action_id.sequence_number}", "cause": h.cause,
            "cause_name": _CAUSE_NAMES.get(h.cause, f"cause {h.cause}"), "sub_cause": h.sub_cause, "road": h.road,
            "x_m": h.x_m, "lane": h.lane, "direction": h.direction, "from_x_m": h.relevance.from_x_m,
            "to_x_m": h.relevance.to_x_m, "advisory_speed_mps": h.advisory.speed_mps,
            "advisory_time_gap_s": h.advisory.time_gap_s, "expires_at": h.expires_at(),
            "remaining_s": round(max(h.expires_at() - now_s, 0.0), 3)}
