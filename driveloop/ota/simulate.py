"""A simulated fleet driven through the real rollout controller, director and audit log.

Each vehicle asks the director what to run, "drives" one health window and reports synthetic health
drawn from seeded distributions: a good model matches the baseline intervention rate; a bad one has
``bad_interventions_factor`` × more interventions, or crashes. The stage's reports are aggregated by
the real :func:`~driveloop.ota.gates.aggregate` and fed to :func:`~driveloop.ota.controller.decide`;
every decision goes to a hash-chained audit log and the event log is replayed at the end.

It checks what the acceptance asks: a good model reaches 100 %; a bad one is aborted within a few
windows of the canary, never reaches a vehicle outside the canary cohort, and every exposed vehicle
ends on the previous model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.contracts.fleet import HealthReport, ShadowStats
from driveloop.core.exceptions import ConfigError
from driveloop.ota.admission import AdmissionPolicy, VehicleRecord, admit
from driveloop.ota.audit import JsonlAuditLog
from driveloop.ota.cohorts import in_cohort
from driveloop.ota.controller import Action, RolloutEvent, RolloutPlan, Status, decide, replay, start
from driveloop.ota.director import assign
from driveloop.ota.gates import aggregate

logger = logging.getLogger(__name__)

OLD, NEW = "1", "2"  # registry model versions, as health reports carry them
BAD_KINDS = ("interventions", "crash")


@dataclass(frozen=True)
class FleetModel:
    """Seeded distributions of per-window health, per vehicle."""

    window_s: float = 600.0
    control_period_s: float = 0.1
    baseline_interventions_per_h: float = 2.0
    bad_interventions_factor: float = 4.0
    bad_crash_per_window: float = 0.3  # probability a vehicle on a crashing model crashes in a window
    p99_ms_mean: float = 8.0
    p99_ms_sd: float = 0.6
    deadline_miss_rate: float = 0.0005
    shadow_disagreement_rate: float = 0.01
    shadow_mean_abs_diff: float = 0.05

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ConfigError(f"fleet model {name} must be >= 0, got {value}")
        if self.window_s <= 0 or self.control_period_s <= 0:
            raise ConfigError("window_s and control_period_s must be > 0")


@dataclass(frozen=True)
class SimConfig:
    vehicles: int = 1000
    bad_model: bool = False
    bad_kind: str = "interventions"
    seed: int = 0
    max_windows: int = 40
    forgers: int = 0  # extra vehicles that send forged reports (see _forgeries)
    fleet: FleetModel = field(default_factory=FleetModel)
    plan: RolloutPlan = field(default_factory=RolloutPlan.default)

    def __post_init__(self) -> None:
        if self.vehicles < 1:
            raise ConfigError(f"vehicles must be >= 1, got {self.vehicles}")
        if self.bad_kind not in BAD_KINDS:
            raise ConfigError(f"bad_kind must be one of {BAD_KINDS}, got {self.bad_kind!r}")
        if self.forgers < 0:
            raise ConfigError(f"forgers must be >= 0, got {self.forgers}")
        if self.max_windows < 1:
            raise ConfigError("max_windows must be >= 1")


@dataclass(frozen=True)
class SimResult:
    outcome: str  # completed | aborted | stalled
    final_stage: str
    windows: int
    windows_to_abort: int | None  # health windows from entering the canary to the abort decision
    exposed_vehicles: int  # vehicles that ever ran (or shadowed) the new model
    exposed_outside_canary: int
    reverted: int  # exposed vehicles back on the previous model only (no new model, not even in shadow)
    still_on_new: int
    canary_cohort: int
    vehicles: int
    decisions: list[dict[str, Any]]
    audit_ok: bool
    replay_ok: bool
    reports_rejected: int = 0

    def to_dict(self, with_decisions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_decisions:
            d.pop("decisions")
        return d


class _Vehicle:
    __slots__ = ("vid", "version", "shadow", "seq")

    def __init__(self, vid: str) -> None:
        self.vid, self.version, self.shadow, self.seq = vid, OLD, None, 0


def _reports(cfg: SimConfig, rng: np.random.Generator, fleet: list[_Vehicle], t_s: float) -> list[HealthReport]:
    m = cfg.fleet
    n = len(fleet)
    hours = m.window_s / 3600.0
    ticks = int(m.window_s / m.control_period_s)
    on_new = np.array([v.version == NEW for v in fleet])
    bad = on_new & cfg.bad_model
    rate = np.where(bad & (cfg.bad_kind == "interventions"), m.bad_interventions_factor, 1.0) \
        * m.baseline_interventions_per_h * hours
    interventions = rng.poisson(rate)
    crashes = (bad & (cfg.bad_kind == "crash") & (rng.random(n) < m.bad_crash_per_window)).astype(int)
    p99 = np.maximum(0.5, rng.normal(m.p99_ms_mean, m.p99_ms_sd, n))
    misses = rng.poisson(m.deadline_miss_rate * ticks, n)
    dis_rate = m.shadow_disagreement_rate * (1.5 if cfg.bad_model else 1.0)
    disagreements = rng.binomial(ticks, dis_rate, n)
    diffs = np.abs(rng.normal(m.shadow_mean_abs_diff, m.shadow_mean_abs_diff / 4, n))
    out = []
    for i, v in enumerate(fleet):
        v.seq += 1
        shadow = ShadowStats(compared_ticks=ticks, disagreements=int(disagreements[i]),
                             mean_abs_diff=float(diffs[i])) if v.shadow == NEW else None
        out.append(HealthReport(vehicle_id=v.vid, model_version=v.version, window_start_s=t_s - m.window_s,
                                window_end_s=t_s, seq=v.seq, ticks=ticks,
                                fallback_interventions=int(interventions[i]), collisions=0,
                                deadline_misses=int(min(misses[i], ticks)), inference_p99_ms=float(p99[i]),
                                crashes=int(crashes[i]), shadow=shadow))
    return out


_FORGERIES = ("other_version", "huge_window", "future_window", "zero_counts", "extreme_counts")


def _forgeries(fleet: list[_Vehicle], t_s: float, window_s: float) -> list[HealthReport]:
    """One forged report per forger and window, cycling through the issue's forgeries: claiming the
    other cohort's version (with a collision), impossible windows, zero or extreme counts."""
    out = []
    for i, v in enumerate(fleet):
        v.seq += 1
        kind = _FORGERIES[(i + v.seq) % len(_FORGERIES)]
        version = {OLD: NEW, NEW: OLD}[v.version] if kind == "other_version" else v.version
        start_s, end_s = {"huge_window": (0.0, 1e12), "future_window": (t_s, t_s + 10 * window_s)}.get(
            kind, (t_s - window_s, t_s))
        n = {"extreme_counts": 10**6, "zero_counts": 0}.get(kind, 0)
        out.append(HealthReport(vehicle_id=v.vid, model_version=version, window_start_s=start_s, window_end_s=end_s,
                                seq=v.seq, ticks=10**7, fallback_interventions=n, collisions=int(kind == "other_version"),
                                deadline_misses=n, inference_p99_ms=0.0, crashes=0))
    return out


def simulate(cfg: SimConfig, audit_path: Path | None = None,
             on_window: Callable[[int, str, str], None] | None = None) -> SimResult:
    """Run one rollout of NEW over a fleet on OLD. ``on_window(i, stage, action)`` reports progress."""
    rng = np.random.default_rng(cfg.seed)
    plan = cfg.plan
    fleet = [_Vehicle(f"sim-{i:06d}") for i in range(cfg.vehicles)]
    forgers = [_Vehicle(f"forger-{i:04d}") for i in range(cfg.forgers)]
    policy = AdmissionPolicy(report_interval_s=cfg.fleet.window_s)
    records: dict[str, VehicleRecord] = {}
    rejected = 0
    canary_fraction = next(s.fraction for s in plan.stages if not s.shadow)
    audit = JsonlAuditLog(audit_path) if audit_path is not None else None
    t = 0.0
    state = start(1, NEW, OLD, plan, t)
    events = [RolloutEvent("start", t, {"rollout_id": 1, "version": NEW, "previous_version": OLD,
                                        "plan": plan.to_dict()})]
    if audit:
        audit.append(t, "start", "simulate", 1, {"version": NEW, "previous_version": OLD})
    exposed: set[str] = set()
    outside: set[str] = set()
    stage_reports: list[HealthReport] = []
    decisions: list[dict[str, Any]] = []
    canary_windows = 0
    windows_to_abort: int | None = None
    windows = 0
    for windows in range(1, cfg.max_windows + 1):
        for v in fleet + forgers:  # each vehicle checks for an update at the start of the window
            a = assign(state, plan, v.vid)
            v.version, v.shadow = a.version or v.version, a.shadow_version
            # ... installs what it was assigned and confirms it (forgers too: they run the real updater)
            records[v.vid] = replace(records.get(v.vid, VehicleRecord()), confirmed_rollout=1,
                                     confirmed_version=v.version)
            if v.vid.startswith("forger-"):
                continue
            if NEW in (v.version, v.shadow):
                exposed.add(v.vid)
                if not in_cohort(v.vid, canary_fraction):
                    outside.add(v.vid)
        if not state.active:
            break  # the fleet has applied the final assignment (revert or full release)
        t += cfg.fleet.window_s
        for r in _reports(cfg, rng, fleet, t) + _forgeries(forgers, t, cfg.fleet.window_s):
            reason = admit(r, records[r.vehicle_id], 1, t, policy)
            if reason is not None:
                rejected += 1
                continue
            records[r.vehicle_id] = replace(records[r.vehicle_id], last_window_end_s=r.window_end_s)
            stage_reports.append(r)
        window = aggregate(stage_reports, NEW, OLD)
        stage_before = state.stage(plan)
        state, d = decide(state, plan, window, t)
        events.append(RolloutEvent("evaluate", t, {"window": window.to_dict(), "stage": d.stage}))
        decisions.append(d.to_dict())
        if audit:
            audit.append(t, "decision", "controller", 1, d.to_dict())
        if not stage_before.shadow:
            canary_windows += 1
        if d.action is Action.ABORT:
            windows_to_abort = canary_windows
        if d.action in (Action.PROMOTE, Action.COMPLETE):
            stage_reports = []
        if on_window:
            on_window(windows, d.stage, d.action.value)
    reverted = sum(1 for v in fleet if v.vid in exposed and v.version == OLD and v.shadow != NEW)
    still = sum(1 for v in fleet if v.version == NEW)
    outcome = {Status.COMPLETED: "completed", Status.ABORTED: "aborted"}.get(state.status, "stalled")
    return SimResult(outcome, state.stage(plan).name, len(decisions), windows_to_abort, len(exposed), len(outside),
                     reverted, still, sum(1 for v in fleet if in_cohort(v.vid, canary_fraction)), cfg.vehicles,
                     decisions, audit.verify().ok if audit else True, replay(events) == state, rejected)
