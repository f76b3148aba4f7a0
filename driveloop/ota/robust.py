"""One vehicle, one share: per-vehicle health sums combined so no vehicle outweighs its share. Pure.

The gates' exact tests take a cohort's summed counts and hours; summed raw, one vehicle claiming long
windows or extreme counts moves them at will. Each vehicle's sums are first bounded, then added:

| quantity | bound per vehicle | why |
|---|---|---|
| hours | the cohort's median hours; interventions scale with them | a vehicle cannot weigh more than a typical one |
| ticks (deadline-miss and p99 weight) | the cohort's median ticks; misses and p99 weight scale with them | as hours |
| interventions/h, deadline misses/tick | the cohort's 90th-percentile per-vehicle rate (winsorised) | extreme counts from < 10 % of the vehicles cannot move the rate |
| collisions, crashes | none | safety fails closed: one real collision still aborts |
| shadow compared ticks | the median; disagreements scale with them | as hours |

So k forging vehicles shift a cohort statistic by about k/n of it (zero counts dilute the rate only by
their capped share) and shift the winsorised rates not at all while k < n/10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from driveloop.ota.gates import CohortStats, ShadowAggregate

__all__ = ["RATE_QUANTILE", "robust_cohort", "robust_shadow"]

RATE_QUANTILE = 0.9


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _scaled(k: int, share: float) -> int:
    return int(math.floor(k * share + 0.5))


def robust_cohort(per_vehicle: Sequence[CohortStats]) -> CohortStats:
    """Combine one :class:`CohortStats` per vehicle (each with ``vehicles == 1``) as the table says."""
    v = [s for s in per_vehicle if s.hours > 0]
    if not v:
        return CohortStats()
    cap_h = _median([s.hours for s in v])
    share = [min(1.0, cap_h / s.hours) for s in v]
    hours = [s.hours * f for s, f in zip(v, share)]
    iv = [_scaled(s.interventions, f) for s, f in zip(v, share)]
    cap_t = _median([float(s.ticks) for s in v])  # ticks are claimed apart from hours: bounded on their own
    t_share = [min(1.0, cap_t / s.ticks) if s.ticks else 1.0 for s in v]
    ticks = [_scaled(s.ticks, f) for s, f in zip(v, t_share)]
    dm = [min(_scaled(s.deadline_misses, f), t) for s, f, t in zip(v, t_share, ticks)]
    iv_cap = _quantile([k / h for k, h in zip(iv, hours)], RATE_QUANTILE)
    dm_cap = _quantile([k / t if t else 0.0 for k, t in zip(dm, ticks)], RATE_QUANTILE)
    iv = [min(k, math.ceil(iv_cap * h)) for k, h in zip(iv, hours)]
    dm = [min(k, math.ceil(dm_cap * t)) for k, t in zip(dm, ticks)]
    return CohortStats(len(v), sum(s.reports for s in v), sum(hours), sum(ticks), sum(iv),
                       sum(s.collisions for s in v), sum(dm), sum(s.crashes for s in v),
                       sum(s.p99_ms_tick_sum * f for s, f in zip(v, t_share)))


def robust_shadow(per_vehicle: Sequence[ShadowAggregate]) -> ShadowAggregate:
    """Shadow comparisons, one per vehicle, each vehicle's compared ticks capped at the median."""
    v = [s for s in per_vehicle if s.compared_ticks > 0]
    if not v:
        return ShadowAggregate()
    cap = _median([float(s.compared_ticks) for s in v])
    share = [min(1.0, cap / s.compared_ticks) for s in v]
    ticks = [_scaled(s.compared_ticks, f) for s, f in zip(v, share)]
    return ShadowAggregate(len(v), sum(ticks), sum(min(_scaled(s.disagreements, f), t)
                                                   for s, f, t in zip(v, share, ticks)),
                           sum(s.abs_diff_sum * f for s, f in zip(v, share)))
