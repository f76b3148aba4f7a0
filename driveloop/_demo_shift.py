"""The demo's shift: the fleet's world gains an environment the bootstrap model never saw; the loop notices
it from the fleet's own events, opens a targeted campaign, learns, gates and rolls out — timed end to end.

:class:`ShiftTracker` turns every drive window of the demo into per-class events (``cloud.shift.ClassEvent``:
seconds driven, interventions, collisions per scenario class), keeps the windows for the report's timeline,
runs the shift detector after each window of the shifted world, and opens the campaign through the local
cloud's ingest service (the same path as ``driveloop cloud campaigns create``/``approve``). Times are wall
clock seconds since the shift (the first drive in the shifted world).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from driveloop.cloud.shift import (
    ApprovalPolicy,
    Baseline,
    ClassEvent,
    ShiftPolicy,
    class_rates,
    detect_shifts,
    open_campaign,
)

logger = logging.getLogger(__name__)

# The familiar classes are drawn as one line in the timeline (each alone is a few episodes per window).
FAMILIAR = "familiar mix"


def report_events(report: Any, t0_s: float) -> list[ClassEvent]:
    """A fleet report's per-class exposure, interventions and collisions as events at fleet time ``t0_s``."""
    sums: dict[tuple[str, str], float] = {}
    for v in report.vehicles:
        for kind, attr in (("exposure", "driven_s_by_kind"), ("intervention", "interventions_by_kind"),
                           ("collision", "collisions_by_kind")):
            for cls, n in getattr(v, attr).items():
                sums[(cls, kind)] = sums.get((cls, kind), 0.0) + float(n)
    return [ClassEvent(t0_s, cls, kind, value) for (cls, kind), value in sorted(sums.items())]


def class_rows(events: list[ClassEvent]) -> dict[str, dict[str, float]]:
    """Per class: hours, interventions, collisions and interventions per hour (a report row each)."""
    return {cls: {"hours": round(r.exposure_h, 5), "interventions": int(r.interventions),
                  "collisions": int(r.collisions), "per_hour": round(r.per_hour, 2)}
            for cls, r in class_rates(events).items()}


@dataclass
class ShiftTracker:
    """What the demo knows about its world and the shift (see the module docstring)."""

    environment: str | None
    service: Callable[[], Any]  # the local cloud's IngestService, opened when a campaign is due
    approval: ApprovalPolicy
    policy: ShiftPolicy = field(default_factory=ShiftPolicy)
    say: Callable[[str], None] = lambda m: None
    clock: Callable[[], float] = time.monotonic
    windows: list[dict[str, Any]] = field(default_factory=list)
    events: list[ClassEvent] = field(default_factory=list)
    reference_from_s: float = 0.0  # fleet time the baseline starts at (the last rollout's start)
    shift_fleet_s: float | None = None
    shift_wall: float | None = None
    baseline: Baseline | None = None
    campaign: dict[str, Any] | None = None
    alert: dict[str, Any] | None = None
    stamps: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds since the shift

    def __post_init__(self) -> None:
        self._t0 = self.clock()  # the timeline's zero: the demo's start

    @property
    def shifted(self) -> bool:
        return self.shift_fleet_s is not None

    def world(self, shifted: bool) -> str:
        """The fleet's scenario distribution: the familiar mix, or the mix with the new environment."""
        return f"mix+{self.environment}" if shifted and self.environment else "mix"

    def start_shift(self, fleet_t_s: float) -> None:
        """The world changes now: the baseline is what the fleet drove since ``reference_from_s``."""
        self.shift_fleet_s, self.shift_wall = fleet_t_s, self.clock()
        self.baseline = Baseline.from_rates(class_rates(self.events, self.reference_from_s, fleet_t_s))
        self.say(f"the world changes: {self.environment} joins the fleet's mix "
                 f"(baseline {self.baseline.fleet_per_hour:.1f} interventions/h)")

    def since_shift(self) -> float | None:
        return None if self.shift_wall is None else round(self.clock() - self.shift_wall, 1)

    def mark(self, stage: str) -> None:
        """Stamp a stage of the adaptation (first time only), in wall seconds since the shift."""
        at = self.since_shift()
        if at is not None and stage not in self.stamps:
            self.stamps[stage] = at

    def observe(self, report: Any, t0_s: float, duration_s: float, label: str) -> None:
        """One drive window ended: keep its events and its row of the timeline; in the shifted world,
        look for a class that rose (at most one campaign per shift)."""
        events = report_events(report, t0_s)
        self.events.extend(events)
        world = "shifted" if self.shifted and t0_s >= (self.shift_fleet_s or 0.0) else "familiar"
        self.windows.append({"label": label, "fleet_t_s": t0_s, "duration_s": duration_s, "world": world,
                             "wall_end_s": round(self.clock() - self._t0, 1), "classes": class_rows(events)})
        if self.shifted and self.campaign is None and self.baseline is not None:
            rates = class_rates(self.events, self.shift_fleet_s or 0.0)
            # The demo chases the environment its world gained; another class rising is left to its own iteration.
            alerts = [a for a in detect_shifts(rates, self.baseline, self.policy) if a.scenario_class == self.environment]
            if alerts:
                self._open(alerts[0])

    def _open(self, alert: Any) -> None:
        service = self.service()
        try:
            self.campaign = open_campaign(service, alert, self.policy, self.approval)
        finally:
            service.catalog.close()
        self.alert = alert.as_dict()
        self.mark("detected")
        state = "approved" if self.campaign["approved"] else "waiting for approval"
        self.say(f"shift detected in {alert.scenario_class}: {alert.per_hour:.0f} interventions/h over "
                 f"{alert.exposure_h * 60:.1f} min > {alert.threshold_per_hour:.0f}/h; campaign "
                 f"{self.campaign['id']} {state} ({self.campaign['approval_reason']})")

    _STATE = ("windows", "reference_from_s", "shift_fleet_s", "campaign", "alert", "stamps")

    def to_state(self) -> dict[str, Any]:
        """What a resumed demo needs (the demo's state file): the timeline, the shift and its campaign, and the
        events (per window and class) the detector and baseline are computed from."""
        return {**{k: getattr(self, k) for k in self._STATE},
                "events": [[e.t_s, e.scenario_class, e.kind, e.value] for e in self.events],
                "baseline": None if self.baseline is None else self.baseline.as_dict()}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Resume from :meth:`to_state` (wall-clock stamps of an interrupted run are kept as they were)."""
        if not state:
            return
        for k in self._STATE:
            setattr(self, k, state[k])
        self.events = [ClassEvent(float(t), str(c), str(k), float(v)) for t, c, k, v in state["events"]]
        if state["baseline"] is not None:
            self.baseline = Baseline.from_dict(state["baseline"])
        if self.shift_fleet_s is not None:
            self.shift_wall = self.clock() - max(self.stamps.values(), default=0.0)

    def summary(self, before: dict[str, Any], after: dict[str, Any], gate: dict[str, Any] | None,
                final_collisions: int) -> dict[str, Any]:
        """The ``shift`` block of the demo's JSON (the issue's interface), with the numbers behind it."""
        env = self.environment or ""
        gate_classes = (gate or {}).get("classes", {})
        old = {c: v for c, v in gate_classes.items() if c != env}
        old_ok = bool(old) and all(v.get("passed") for v in old.values()) and final_collisions == 0
        b, a = before.get(env, {}), after.get(env, {})
        return {
            "environment": env,
            "detected_after_s": self.stamps.get("detected"),
            "campaign_id": (self.campaign or {}).get("id"),
            "campaign_approved": (self.campaign or {}).get("approved"),
            "validated_after_s": self.stamps.get("validated"),
            "adapted_after_s": self.stamps.get("adapted"),
            "before_per_hour": b.get("per_hour"),
            "after_per_hour": a.get("per_hour"),
            "old_classes_ok": old_ok,
            "alert": self.alert,
            "baseline_per_hour": None if self.baseline is None else round(self.baseline.fleet_per_hour, 2),
            "shift_at_s": None if self.shift_wall is None else round(self.shift_wall - self._t0, 1),
            "classes_before": before,
            "classes_after": after,
        }


def local_ingest(settings: Any) -> Any:
    """The local cloud's ingest service (catalog + store under the data directory): the campaign path."""
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.ingest_service import IngestConfig, IngestService
    from driveloop.cloud.store import ObjectStore

    return IngestService(ObjectStore(settings.resolved_store_url()), Catalog(settings.resolved_catalog_url()),
                         IngestConfig(staging_dir=settings.cloud_dir / "uploads"))


def _gate_of_shipped(row: dict[str, Any]) -> dict[str, Any] | None:
    """The gate verdict of the candidate an iteration shipped (pipeline's or federated), if any."""
    for side in (row.get("pipeline") or {}, row.get("federated") or {}):
        if row.get("candidate") is not None and side.get("candidate") == row["candidate"]:
            return side.get("gate")
    return None


def shift_report(tracker: ShiftTracker, iterations: list[dict[str, Any]], final: dict[str, Any],
                 shift_after: int) -> dict[str, Any]:
    """The ``shift`` block: before = the first shifted iteration's drive, after = the next drive in the same
    world on what the fleet runs then (the next iteration's, or the final drive)."""
    rows = [it for it in iterations if it.get("kind") == "loop"]
    first = next((it for it in rows if it["index"] == shift_after + 1), None)
    if first is None:
        return tracker.summary({}, {}, None, int(final.get("collisions", 0)))
    nxt = next((it for it in rows if it["index"] == first["index"] + 1), None)
    after = nxt["classes"] if nxt is not None else final.get("classes", {})
    collisions = int(nxt["collisions"] if nxt is not None else final.get("collisions", 0))
    out = tracker.summary(first["classes"], after, _gate_of_shipped(first), collisions + int(first["collisions"]))
    out["shift_after"] = shift_after
    out["candidate"] = first.get("candidate")
    out["rollout_outcome"] = first.get("rollout_outcome")
    return out
