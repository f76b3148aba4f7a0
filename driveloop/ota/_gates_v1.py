"""Gate rules 1, frozen: the health gates as they were before rules 2, kept only to replay old logs.

The fleet server rebuilds a rollout's state by replaying its event log through the controller, so a
log recorded under these rules must be judged by them again: under rules 2 an old abort could replay
as a hold and put the aborted model back on the fleet. Plans that do not name their ``gate_rules``
(every log written before rules 2) get these. Do not change them; new plans use
:mod:`driveloop.ota.gates`.

What rules 2 fixed: the control's observed rate was used as if it were exact (one canary event
against a control that saw none in a few minutes failed any stage), deadline misses and crashes failed
on the point estimate alone, and the limit was ``control × (1 + rel) + abs``.
"""

from __future__ import annotations

import math

from driveloop.ota.gates import CohortStats, GateResult, GateTolerances, HealthWindow, MetricCheck, Verdict

__all__ = ["baseline_after", "evaluate_active", "evaluate_shadow"]


def _upper(control: float, rel: float, abs_: float) -> float:
    return control * (1.0 + rel) + abs_


def _check(name: str, canary: float, control: float, limit: float) -> MetricCheck:
    return MetricCheck(name, canary, control, limit, Verdict.FAIL if canary > limit else Verdict.PASS)


def _poisson_sf(k: int, lam: float) -> float:
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
    rate = count / hours if hours > 0 else 0.0
    p = _poisson_sf(count, limit_rate * hours)
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
    s = window.shadow
    if s.compared_ticks < tol.min_shadow_ticks or s.vehicles < tol.min_vehicles:
        return GateResult(Verdict.INCONCLUSIVE, f"too few shadow comparisons: {s.compared_ticks} ticks from "
                          f"{s.vehicles} vehicles (need {tol.min_shadow_ticks} / {tol.min_vehicles})")
    checks = [
        _check("disagreement_rate", s.disagreement_rate, 0.0, tol.max_disagreement_rate),
        _check("mean_abs_diff", s.mean_abs_diff, 0.0, tol.max_mean_abs_diff),
    ]
    return _result(checks, "shadow outputs agree with the active model")


def baseline_after(window: HealthWindow, tol: GateTolerances, baseline: CohortStats | None) -> CohortStats | None:
    """The control stats later stages compare with once this stage is promoted."""
    return window.control if window.control.hours >= tol.min_control_hours else baseline
