"""Prometheus metrics of the fleet server, on its own registry (never the global one, so several
servers can live in one process, e.g. in tests).

Per-cohort health is exported as the *extensive* sums the gates use (hours, ticks, interventions,
… for the current stage), so a gate reading them back by PromQL (:mod:`driveloop.ota.promql`) sees
exactly the numbers the server's own gate sees. They are collected at scrape time from a snapshot
callback, so they survive restarts (the store is the source of truth), and derived rates are exported
beside them for dashboards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from driveloop.ota.gates import CohortStats, HealthWindow, ShadowAggregate

PREFIX = "driveloop_ota"
COHORT_FIELDS = tuple(f.name for f in fields(CohortStats))
SHADOW_FIELDS = tuple(f.name for f in fields(ShadowAggregate))
STATUSES = ("running", "paused", "aborted", "completed")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class FleetSnapshot:
    """What the server knows right now, for one scrape."""

    rollout_id: int | None = None
    version: str = ""
    stage: str = ""
    stage_index: int = 0
    status: str = ""
    cohort_sizes: dict[str, int] = field(default_factory=dict)
    window: HealthWindow | None = None
    fleet_versions: dict[str, int] = field(default_factory=dict)
    update_outcomes: dict[str, int] = field(default_factory=dict)


class _FleetCollector(Collector):
    def __init__(self, snapshot: Callable[[], FleetSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        fleet = GaugeMetricFamily(f"{PREFIX}_fleet_vehicles", "Vehicles by the model version they last reported.",
                                  labels=["version"])
        for v, n in sorted(s.fleet_versions.items()):
            fleet.add_metric([v], n)
        yield fleet
        updates = CounterMetricFamily(f"{PREFIX}_updates", "Update outcomes seen in health reports.",
                                      labels=["outcome"])
        for outcome in ("success", "failure", "revert"):
            updates.add_metric([outcome], s.update_outcomes.get(outcome, 0))
        yield updates
        if s.rollout_id is None:
            return
        rid = str(s.rollout_id)
        stage = GaugeMetricFamily(f"{PREFIX}_rollout_stage", "Index of the rollout's current stage.",
                                  labels=["rollout", "version", "stage"])
        stage.add_metric([rid, s.version, s.stage], s.stage_index)
        yield stage
        status = GaugeMetricFamily(f"{PREFIX}_rollout_status", "1 for the rollout's current status.",
                                   labels=["rollout", "status"])
        for st in STATUSES:
            status.add_metric([rid, st], 1.0 if st == s.status else 0.0)
        yield status
        sizes = GaugeMetricFamily(f"{PREFIX}_cohort_size", "Enrolled vehicles per cohort (director's view).",
                                  labels=["rollout", "cohort"])
        for cohort, n in sorted(s.cohort_sizes.items()):
            sizes.add_metric([rid, cohort], n)
        yield sizes
        if s.window is None:
            return
        labels = ["rollout", "stage", "cohort"]
        for name in COHORT_FIELDS:
            g = GaugeMetricFamily(f"{PREFIX}_health_{name}", f"Current stage, per cohort: sum of {name}.",
                                  labels=labels)
            for cohort, cs in (("canary", s.window.canary), ("control", s.window.control)):
                g.add_metric([rid, s.stage, cohort], float(getattr(cs, name)))
            yield g
        for name, getter in (("interventions_per_h", lambda c: c.interventions_per_h),
                             ("p99_ms", lambda c: c.p99_ms), ("crashes_per_h", lambda c: c.crashes_per_h)):
            g = GaugeMetricFamily(f"{PREFIX}_cohort_{name}", f"Current stage, per cohort: {name}.", labels=labels)
            for cohort, cs in (("canary", s.window.canary), ("control", s.window.control)):
                g.add_metric([rid, s.stage, cohort], getter(cs))
            yield g
        for name in SHADOW_FIELDS:
            g = GaugeMetricFamily(f"{PREFIX}_shadow_{name}", f"Current stage: shadow {name}.",
                                  labels=["rollout", "stage"])
            g.add_metric([rid, s.stage], float(getattr(s.window.shadow, name)))
            yield g


class FleetMetrics:
    """The server's registry: request latency, decisions, and the fleet collector."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(f"{PREFIX}_request_seconds", "Fleet server request latency.",
                                         ["method", "route", "status"], buckets=LATENCY_BUCKETS_S,
                                         registry=self.registry)
        self.decisions = Counter(f"{PREFIX}_decisions", "Controller decisions and operator actions.",
                                 ["action"], registry=self.registry)
        self.registry.register(_FleetCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
