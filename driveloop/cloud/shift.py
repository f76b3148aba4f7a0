"""Noticing a shift in the fleet's world: per scenario class intervention rates from live events, compared
with a baseline; a class that rises gets one targeted collection campaign, approved by the operator's policy.

Input is a stream of :class:`ClassEvent` ``(t_s, scenario_class, kind, value)``: ``exposure`` events carry
seconds driven in a class (telemetry), ``intervention`` and ``collision`` events count one each (the safety
events of the live stream, or a fleet report's per-class counts). Everything here is pure: the clock comes
in as ``now_s``; :func:`open_campaign` is the one adapter, and it calls the existing campaign path
(``IngestService.create_campaign`` / ``approve_campaign``).

Rules it keeps:
- a class is judged only with at least ``min_exposure_h`` of driving and ``min_interventions`` in the window
  (a rate from two minutes of driving is noise);
- it has *risen* when its rate is above ``rise_factor`` x its baseline and above the baseline plus
  ``rise_abs_per_h``; a class absent from the baseline (an environment the fleet never drove) is compared
  with the whole fleet's baseline rate;
- one campaign per shift: a class with an open campaign raises no new alert;
- the campaign is approved only when the operator's :class:`ApprovalPolicy` names its class (or ``*``) and
  its priority is within the policy's cap; otherwise it waits for a person (``driveloop cloud campaigns
  approve``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from driveloop.cloud.campaigns import PRIORITY_RANGE, CampaignSpec
from driveloop.contracts.stream import TELEMETRY_PERIOD_S, Telemetry, VehicleEvent
from driveloop.core.exceptions import ConfigError
from driveloop.sim.scenarios import ENVIRONMENTS, environment_signal

logger = logging.getLogger(__name__)

EVENT_KINDS = ("exposure", "intervention", "collision")
SECONDS_PER_HOUR = 3600.0
ANY_CLASS = "*"


@dataclass(frozen=True)
class ClassEvent:
    """One live observation: ``value`` seconds driven in ``scenario_class`` (``exposure``), or ``value``
    interventions / collisions there, at fleet time ``t_s``."""

    t_s: float
    scenario_class: str
    kind: str
    value: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ConfigError(f"event kind must be one of {EVENT_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.t_s) and math.isfinite(self.value) and self.value >= 0):
            raise ConfigError(f"event time and value must be finite, value >= 0: {self!r}")
        if not isinstance(self.scenario_class, str) or not self.scenario_class:
            raise ConfigError("an event needs a scenario class")


@dataclass(frozen=True)
class ClassRate:
    """One class over a window: hours driven, interventions and collisions, and the rate per hour."""

    scenario_class: str
    exposure_h: float
    interventions: float
    collisions: float

    @property
    def per_hour(self) -> float:
        return self.interventions / self.exposure_h if self.exposure_h > 0 else 0.0


def class_rates(events: Iterable[ClassEvent], since_s: float = -math.inf,
                until_s: float = math.inf) -> dict[str, ClassRate]:
    """Per class, the events with ``since_s <= t_s < until_s`` summed (classes in name order)."""
    sums: dict[str, dict[str, float]] = {}
    for e in events:
        if since_s <= e.t_s < until_s:
            row = sums.setdefault(e.scenario_class, dict.fromkeys(EVENT_KINDS, 0.0))
            row[e.kind] += e.value
    return {c: ClassRate(c, r["exposure"] / SECONDS_PER_HOUR, r["intervention"], r["collision"])
            for c, r in sorted(sums.items())}


@dataclass(frozen=True)
class Baseline:
    """Intervention rates per class in the reference period, and the whole fleet's rate then."""

    per_class_per_hour: Mapping[str, float]
    fleet_per_hour: float

    @classmethod
    def from_rates(cls, rates: Mapping[str, ClassRate]) -> Baseline:
        hours = sum(r.exposure_h for r in rates.values())
        fleet = sum(r.interventions for r in rates.values()) / hours if hours > 0 else 0.0
        return cls({c: r.per_hour for c, r in rates.items() if r.exposure_h > 0}, fleet)

    def for_class(self, scenario_class: str) -> float:
        """The class's own baseline, or the fleet's for a class the reference period never drove."""
        return self.per_class_per_hour.get(scenario_class, self.fleet_per_hour)

    def as_dict(self) -> dict[str, Any]:
        """The stored form (the live detector's baseline file, the demo's state file)."""
        return {"per_class": dict(self.per_class_per_hour), "fleet": self.fleet_per_hour}

    @classmethod
    def from_dict(cls, data: Any) -> Baseline:
        """From :meth:`as_dict`'s form, checked (it is read back from a file); ConfigError when it is not one."""
        try:
            per_class = {str(c): float(v) for c, v in data["per_class"].items()}
            fleet = float(data["fleet"])
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise ConfigError(f"not a shift baseline ({type(e).__name__}: {e})"[:200]) from None
        if not all(math.isfinite(v) and v >= 0 for v in (*per_class.values(), fleet)):
            raise ConfigError("a shift baseline's rates must be finite and >= 0")
        return cls(per_class, fleet)


@dataclass(frozen=True)
class ShiftPolicy:
    """When a class's rate counts as risen (see the module docstring)."""

    min_exposure_h: float = 0.01  # 36 s of driving in the class
    min_interventions: int = 3
    rise_factor: float = 2.0
    rise_abs_per_h: float = 20.0
    campaign_priority: int = 9  # the recorder's most urgent: these segments upload first
    campaign_ttl_s: float = 7 * 24 * 3600.0
    condition: str = "activation or fcw or ttc < 3"  # what to collect inside the class

    def __post_init__(self) -> None:
        if not (self.min_exposure_h > 0 and self.min_interventions >= 1 and self.rise_factor >= 1
                and self.rise_abs_per_h >= 0 and self.campaign_ttl_s > 0):
            raise ConfigError("shift policy: min_exposure_h > 0, min_interventions >= 1, rise_factor >= 1, "
                              "rise_abs_per_h >= 0 and campaign_ttl_s > 0 are required")
        if not PRIORITY_RANGE[0] <= self.campaign_priority <= PRIORITY_RANGE[1]:
            raise ConfigError(f"shift policy: campaign_priority must be in {PRIORITY_RANGE}")


@dataclass(frozen=True)
class ShiftAlert:
    """A class whose rate rose above its baseline: the numbers that decided it."""

    scenario_class: str
    per_hour: float
    baseline_per_hour: float
    threshold_per_hour: float
    exposure_h: float
    interventions: float

    def as_dict(self) -> dict[str, Any]:
        return {"scenario_class": self.scenario_class, "per_hour": round(self.per_hour, 3),
                "baseline_per_hour": round(self.baseline_per_hour, 3),
                "threshold_per_hour": round(self.threshold_per_hour, 3),
                "exposure_h": round(self.exposure_h, 5), "interventions": self.interventions}


def threshold_per_hour(baseline_per_hour: float, policy: ShiftPolicy) -> float:
    """The rate a class must exceed to count as risen."""
    return max(baseline_per_hour * policy.rise_factor, baseline_per_hour + policy.rise_abs_per_h)


def detect_shifts(rates: Mapping[str, ClassRate], baseline: Baseline, policy: ShiftPolicy,
                  open_classes: Iterable[str] = ()) -> list[ShiftAlert]:
    """The classes whose rate in ``rates`` rose above their baseline and have no open campaign yet."""
    skip = set(open_classes)
    alerts = []
    for cls, r in sorted(rates.items()):
        if cls in skip or r.exposure_h < policy.min_exposure_h or r.interventions < policy.min_interventions:
            continue
        base = baseline.for_class(cls)
        limit = threshold_per_hour(base, policy)
        if r.per_hour > limit:
            alerts.append(ShiftAlert(cls, r.per_hour, base, limit, r.exposure_h, r.interventions))
    return alerts


def stream_class_events(messages: Iterable[Telemetry | VehicleEvent]) -> list[ClassEvent]:
    """The live stream as the detector's events, at each message's ``wall_ts``: a telemetry message is
    ``TELEMETRY_PERIOD_S`` of driving in its ``scenario`` (vehicles send one every control tick), an
    ``intervention`` or ``collision`` event one of those there (the vehicle publishes them from the same
    activation flag and crash count its fleet report sums); every other kind counts for nothing here."""
    out = []
    for m in messages:
        if isinstance(m, Telemetry):
            out.append(ClassEvent(m.wall_ts, m.scenario, "exposure", TELEMETRY_PERIOD_S))
        elif isinstance(m, VehicleEvent) and m.kind in ("intervention", "collision"):
            out.append(ClassEvent(m.wall_ts, m.scenario, m.kind))
    return out


@dataclass
class LiveShift:
    """The live detector's memory: a reference period that becomes the baseline, then a sliding window.

    Rules it keeps (times are the messages' Unix seconds; ``now_s`` is the cloud's clock):
    - an event older than ``now_s - window_s`` is stale and dropped (a replay of old data, or a forged time);
      one from a vehicle whose clock runs ahead counts at ``now_s``;
    - without a stored ``baseline``, the first ``reference_s`` of the stream (from its first fresh event) is
      the reference period, and its per-class rates become the baseline once an event past its end arrives
      (:meth:`freeze`) — the demo's rule: the baseline is what the fleet drove before. A straggler of the period
      (another vehicle's consumer shard behind) still goes to the reference, and the baseline is taken again;
    - events after it go into ``bucket_s`` buckets, and the rates are those of the last ``window_s``; memory is
      per class and bucket, not per message.
    """

    window_s: float = 900.0
    reference_s: float = 600.0
    bucket_s: float = 10.0
    baseline: Baseline | None = None
    stale: int = 0
    latest_s: float = -math.inf
    reference_from_s: float | None = None
    _reference: dict[tuple[str, str], float] = field(default_factory=dict)
    _reference_changed: bool = False
    _buckets: dict[int, dict[tuple[str, str], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and self.reference_s > 0 and 0 < self.bucket_s <= self.window_s):
            raise ConfigError("live shift: window_s > 0, reference_s > 0 and 0 < bucket_s <= window_s are required")

    @property
    def reference_until_s(self) -> float | None:
        return None if self.reference_from_s is None else self.reference_from_s + self.reference_s

    def add(self, events: Iterable[ClassEvent], now_s: float) -> None:
        for e in events:
            t = min(e.t_s, now_s)
            if t < now_s - self.window_s:
                self.stale += 1
                continue
            self.latest_s = max(self.latest_s, t)
            if self.baseline is None and self.reference_from_s is None:
                self.reference_from_s = t
            if self.reference_from_s is not None and t < self.reference_from_s + self.reference_s:
                key = (e.scenario_class, e.kind)
                self._reference[key] = self._reference.get(key, 0.0) + e.value
                self._reference_changed = True
                continue
            row = self._buckets.setdefault(math.floor(t / self.bucket_s), {})
            row[(e.scenario_class, e.kind)] = row.get((e.scenario_class, e.kind), 0.0) + e.value
        horizon = math.floor((self.latest_s - self.window_s) / self.bucket_s) if math.isfinite(self.latest_s) else 0
        for b in [b for b in self._buckets if b < horizon]:
            del self._buckets[b]

    def freeze(self) -> Baseline | None:
        """The baseline newly taken (or taken again) from the reference period; None when there is no new one."""
        until = self.reference_until_s
        if not self._reference_changed or until is None or self.latest_s < until:
            return None
        events = [ClassEvent(0.0, cls, kind, v) for (cls, kind), v in sorted(self._reference.items())]
        self.baseline = Baseline.from_rates(class_rates(events))
        self._reference_changed = False
        return self.baseline

    def rates(self) -> dict[str, ClassRate]:
        """Per class over the window ending at the newest event."""
        events = [ClassEvent(b * self.bucket_s, cls, kind, v) for b, row in self._buckets.items()
                  for (cls, kind), v in row.items()]
        return class_rates(events, since_s=math.floor((self.latest_s - self.window_s) / self.bucket_s) * self.bucket_s
                           if math.isfinite(self.latest_s) else -math.inf)

    def alerts(self, policy: ShiftPolicy, open_classes: Iterable[str] = ()) -> list[ShiftAlert]:
        """:func:`detect_shifts` over the window against the baseline (none before there is one)."""
        return [] if self.baseline is None else detect_shifts(self.rates(), self.baseline, policy, open_classes)


def campaign_for(alert: ShiftAlert, policy: ShiftPolicy, now_s: float) -> CampaignSpec:
    """The targeted campaign for a shift: ``policy.condition`` while the vehicle is in the alert's class
    (for an environment, its ``env_<name>`` signal), most urgent priority, expiring ``campaign_ttl_s`` after
    ``now_s`` (Unix seconds, as campaigns keep time)."""
    cls = alert.scenario_class
    where = environment_signal(cls) if cls in ENVIRONMENTS else None
    condition = f"{where} and ({policy.condition})" if where else policy.condition
    return CampaignSpec(name=f"shift-{cls}", condition=condition, trigger_mode="rising_edge", min_interval_s=2.0,
                        pre_window_s=8.0, post_window_s=4.0, priority=policy.campaign_priority,
                        expires_at_s=now_s + policy.campaign_ttl_s)


@dataclass(frozen=True)
class ApprovalPolicy:
    """The operator's rule for campaigns the loop creates by itself: auto-approve those for ``classes``
    (``*``: any) up to ``max_priority``; any other waits for a person."""

    classes: frozenset[str] = frozenset()
    max_priority: int = PRIORITY_RANGE[1]

    @classmethod
    def parse(cls, text: str | None, max_priority: int = PRIORITY_RANGE[1]) -> ApprovalPolicy:
        """From settings text: ``""`` (approve nothing), ``*`` or ``fog,aggressive``; unknown names refused."""
        from driveloop.sim.scenarios import scenario_classes

        names = frozenset(n.strip().lower() for n in (text or "").split(",") if n.strip())
        unknown = names - {ANY_CLASS, *scenario_classes()}
        if unknown:
            raise ConfigError(f"auto-approve: unknown scenario classes {sorted(unknown)}; valid: *, "
                              + ", ".join(scenario_classes()))
        return cls(names, max_priority)

    def decide(self, scenario_class: str, spec: CampaignSpec) -> tuple[bool, str]:
        """(approve?, why) for a campaign the loop created for ``scenario_class``."""
        if ANY_CLASS not in self.classes and scenario_class not in self.classes:
            return False, f"the operator's policy does not auto-approve campaigns for {scenario_class!r}"
        if spec.priority > self.max_priority:
            return False, f"priority {spec.priority} is above the policy's cap {self.max_priority}"
        return True, f"auto-approved: the operator's policy covers {scenario_class!r}"


def open_campaign(service: Any, alert: ShiftAlert, policy: ShiftPolicy, approval: ApprovalPolicy) -> dict[str, Any]:
    """Create the alert's campaign through ``service`` (an ``IngestService``: the existing campaign path, whose
    clock dates and expires it) and approve it when ``approval`` says so. Returns the campaign as vehicles
    would receive it, plus ``approved`` and ``approval_reason``."""
    from driveloop.cloud.campaigns import STATE_APPROVED, to_wire

    now = service.clock()
    spec = campaign_for(alert, policy, now)
    # One campaign per shift, across restarts too: an unexpired one of the same name is the shift's campaign.
    open_ = [c for c in service.catalog.campaigns() if c.spec.name == spec.name
             and (c.spec.expires_at_s is None or c.spec.expires_at_s > now)]
    created = to_wire(open_[0]) if open_ else service.create_campaign(_spec_json(spec), actor="shift-detector")
    ok, why = approval.decide(alert.scenario_class, spec)
    if ok and created["state"] != STATE_APPROVED:
        created = service.approve_campaign(created["id"], actor="auto-approve policy")
    ok = created["state"] == STATE_APPROVED
    logger.info("shift in %s (%.1f/h > %.1f/h): campaign %s, %s", alert.scenario_class, alert.per_hour,
                alert.threshold_per_hour, created["id"], why)
    return {**created, "approved": ok, "approval_reason": why}


def _spec_json(spec: CampaignSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)
