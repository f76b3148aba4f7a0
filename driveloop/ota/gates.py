"""Health gates: is the new model at least as healthy as the fleet still on the previous one?

Pure functions of aggregated health reports (DESIGN.md: the controller decides only from these).
Gate rules 2 (rules 1, kept for replaying old logs, are in :mod:`driveloop.ota._gates_v1`), in order:

1. Safety first, at any sample size: any collision in the treatment cohort → FAIL; a crash rate
   significantly above ``max(control, crash_rate_abs_per_h)`` → FAIL.
2. Too few treatment vehicles/hours, or no comparison group → INCONCLUSIVE (hold, never promote).
3. The other metrics against the reference (:func:`reference`: the stage's control, pooled with the
   earlier stages' controls when it alone is thin):

| metric | limit | PASS | FAIL | otherwise |
|---|---|---|---|---|
| crashes/h, interventions/h, deadline misses/tick | ``max(control × (1 + rel), abs)`` | ≤ limit | (a) | INCONCLUSIVE |
| inference p99 | ``control × (1 + rel) + abs`` | ≤ limit | (b) | INCONCLUSIVE |
| shadow disagreements/tick | ``max_disagreement_rate`` | ≤ limit | (c) | INCONCLUSIVE |
| shadow mean abs diff | ``max_mean_abs_diff`` | ≤ limit | above it | — |

(a) the excess is significant (p < α) under the exact two-exposure test of :mod:`driveloop.ota.stats`,
which treats the control's rate as the estimate it is; (b) the canary's mean p99 over at least
``p99_min_reports`` health reports is above it (a bounded comparison: no exact test for a mean of p99s);
(c) significant under the exact binomial test.

4. Otherwise PASS.

Rules 3 (:func:`evaluate_active_v3`) add: the reference must also span ``min_vehicles`` distinct
vehicles before a non-safety verdict; and every cohort statistic is now built per vehicle with each
vehicle's weight bounded (:func:`aggregate` via :mod:`driveloop.ota.robust`), so k forging vehicles move
a verdict only when k is a real share of the cohort. The exact tests themselves are unchanged.

INCONCLUSIVE means "not enough evidence either way": the controller holds the stage for more windows
(a bounded number, see :mod:`driveloop.ota.controller`). Every verdict carries its named parts
(:class:`MetricCheck`), which adapters log and export.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass, field
from enum import Enum
from typing import Any

from driveloop.contracts.fleet import HealthReport
from driveloop.core.exceptions import ConfigError
from driveloop.ota.stats import binom_sf, excess_p, poisson_sf

__all__ = [
    "CohortStats",
    "GateResult",
    "GateTolerances",
    "HealthWindow",
    "MetricCheck",
    "ShadowAggregate",
    "Verdict",
    "aggregate",
    "evaluate_active",
    "evaluate_active_v3",
    "evaluate_shadow",
    "poisson_sf",
    "reference",
]

_S_PER_H = 3600.0


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class CohortStats:
    """Sums over the health windows of one cohort (extensive quantities, so they add up exactly)."""

    vehicles: int = 0
    reports: int = 0
    hours: float = 0.0
    ticks: int = 0
    interventions: int = 0
    collisions: int = 0
    deadline_misses: int = 0
    crashes: int = 0
    p99_ms_tick_sum: float = 0.0  # Σ p99 × ticks: the tick-weighted mean p99 is exact after summing

    @property
    def interventions_per_h(self) -> float:
        return self.interventions / self.hours if self.hours > 0 else 0.0

    @property
    def crashes_per_h(self) -> float:
        return self.crashes / self.hours if self.hours > 0 else 0.0

    @property
    def deadline_miss_rate(self) -> float:
        return self.deadline_misses / self.ticks if self.ticks > 0 else 0.0

    @property
    def p99_ms(self) -> float:
        return self.p99_ms_tick_sum / self.ticks if self.ticks > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CohortStats:
        return cls(**d)

    def pooled(self, other: CohortStats) -> CohortStats:
        """Both cohorts' sums as one (exact: every field is extensive; ``vehicles`` counts each side's)."""
        return CohortStats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class ShadowAggregate:
    vehicles: int = 0
    compared_ticks: int = 0
    disagreements: int = 0
    abs_diff_sum: float = 0.0  # Σ mean_abs_diff × compared_ticks

    @property
    def disagreement_rate(self) -> float:
        return self.disagreements / self.compared_ticks if self.compared_ticks else 0.0

    @property
    def mean_abs_diff(self) -> float:
        return self.abs_diff_sum / self.compared_ticks if self.compared_ticks else 0.0


@dataclass(frozen=True)
class HealthWindow:
    """What the gate sees: treatment ("canary"), control (previous model) and shadow comparisons."""

    canary: CohortStats = field(default_factory=CohortStats)
    control: CohortStats = field(default_factory=CohortStats)
    shadow: ShadowAggregate = field(default_factory=ShadowAggregate)

    def to_dict(self) -> dict[str, Any]:
        return {"canary": asdict(self.canary), "control": asdict(self.control), "shadow": asdict(self.shadow)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealthWindow:
        return cls(CohortStats(**d["canary"]), CohortStats(**d["control"]), ShadowAggregate(**d["shadow"]))


class _Acc:
    """Running sums for one cohort (kept mutable only inside :func:`aggregate`)."""

    def __init__(self) -> None:
        self.vehicles: set[str] = set()
        self.n = self.ticks = self.interventions = self.collisions = self.misses = self.crashes = 0
        self.seconds = self.p99_sum = 0.0

    def add(self, r: HealthReport) -> None:
        self.vehicles.add(r.vehicle_id)
        self.n += 1
        self.seconds += r.duration_s
        self.ticks += r.ticks
        self.interventions += r.fallback_interventions
        self.collisions += r.collisions
        self.misses += r.deadline_misses
        self.crashes += r.crashes
        self.p99_sum += r.inference_p99_ms * r.ticks

    def stats(self) -> CohortStats:
        return CohortStats(len(self.vehicles), self.n, self.seconds / _S_PER_H, self.ticks, self.interventions,
                           self.collisions, self.misses, self.crashes, self.p99_sum)


def aggregate(reports: Iterable[HealthReport], version: str, previous_version: str) -> HealthWindow:
    """Split reports by the model that actuated: ``version`` → canary, ``previous_version`` → control,
    summed per vehicle and combined with each vehicle's weight bounded (:mod:`driveloop.ota.robust`).

    Shadow comparisons ride on control reports (the vehicle actuated the previous model). Reports for
    any other version say nothing about this release and are ignored.
    """
    from driveloop.ota.robust import robust_cohort, robust_shadow  # robust builds on this module's types

    canary: dict[str, _Acc] = {}
    control: dict[str, _Acc] = {}
    shadow: dict[str, list[float]] = {}
    for r in reports:
        if r.model_version == version:
            canary.setdefault(r.vehicle_id, _Acc()).add(r)
        elif r.model_version == previous_version:
            control.setdefault(r.vehicle_id, _Acc()).add(r)
            if r.shadow is not None:
                s = shadow.setdefault(r.vehicle_id, [0, 0, 0.0])
                s[0] += r.shadow.compared_ticks
                s[1] += r.shadow.disagreements
                s[2] += r.shadow.mean_abs_diff * r.shadow.compared_ticks
    return HealthWindow(robust_cohort([a.stats() for a in canary.values()]),
                        robust_cohort([a.stats() for a in control.values()]),
                        robust_shadow([ShadowAggregate(1, int(t), int(d), x) for t, d, x in shadow.values()]))


@dataclass(frozen=True)
class GateTolerances:
    """How much worse than control the new model may look, and how much evidence a verdict needs.

    Counts (crashes, interventions, deadline misses) may reach ``max(control × (1 + rel), abs)``: ``rel``
    bounds the relative rise, ``abs`` is a floor that matters only where the control's rate is near zero.
    (Rules 1 added the two; a sum has no exact test once the control's rate is itself an estimate.)
    """

    min_vehicles: int = 5
    min_hours: float = 1.0
    min_control_hours: float = 1.0
    max_collisions: int = 0
    crash_rate_abs_per_h: float = 0.0
    interventions_rel: float = 0.5
    interventions_abs_per_h: float = 1.0
    interventions_alpha: float = 0.05  # an excess fails only when this unlikely within tolerance (exact test)
    deadline_miss_rel: float = 0.5
    deadline_miss_abs: float = 0.002
    p99_rel: float = 0.25
    p99_abs_ms: float = 2.0
    p99_min_reports: int = 3  # canary reports a p99 excess must span before it fails (else it holds)
    min_shadow_ticks: int = 1000
    max_disagreement_rate: float = 0.05
    max_mean_abs_diff: float = 0.5
    count_alpha: float = 0.05  # the same, for crashes, deadline misses and shadow disagreements

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0 or value != value:
                raise ConfigError(f"gate tolerance {name} must be >= 0, got {value}")
        for name in ("interventions_alpha", "count_alpha", "max_disagreement_rate"):
            if getattr(self, name) > 1.0:
                raise ConfigError(f"gate tolerance {name} must be <= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MetricCheck:
    """One named part of a gate decision."""

    name: str
    canary: float
    control: float
    limit: float
    verdict: Verdict
    p_value: float | None = None  # count metrics: P(a count this high | the canary within tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "canary": self.canary, "control": self.control, "limit": self.limit,
                "verdict": self.verdict.value, "p_value": self.p_value}


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    reason: str
    checks: tuple[MetricCheck, ...] = ()

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.verdict is Verdict.FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reason": self.reason, "checks": [c.to_dict() for c in self.checks]}


    def unsure(self) -> list[str]:
        """Checks above their limit without significant evidence: what a bounded hold waits on."""
        return [c.name for c in self.checks if c.verdict is Verdict.INCONCLUSIVE]


def reference(window: HealthWindow, tol: GateTolerances, baseline: CohortStats | None) -> CohortStats | None:
    """What the canary is compared with, like with like: the stage's own control (same time, same roads)
    when it has ``min_control_hours``; else that control pooled with the baseline (earlier stages'
    controls, all on the previous model), so thin concurrent evidence adds to it instead of being
    dropped; None when even the pool is thinner than ``min_control_hours``."""
    control = window.control
    if control.hours >= tol.min_control_hours:
        return control
    pool = control if baseline is None else control.pooled(baseline)
    return pool if pool.hours >= tol.min_control_hours else None


def _check(name: str, canary: float, control: float, limit: float) -> MetricCheck:
    return MetricCheck(name, canary, control, limit, Verdict.FAIL if canary > limit else Verdict.PASS)


def _count_check(name: str, k_c: int, t_c: float, k_0: int | None, t_0: float, ratio: float, floor: float,
                 alpha: float) -> MetricCheck:
    """A count against ``max(ratio × control rate, floor)``: PASS at or under it; above it FAIL only when
    the excess is significant under the exact two-exposure test (:func:`~driveloop.ota.stats.excess_p`),
    else INCONCLUSIVE — thin evidence holds the stage, it neither aborts nor promotes."""
    rate = k_c / t_c if t_c > 0 else 0.0
    control = k_0 / t_0 if k_0 is not None and t_0 > 0 else 0.0
    limit = max(ratio * control, floor)
    p = excess_p(k_c, t_c, k_0, t_0, ratio, floor)
    verdict = Verdict.PASS if rate <= limit else Verdict.FAIL if p < alpha else Verdict.INCONCLUSIVE
    return MetricCheck(name, rate, control, limit, verdict, p)


def _p99_check(c: CohortStats, ref: CohortStats, tol: GateTolerances) -> MetricCheck:
    """Latency has no exact test here (only the tick-weighted mean of per-window p99s is summed), so it
    is a bounded comparison: a margin of ``p99_rel`` and ``p99_abs_ms`` over the reference absorbs
    window-to-window jitter, and an excess fails only once the canary's mean spans ``p99_min_reports``
    health reports (one vehicle's warm-up window after its trial boot cannot abort a stage on its own)."""
    limit = ref.p99_ms * (1.0 + tol.p99_rel) + tol.p99_abs_ms
    verdict = Verdict.PASS if c.p99_ms <= limit else \
        Verdict.FAIL if c.reports >= tol.p99_min_reports else Verdict.INCONCLUSIVE
    return MetricCheck("inference_p99_ms", c.p99_ms, ref.p99_ms, limit, verdict)


def _result(checks: list[MetricCheck], pass_reason: str) -> GateResult:
    failed = [c.name for c in checks if c.verdict is Verdict.FAIL]
    if failed:
        return GateResult(Verdict.FAIL, "worse than allowed: " + ", ".join(failed), tuple(checks))
    unsure = [c.name for c in checks if c.verdict is Verdict.INCONCLUSIVE]
    if unsure:
        return GateResult(Verdict.INCONCLUSIVE, "above the limit, not yet significant: " + ", ".join(unsure),
                          tuple(checks))
    return GateResult(Verdict.PASS, pass_reason, tuple(checks))


def evaluate_active(window: HealthWindow, tol: GateTolerances, baseline: CohortStats | None = None) -> GateResult:
    """Gate a stage where the new model actuates. ``baseline``: control stats remembered from earlier
    stages (pooled with a thin control, or alone where no control is left: the 100 % stage)."""
    c = window.canary
    ref = reference(window, tol, baseline)
    k0_crash = ref.crashes if ref is not None else None  # no reference: the floor is the only bar
    safety = [
        _check("collisions", float(c.collisions), float(ref.collisions if ref else 0), float(tol.max_collisions)),
        _count_check("crashes_per_h", c.crashes, c.hours, k0_crash, ref.hours if ref else 0.0, 1.0,
                     tol.crash_rate_abs_per_h, tol.count_alpha),
    ]
    if any(x.verdict is Verdict.FAIL for x in safety):
        return _result(safety, "")
    if c.vehicles < tol.min_vehicles or c.hours < tol.min_hours:
        return GateResult(Verdict.INCONCLUSIVE, f"too few samples: {c.vehicles} vehicles / {c.hours:.3g} h "
                          f"(need {tol.min_vehicles} / {tol.min_hours:g} h)", tuple(safety))
    if ref is None:
        return GateResult(Verdict.INCONCLUSIVE, "no control group and no baseline to compare with", tuple(safety))
    relative = [
        _count_check("interventions_per_h", c.interventions, c.hours, ref.interventions, ref.hours,
                     1.0 + tol.interventions_rel, tol.interventions_abs_per_h, tol.interventions_alpha),
        _count_check("deadline_miss_rate", c.deadline_misses, float(c.ticks), ref.deadline_misses, float(ref.ticks),
                     1.0 + tol.deadline_miss_rel, tol.deadline_miss_abs, tol.count_alpha),
        _p99_check(c, ref, tol),
    ]
    return _result(safety + relative, "within tolerance of control")


def evaluate_active_v3(window: HealthWindow, tol: GateTolerances,
                       baseline: CohortStats | None = None) -> GateResult:
    """Rules 3: rules 2, and the reference must span ``min_vehicles`` distinct vehicles too (a control of
    one or two vehicles cannot carry a verdict either way); safety failures still need no minimum."""
    r = evaluate_active(window, tol, baseline)
    ref = reference(window, tol, baseline)
    if r.verdict is Verdict.FAIL and any(c.name in _SAFETY for c in r.checks if c.verdict is Verdict.FAIL):
        return r
    if ref is not None and ref.vehicles < tol.min_vehicles:
        return GateResult(Verdict.INCONCLUSIVE, f"too few control vehicles: {ref.vehicles} "
                          f"(need {tol.min_vehicles})", tuple(c for c in r.checks if c.name in _SAFETY))
    return r


_SAFETY = ("collisions", "crashes_per_h")


def evaluate_shadow(window: HealthWindow, tol: GateTolerances) -> GateResult:
    """Gate the shadow stage: the new model's outputs must agree with the actuating model's. The
    disagreement count gets an exact one-sample test against ``max_disagreement_rate`` per tick."""
    s = window.shadow
    if s.compared_ticks < tol.min_shadow_ticks or s.vehicles < tol.min_vehicles:
        return GateResult(Verdict.INCONCLUSIVE, f"too few shadow comparisons: {s.compared_ticks} ticks from "
                          f"{s.vehicles} vehicles (need {tol.min_shadow_ticks} / {tol.min_vehicles})")
    limit = tol.max_disagreement_rate
    p = binom_sf(s.disagreements, s.compared_ticks, limit)
    verdict = Verdict.PASS if s.disagreement_rate <= limit else \
        Verdict.FAIL if p < tol.count_alpha else Verdict.INCONCLUSIVE
    checks = [
        MetricCheck("disagreement_rate", s.disagreement_rate, 0.0, limit, verdict, p),
        _check("mean_abs_diff", s.mean_abs_diff, 0.0, tol.max_mean_abs_diff),
    ]
    return _result(checks, "shadow outputs agree with the active model")
