"""Health gates: table-driven verdicts, threshold sweeps and aggregation of real health reports.

The thin-evidence table runs each fixture through the current gate (rules 2) and through the gate as it
was before (rules 1, :mod:`driveloop.ota._gates_v1`), so every row shows what changed and what did not.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from driveloop.core.exceptions import ConfigError
from driveloop.ota import _gates_v1
from driveloop.ota.gates import CohortStats, GateTolerances, HealthWindow, ShadowAggregate, Verdict, aggregate, \
    evaluate_active, evaluate_shadow, poisson_sf, reference
from driveloop.ota.stats import binom_sf, excess_p, floor_p, rate_ratio_p
from driveloop.contracts.fleet import HealthReport, ShadowStats

TOL = GateTolerances()
TICKS_PER_S = 10  # CONTROL_PERIOD_S = 0.1 s


def stats(vehicles: int = 10, hours: float = 2.0, interventions: float = 4, collisions: int = 0, crashes: int = 0,
          miss_rate: float = 0.0, p99_ms: float = 8.0, reports: int | None = None) -> CohortStats:
    ticks = int(hours * 3600 * TICKS_PER_S)
    return CohortStats(vehicles, vehicles if reports is None else reports, hours, ticks, int(interventions), collisions,
                       int(miss_rate * ticks), crashes, p99_ms * ticks)


def drive(vehicles: int, seconds: float, interventions: int = 0, crashes: int = 0, misses: int = 0,
          p99_ms: float = 8.0, reports: int | None = None) -> CohortStats:
    """A cohort's sums over ``seconds`` of driving in all (the demo's windows are seconds, not hours)."""
    ticks = int(seconds * TICKS_PER_S)
    return CohortStats(vehicles, vehicles if reports is None else reports, seconds / 3600.0, ticks, interventions, 0,
                       misses, crashes, p99_ms * ticks)


CONTROL = stats(vehicles=500, hours=100.0, interventions=200)  # 2 interventions/h

CASES = [
    ("healthy", stats(), CONTROL, Verdict.PASS, []),
    ("one collision", stats(collisions=1), CONTROL, Verdict.FAIL, ["collisions"]),
    ("collision with 1 vehicle still fails", stats(vehicles=1, hours=0.1, collisions=1), CONTROL, Verdict.FAIL,
     ["collisions"]),
    ("a crash", stats(crashes=1), CONTROL, Verdict.FAIL, ["crashes_per_h"]),
    ("many interventions", stats(interventions=20), CONTROL, Verdict.FAIL, ["interventions_per_h"]),
    ("deadline misses", stats(miss_rate=0.01), CONTROL, Verdict.FAIL, ["deadline_miss_rate"]),
    ("slow inference", stats(p99_ms=20.0), CONTROL, Verdict.FAIL, ["inference_p99_ms"]),
    ("too few vehicles", stats(vehicles=2), CONTROL, Verdict.INCONCLUSIVE, []),
    ("too few hours", stats(hours=0.5), CONTROL, Verdict.INCONCLUSIVE, []),
    ("no data", CohortStats(), CONTROL, Verdict.INCONCLUSIVE, []),
    ("no control", stats(), CohortStats(), Verdict.INCONCLUSIVE, []),
]


@pytest.mark.parametrize("name,canary,control,verdict,failed", CASES, ids=[c[0] for c in CASES])
def test_active_gate_table(name: str, canary: CohortStats, control: CohortStats, verdict: Verdict,
                           failed: list[str]) -> None:
    r = evaluate_active(HealthWindow(canary, control), TOL)
    assert r.verdict is verdict, r.reason
    assert r.failed() == failed


def test_active_gate_names_its_parts() -> None:
    r = evaluate_active(HealthWindow(stats(interventions=20), CONTROL), TOL)
    parts = {c.name: c for c in r.checks}
    assert set(parts) == {"collisions", "crashes_per_h", "interventions_per_h", "deadline_miss_rate",
                          "inference_p99_ms"}
    iv = parts["interventions_per_h"]
    assert iv.canary == pytest.approx(10.0) and iv.control == pytest.approx(2.0)
    assert iv.limit == pytest.approx(max(2.0 * (1 + TOL.interventions_rel), TOL.interventions_abs_per_h))
    assert iv.p_value is not None and iv.p_value < TOL.interventions_alpha
    assert r.to_dict()["checks"][2]["verdict"] == "fail"


def binom_sf_oracle(k: int, n: int, p: float | Fraction) -> float:
    """P(X >= k), X ~ Binomial(n, p), summed term by term in exact rational arithmetic."""
    q = Fraction(p).limit_denominator(10**6)
    return float(sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k, n + 1)))


# The sweep: canary 10 h against CONTROL (200 interventions in 100 h). Limit L = max(2/h × (1 + rel), abs);
# the exact test's boundary, from the oracle: P(X >= 40) ≈ 0.062 holds, P(X >= 41) ≈ 0.045 fails, where
# X ~ Binomial(k + 200, p0), p0 = 10·(1 + rel) / (10·(1 + rel) + 100).
LIMIT_PER_H = max(2.0 * (1 + TOL.interventions_rel), TOL.interventions_abs_per_h)
P0 = 10.0 * (1 + TOL.interventions_rel) / (10.0 * (1 + TOL.interventions_rel) + 100.0)
FAIL_FROM = next(k for k in range(round(LIMIT_PER_H * 10), 400)
                 if binom_sf_oracle(k, k + 200, P0) < TOL.interventions_alpha)


def test_sweep_boundary_is_the_oracle_s() -> None:
    assert FAIL_FROM == 41 and LIMIT_PER_H == 3.0  # with the default tolerances


@pytest.mark.parametrize("count,expected", [
    (round(LIMIT_PER_H * 10) - 1, Verdict.PASS), (round(LIMIT_PER_H * 10), Verdict.PASS),
    (round(LIMIT_PER_H * 10) + 1, Verdict.INCONCLUSIVE), (FAIL_FROM - 1, Verdict.INCONCLUSIVE),
    (FAIL_FROM, Verdict.FAIL), (2 * FAIL_FROM, Verdict.FAIL)])
def test_intervention_threshold_sweep(count: int, expected: Verdict) -> None:
    # at or under the limit passes; above it holds while the excess could be noise; fails once significant
    canary = stats(hours=10.0, interventions=count)
    assert evaluate_active(HealthWindow(canary, CONTROL), TOL).verdict is expected


@pytest.mark.parametrize("k,lam,expected", [(0, 3.0, 1.0), (1, 0.0, 0.0), (1, 2.0, 1 - 0.1353352832366127),
                                            (3, 2.0, 1 - 5 * 0.1353352832366127)])
def test_poisson_sf_exact(k: int, lam: float, expected: float) -> None:
    assert poisson_sf(k, lam) == pytest.approx(expected)


def test_poisson_sf_is_exact_where_rules_1_approximated() -> None:
    # P(X >= 120 | 100) by the series: no normal approximation above lam = 100 any more
    series = 1.0 - sum(math.exp(i * math.log(100.0) - 100.0 - math.lgamma(i + 1)) for i in range(120))
    assert poisson_sf(120, 100.0) == pytest.approx(series, rel=1e-9)
    assert poisson_sf(120, 100.0) == pytest.approx(poisson_sf(120, 99.999), abs=0.01)


@pytest.mark.parametrize("k,n,p", [(1, 1, 0.5), (3, 3, 0.47), (2, 9, 0.13), (0, 5, 0.3), (6, 5, 0.3), (5, 40, 0.01),
                                   (31, 231, 0.1304), (41, 241, 0.1304), (200, 400, 0.5), (1, 10, 0.0),
                                   (10, 10, 1.0), (45, 600, 0.0625)])
def test_binom_sf_matches_the_exact_sum(k: int, n: int, p: float) -> None:
    assert binom_sf(k, n, p) == pytest.approx(binom_sf_oracle(k, n, p), rel=1e-9, abs=1e-300)


def test_rate_ratio_p_is_the_conditional_binomial_test() -> None:
    # the issue's numbers: 1 canary event in 0.033 h against 0 in 0.056 h at ratio 1.5 → p0 = p ≈ 0.47
    t_c, t_0 = 120 / 3600, 200 / 3600
    assert rate_ratio_p(1, t_c, 0, t_0, 1.5) == pytest.approx(1.5 * t_c / (1.5 * t_c + t_0))
    assert rate_ratio_p(1, t_c, 0, t_0, 1.5) == pytest.approx(0.47, abs=0.01)
    assert rate_ratio_p(4, 1.0, 0, 1.0, 1.0) == pytest.approx(0.5**4)  # equal exposures: a fair coin
    assert rate_ratio_p(0, 1.0, 5, 1.0, 1.0) == 1.0  # no canary events: no evidence
    assert rate_ratio_p(3, 1.0, 0, 0.0, 1.0) == 1.0  # nothing to compare with: no evidence


def test_excess_p_rejects_only_when_both_parts_do() -> None:
    # H0: canary ≤ max(ratio × control, floor): the larger p of the two parts
    args = (5, 1.0, 1, 10.0, 1.5)
    assert excess_p(*args, 0.0) == pytest.approx(rate_ratio_p(*args))
    assert excess_p(*args, 10.0) == pytest.approx(floor_p(5, 1.0, 10.0)) and floor_p(5, 1.0, 10.0) > rate_ratio_p(*args)
    assert excess_p(5, 1.0, None, 0.0, 1.5, 2.0) == pytest.approx(poisson_sf(5, 2.0))  # no reference: floor only


def test_crash_rate_rise_is_relative_to_control_and_needs_evidence() -> None:
    control = stats(vehicles=500, hours=100.0, interventions=200, crashes=10)  # 0.1 crash/h
    tol = GateTolerances(crash_rate_abs_per_h=0.05)

    def verdict(crashes: int) -> Verdict:
        return evaluate_active(HealthWindow(stats(hours=10.0, crashes=crashes), control), tol).verdict

    # 10 h of canary: 1 crash is the control's rate; 2 or 3 are above it but as likely as not noise
    # (P ≈ 0.30, 0.11 under the control's rate); 4 is not (P ≈ 0.03)
    assert [verdict(k) for k in range(6)] == [Verdict.PASS, Verdict.PASS, Verdict.INCONCLUSIVE, Verdict.INCONCLUSIVE,
                                              Verdict.FAIL, Verdict.FAIL]


def test_baseline_replaces_missing_control() -> None:
    w = HealthWindow(stats(), CohortStats())
    assert evaluate_active(w, TOL, baseline=CONTROL).verdict is Verdict.PASS
    bad = HealthWindow(stats(interventions=40), CohortStats())
    assert evaluate_active(bad, TOL, baseline=CONTROL).verdict is Verdict.FAIL


@pytest.mark.parametrize("dis,diff,expected", [(10, 0.1, Verdict.PASS), (200, 0.1, Verdict.FAIL),
                                               (10, 0.9, Verdict.FAIL)])
def test_shadow_gate(dis: int, diff: float, expected: Verdict) -> None:
    w = HealthWindow(shadow=ShadowAggregate(10, 2000, dis, diff * 2000))
    assert evaluate_shadow(w, TOL).verdict is expected


def test_shadow_gate_needs_comparisons() -> None:
    assert evaluate_shadow(HealthWindow(shadow=ShadowAggregate(10, 50, 0, 0.0)), TOL).verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize("kw", [{"p99_rel": -0.1}, {"interventions_alpha": 1.5}, {"count_alpha": 2.0},
                                {"max_disagreement_rate": 1.1}, {"min_hours": float("nan")}])
def test_tolerances_validated(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        GateTolerances(**kw)  # type: ignore[arg-type]


# -- thin evidence: the demo's fleet ------------------------------------------------------------------
# The demo (driveloop/demo.py demo_plan): windows of seconds, a 25-50 % canary of ~8 cars. At its 50 %
# stage the control was 2 cars × 20 s (under min_control_hours), so the canary-promotion baseline
# (0 interventions in 200 s) was the reference and one lane-guard activation in 120 s aborted a model
# with 3.75 interventions/h against the previous one's 58.1/h.
DEMO = GateTolerances(min_vehicles=1, min_hours=0.02, min_control_hours=0.02, min_shadow_ticks=200,
                      max_disagreement_rate=0.25, max_mean_abs_diff=1.0)
DEMO_BASELINE = drive(6, 200.0)
THIN_CONTROL = drive(2, 40.0)

# name, canary, control, baseline, tolerances, verdict now, verdict under rules 1 (before), failed now
THIN = [
    ("1 vs 0 events in small windows holds", drive(2, 120.0, interventions=1), THIN_CONTROL, DEMO_BASELINE, DEMO,
     Verdict.INCONCLUSIVE, Verdict.FAIL, []),
    ("0 vs 0 passes", drive(2, 120.0), THIN_CONTROL, DEMO_BASELINE, DEMO, Verdict.PASS, Verdict.PASS, []),
    ("a single crash in small windows holds", drive(2, 120.0, crashes=1), THIN_CONTROL, DEMO_BASELINE, DEMO,
     Verdict.INCONCLUSIVE, Verdict.FAIL, []),
    ("a single crash against a large control fails", drive(1, 360.0, crashes=1), drive(500, 360_000.0), None, TOL,
     Verdict.FAIL, Verdict.FAIL, ["crashes_per_h"]),
    ("a crash with no reference at all fails", drive(2, 120.0, crashes=1), CohortStats(), None, DEMO,
     Verdict.FAIL, Verdict.FAIL, ["crashes_per_h"]),
    ("3 deadline misses in 1200 ticks hold", drive(2, 120.0, misses=3), THIN_CONTROL, DEMO_BASELINE, DEMO,
     Verdict.INCONCLUSIVE, Verdict.FAIL, []),
    ("6 deadline misses in 1200 ticks fail", drive(2, 120.0, misses=6), THIN_CONTROL, DEMO_BASELINE, DEMO,
     Verdict.FAIL, Verdict.FAIL, ["deadline_miss_rate"]),
    ("one slow window holds", drive(1, 120.0, p99_ms=20.0), THIN_CONTROL, DEMO_BASELINE, DEMO,
     Verdict.INCONCLUSIVE, Verdict.FAIL, []),
    ("slow in p99_min_reports windows fails", drive(2, 120.0, p99_ms=20.0, reports=DEMO.p99_min_reports),
     THIN_CONTROL, DEMO_BASELINE, DEMO, Verdict.FAIL, Verdict.FAIL, ["inference_p99_ms"]),
    ("10x the control's rate fails at once", drive(2, 120.0, interventions=19), drive(2, 40.0, interventions=1),
     drive(6, 200.0, interventions=3), DEMO, Verdict.FAIL, Verdict.FAIL, ["interventions_per_h"]),
]


@pytest.mark.parametrize("name,canary,control,baseline,tol,now,before,failed", THIN, ids=[c[0] for c in THIN])
def test_thin_evidence_table(name: str, canary: CohortStats, control: CohortStats, baseline: CohortStats | None,
                             tol: GateTolerances, now: Verdict, before: Verdict, failed: list[str]) -> None:
    w = HealthWindow(canary, control)
    r = evaluate_active(w, tol, baseline)
    assert (r.verdict, r.failed()) == (now, failed), r.reason
    assert _gates_v1.evaluate_active(w, tol, baseline).verdict is before


def test_one_vs_zero_is_the_issue_s_p_value() -> None:
    r = evaluate_active(HealthWindow(drive(2, 120.0, interventions=1), THIN_CONTROL), DEMO, DEMO_BASELINE)
    iv = {c.name: c for c in r.checks}["interventions_per_h"]
    # pooled reference: 0 events in 40 s + 200 s; p = p0 = 1.5·120 / (1.5·120 + 240) ≈ 0.43 (rules 1: 0.033)
    assert iv.p_value == pytest.approx(1.5 * 120 / (1.5 * 120 + 240))
    assert r.reason == "above the limit, not yet significant: interventions_per_h"


@pytest.mark.parametrize("name,control,baseline,expected", [
    ("enough concurrent control: it alone", stats(hours=1.0), stats(hours=50.0, interventions=7), stats(hours=1.0)),
    ("thin control: pooled with the baseline", THIN_CONTROL, DEMO_BASELINE, THIN_CONTROL.pooled(DEMO_BASELINE)),
    ("thin control, no baseline: none", THIN_CONTROL, None, None),
    ("no control: the baseline", CohortStats(), DEMO_BASELINE, DEMO_BASELINE),
])
def test_reference_compares_like_with_like(name: str, control: CohortStats, baseline: CohortStats | None,
                                           expected: CohortStats | None) -> None:
    assert reference(HealthWindow(stats(), control), DEMO, baseline) == expected


def test_pooled_sums_every_field() -> None:
    a, b = drive(2, 40.0, interventions=1, crashes=1, misses=2), drive(6, 200.0, interventions=3, p99_ms=9.0)
    p = a.pooled(b)
    assert (p.vehicles, p.interventions, p.crashes, p.deadline_misses, p.ticks) == (8, 4, 1, 2, 2400)
    assert p.hours == pytest.approx(240 / 3600) and p.p99_ms == pytest.approx((8.0 * 400 + 9.0 * 2000) / 2400)


@pytest.mark.parametrize("disagreements,expected", [(500, Verdict.PASS), (530, Verdict.INCONCLUSIVE),
                                                    (600, Verdict.FAIL)])
def test_shadow_disagreements_need_evidence(disagreements: int, expected: Verdict) -> None:
    # 10 000 compared ticks against 5 %: 500 is at the limit, 530 is noise (P ≈ 0.09), 600 is not (P ≈ 1e-5)
    w = HealthWindow(shadow=ShadowAggregate(10, 10_000, disagreements, 0.1 * 10_000))
    assert evaluate_shadow(w, TOL).verdict is expected


def report(vid: str, version: str, seq: int = 0, interventions: int = 1, p99: float = 5.0,
           shadow: ShadowStats | None = None) -> HealthReport:
    return HealthReport(vehicle_id=vid, model_version=version, window_start_s=0.0, window_end_s=600.0, seq=seq,
                        ticks=6000, fallback_interventions=interventions, collisions=0, deadline_misses=3,
                        inference_p99_ms=p99, crashes=0, shadow=shadow)


def test_aggregate_splits_by_version_and_sums_exactly() -> None:
    reports = [report("a", "2", 0, 2, 10.0), report("a", "2", 1, 0, 20.0), report("b", "1", 0, 1),
               report("c", "1", 0, 1, shadow=ShadowStats(compared_ticks=6000, disagreements=60, mean_abs_diff=0.2)),
               report("d", "7", 0, 99)]
    w = aggregate(reports, "2", "1")
    assert (w.canary.vehicles, w.canary.reports, w.canary.interventions) == (1, 2, 2)
    assert w.canary.hours == pytest.approx(1 / 3)
    assert w.canary.p99_ms == pytest.approx(15.0)
    assert w.canary.deadline_miss_rate == pytest.approx(6 / 12000)
    assert (w.control.vehicles, w.control.interventions) == (2, 2)
    assert w.shadow.vehicles == 1 and w.shadow.disagreement_rate == pytest.approx(0.01)
    assert w.shadow.mean_abs_diff == pytest.approx(0.2)
    assert HealthWindow.from_dict(w.to_dict()) == w


@pytest.mark.parametrize("field,value", [("window_end_s", 0.0), ("ticks", -1), ("vehicle_id", "bad id!"),
                                         ("inference_p99_ms", float("nan")), ("deadline_misses", 7000)])
def test_health_report_rejects_bad_input(field: str, value: object) -> None:
    d = report("a", "1").model_dump()
    d[field] = value
    with pytest.raises(ValueError):
        HealthReport.model_validate(d)


RANK = {Verdict.PASS: 0, Verdict.INCONCLUSIVE: 1, Verdict.FAIL: 2}


@settings(max_examples=200, deadline=None)
@given(vehicles=st.integers(1, 200), hours=st.floats(0.01, 500.0), base=st.integers(0, 2000),
       extra=st.integers(1, 500), control_iv=st.integers(0, 5000), control_h=st.floats(0.0, 5000.0))
def test_more_interventions_never_improve_the_verdict(vehicles: int, hours: float, base: int, extra: int,
                                                      control_iv: int, control_h: float) -> None:
    control = CohortStats(1000, 1000, control_h, int(control_h * 36000), control_iv, 0, 0, 0, 8.0 * control_h * 36000)
    lo = evaluate_active(HealthWindow(stats(vehicles, hours, base), control), TOL)
    hi = evaluate_active(HealthWindow(stats(vehicles, hours, base + extra), control), TOL)
    assert RANK[hi.verdict] >= RANK[lo.verdict]


@settings(max_examples=200, deadline=None)
@given(vehicles=st.integers(1, 200), hours=st.floats(0.01, 500.0), interventions=st.integers(0, 2000),
       collisions=st.integers(1, 5))
def test_any_collision_fails_whatever_else(vehicles: int, hours: float, interventions: int, collisions: int) -> None:
    r = evaluate_active(HealthWindow(stats(vehicles, hours, interventions, collisions=collisions), CONTROL), TOL)
    assert r.verdict is Verdict.FAIL and "collisions" in r.failed()
