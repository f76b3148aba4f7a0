"""Health gates: is the new model at least as healthy as the fleet still on the previous one?

Pure functions of aggregated health reports (DESIGN.md: the controller decides only from these).
Rules, in order:

1. Safety first, at any sample size: any collision in the treatment cohort, or a crash rate above
   the control's (plus tolerance) → FAIL.
2. Too few treatment vehicles/hours, or no comparison group → INCONCLUSIVE (hold, never promote).
3. Interventions per hour, deadline-miss rate or inference p99 worse than control beyond
   ``control × (1 + rel) + abs`` → FAIL (interventions: only once the excess is significant under a
   Poisson test; above the limit but not yet significant → INCONCLUSIVE).
4. Otherwise PASS.

The shadow stage compares outputs instead: disagreement rate and mean |Δaction| against limits.
Every verdict carries its named parts (:class:`MetricCheck`), which adapters log and export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from driveloop.contracts.fleet import HealthReport
from driveloop.core.exceptions import ConfigError

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
    """Split reports by the model that actuated: ``version`` → canary, ``previous_version`` → control.

    Shadow comparisons ride on control reports (the vehicle actuated the previous model). Reports for
    any other version say nothing about this release and are ignored.
    """
    canary, control = _Acc(), _Acc()
    sv: set[str] = set()
    s_ticks = s_dis = 0
    s_diff = 0.0
    for r in reports:
        if r.model_version == version:
            canary.add(r)
        elif r.model_version == previous_version:
            control.add(r)
            if r.shadow is not None:
                sv.add(r.vehicle_id)
                s_ticks += r.shadow.compared_ticks
                s_dis += r.shadow.disagreements
                s_diff += r.shadow.mean_abs_diff * r.shadow.compared_ticks
    return HealthWindow(canary.stats(), control.stats(), ShadowAggregate(len(sv), s_ticks, s_dis, s_diff))


@dataclass(frozen=True)
class GateTolerances:
    """How much worse than control the new model may look, and how much evidence a verdict needs."""

    min_vehicles: int = 5
    min_hours: float = 1.0
    min_control_hours: float = 1.0
    max_collisions: int = 0
    crash_rate_abs_per_h: float = 0.0
    interventions_rel: float = 0.5
    interventions_abs_per_h: float = 1.0
    interventions_alpha: float = 0.05  # an excess must also be this unlikely under the limit rate (Poisson)
    deadline_miss_rel: float = 0.5
    deadline_miss_abs: float = 0.002
    p99_rel: float = 0.25
    p99_abs_ms: float = 2.0
    min_shadow_ticks: int = 1000
    max_disagreement_rate: float = 0.05
    max_mean_abs_diff: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0 or value != value:
                raise ConfigError(f"gate tolerance {name} must be >= 0, got {value}")

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
    p_value: float | None = None  # for count metrics: P(count this high | the limit rate)

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


def _upper(control: float, rel: float, abs_: float) -> float:
    return control * (1.0 + rel) + abs_


def _check(name: str, canary: float, control: float, limit: float) -> MetricCheck:
    return MetricCheck(name, canary, control, limit, Verdict.FAIL if canary > limit else Verdict.PASS)


def poisson_sf(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam): exact below lam = 100, normal approximation above."""
    if k <= 0:
        return 1.0
    if lam <= 0.0:
        return 0.0
    if lam > 100.0:
        return 0.5 * math.erfc((k - 0.5 - lam) / math.sqrt(2.0 * lam))
    term = cdf = math.exp(-lam)
    for i in range(1, k):
        term *= lam / i
        cdf += term
    return max(0.0, 1.0 - cdf)


def _rate_check(name: str, count: int, hours: float, control_rate: float, limit_rate: float,
                alpha: float) -> MetricCheck:
    """A rate above its limit fails when the excess is significant (with a handful of canary vehicles a
    good model's Poisson noise alone would otherwise abort it now and then) and is INCONCLUSIVE when it
    is not: a suspicious stage holds for more evidence, it is never promoted."""
    rate = count / hours if hours > 0 else 0.0
    p = poisson_sf(count, limit_rate * hours)
    verdict = Verdict.PASS if rate <= limit_rate else Verdict.FAIL if p < alpha else Verdict.INCONCLUSIVE
    return MetricCheck(name, rate, control_rate, limit_rate, verdict, p)


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
    """Gate a stage where the new model actuates. ``baseline``: control stats remembered from an
    earlier stage, used when no control group is left (the 100 % stage)."""
    c = window.canary
    ref = window.control if window.control.hours >= tol.min_control_hours else baseline
    ref_crash = ref.crashes_per_h if ref is not None else 0.0
    safety = [
        _check("collisions", float(c.collisions), float(ref.collisions if ref else 0), float(tol.max_collisions)),
        _check("crashes_per_h", c.crashes_per_h, ref_crash, ref_crash + tol.crash_rate_abs_per_h),
    ]
    if any(x.verdict is Verdict.FAIL for x in safety):
        return _result(safety, "")
    if c.vehicles < tol.min_vehicles or c.hours < tol.min_hours:
        return GateResult(Verdict.INCONCLUSIVE, f"too few samples: {c.vehicles} vehicles / {c.hours:.2f} h "
                          f"(need {tol.min_vehicles} / {tol.min_hours:g} h)", tuple(safety))
    if ref is None:
        return GateResult(Verdict.INCONCLUSIVE, "no control group and no baseline to compare with", tuple(safety))
    relative = [
        _rate_check("interventions_per_h", c.interventions, c.hours, ref.interventions_per_h,
                    _upper(ref.interventions_per_h, tol.interventions_rel, tol.interventions_abs_per_h),
                    tol.interventions_alpha),
        _check("deadline_miss_rate", c.deadline_miss_rate, ref.deadline_miss_rate,
               _upper(ref.deadline_miss_rate, tol.deadline_miss_rel, tol.deadline_miss_abs)),
        _check("inference_p99_ms", c.p99_ms, ref.p99_ms, _upper(ref.p99_ms, tol.p99_rel, tol.p99_abs_ms)),
    ]
    return _result(safety + relative, "within tolerance of control")


def evaluate_shadow(window: HealthWindow, tol: GateTolerances) -> GateResult:
    """Gate the shadow stage: the new model's outputs must agree with the actuating model's."""
    s = window.shadow
    if s.compared_ticks < tol.min_shadow_ticks or s.vehicles < tol.min_vehicles:
        return GateResult(Verdict.INCONCLUSIVE, f"too few shadow comparisons: {s.compared_ticks} ticks from "
                          f"{s.vehicles} vehicles (need {tol.min_shadow_ticks} / {tol.min_vehicles})")
    checks = [
        _check("disagreement_rate", s.disagreement_rate, 0.0, tol.max_disagreement_rate),
        _check("mean_abs_diff", s.mean_abs_diff, 0.0, tol.max_mean_abs_diff),
    ]
    return _result(checks, "shadow outputs agree with the active model")
