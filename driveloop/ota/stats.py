"""Exact tests on event counts, for the health gates (pure, standard library only).

A health gate asks whether the new model's cohort ("canary") shows more events — interventions,
crashes, deadline misses, shadow disagreements — than the comparison group and the tolerances allow.
Both sides are samples: a control rate seen over a few minutes of driving is as uncertain as the
canary's, so a test that treats it as exact calls thin evidence significant (two canary cars with one
lane-guard activation against a control that happened to see none would fail any stage). These tests
account for both exposures:

| function | H0 (the canary is within tolerance) | null distribution of the canary's count k_c |
|---|---|---|
| :func:`rate_ratio_p` | rate_c ≤ ratio × rate_0 | given n = k_c + k_0: Binomial(n, ratio·t_c / (ratio·t_c + t_0)) |
| :func:`floor_p` | rate_c ≤ floor | Poisson(floor · t_c) |
| :func:`excess_p` | rate_c ≤ max(ratio × rate_0, floor) | both of the above: p = the larger of the two |

:func:`rate_ratio_p` is the textbook exact test for two Poisson rates: conditioning on the total count
removes the unknown common rate. :func:`excess_p` is an intersection-union test — it rejects only when
both parts do, which is exactly level α with no correction.

Small p means "the canary is worse than allowed"; a p-value near 1 means no evidence of harm, not
evidence of health — the gate decides PASS from the point estimates, and holds in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["binom_sf", "excess_p", "floor_p", "poisson_sf", "rate_ratio_p"]

_NEGLIGIBLE = 1e-17  # a term this small against the running sum no longer changes a float64 sum


def _sum_away_from_mode(logpmf: Callable[[int], float], first: int, last: int | None, step: int) -> float:
    """Σ pmf(i) for i from ``first`` to ``last`` (inclusive; None: unbounded) by ``step``. The caller starts
    on the far side of the mode, so terms only shrink: stop once they are negligible (a few sd, not n, terms)."""
    total = 0.0
    i = first
    while last is None or (last - i) * step >= 0:
        term = math.exp(logpmf(i))
        total += term
        if term <= total * _NEGLIGIBLE:
            break
        i += step
    return total


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space terms, no normal approximation)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq, lnf = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def logpmf(i: int) -> float:
        return lnf - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq

    mode = math.floor((n + 1) * p)
    if k > mode:
        return min(1.0, _sum_away_from_mode(logpmf, k, n, 1))
    return max(0.0, 1.0 - _sum_away_from_mode(logpmf, k - 1, 0, -1))


def poisson_sf(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), exact at every lam."""
    if k <= 0:
        return 1.0
    if lam <= 0.0:
        return 0.0
    ll = math.log(lam)

    def logpmf(i: int) -> float:
        return i * ll - lam - math.lgamma(i + 1)

    mode = math.floor(lam)
    if k > mode:
        return min(1.0, _sum_away_from_mode(logpmf, k, None, 1))
    return max(0.0, 1.0 - _sum_away_from_mode(logpmf, k - 1, 0, -1))


def rate_ratio_p(k_c: int, t_c: float, k_0: int, t_0: float, ratio: float) -> float:
    """p-value of H0 "canary rate ≤ ratio × control rate" from k_c events in exposure t_c (canary) and k_0
    in t_0 (control). No canary events, or no exposure on either side, is no evidence: p = 1."""
    if k_c <= 0 or t_c <= 0.0 or t_0 <= 0.0:
        return 1.0
    w = ratio * t_c
    return binom_sf(k_c, k_c + k_0, w / (w + t_0))


def floor_p(k_c: int, t_c: float, floor_rate: float) -> float:
    """p-value of H0 "canary rate ≤ floor_rate" for k_c Poisson events in exposure t_c."""
    if k_c <= 0 or t_c <= 0.0:
        return 1.0
    return poisson_sf(k_c, floor_rate * t_c)


def excess_p(k_c: int, t_c: float, k_0: int | None, t_0: float, ratio: float, floor_rate: float) -> float:
    """p-value of H0 "canary rate ≤ max(ratio × control rate, floor_rate)". ``k_0=None``: no comparison
    group at all, so the floor is the only bar (the control rate is taken as 0)."""
    p_floor = floor_p(k_c, t_c, floor_rate)
    if k_0 is None:
        return p_floor
    return max(rate_ratio_p(k_c, t_c, k_0, t_0, ratio), p_floor)
