"""Benchmark: one rollout-controller decision for a fleet of n vehicles (issue 7, acceptance 6).

A decision = aggregate the stage's health reports (one per vehicle) + run the gate and the state
machine (:func:`decide`) + ask the director for every vehicle's assignment (cold hash cache, so
every cohort position is computed). Prints times and the ratio against the smallest fleet, measured
in the same run; prints the markdown table recorded in docs/BENCHMARKS.md. Target: 10k in < 1 s.

    python bench/rollout_controller.py [--sizes 1000 10000 100000] [--repeat 3] [--write]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from driveloop.ota.cohorts import cohort_position
from driveloop.ota.controller import RolloutPlan, decide, start
from driveloop.ota.director import assign_fleet, fleet_share
from driveloop.ota.gates import aggregate
from driveloop.contracts.fleet import HealthReport

PLAN = RolloutPlan.default()


def fleet_reports(n: int, canary: set[str]) -> list[HealthReport]:
    return [HealthReport(vehicle_id=v, model_version="2" if v in canary else "1", window_start_s=0.0,
                         window_end_s=600.0, seq=1, ticks=6000, fallback_interventions=i % 3, collisions=0,
                         deadline_misses=i % 5, inference_p99_ms=7.0 + (i % 10) / 10, crashes=0)
            for i, v in enumerate(f"veh-{k:07d}" for k in range(n))]


def one_decision(n: int, reports: list[HealthReport], ids: list[str]) -> tuple[float, float, float, str]:
    """Times (s) of aggregate+decide, director for the fleet, total; and the decision taken."""
    state = start(1, "2", "1", PLAN, 0.0)
    # the 10 % stage, one healthy window already seen: this window completes its evidence
    state = replace(state, stage_index=2, max_fraction=0.1, evaluations_in_stage=1)
    cohort_position.cache_clear()
    t0 = time.perf_counter()
    window = aggregate(reports, "2", "1")
    _, d = decide(state, PLAN, window, 1200.0)
    t1 = time.perf_counter()
    share = fleet_share(assign_fleet(state, PLAN, ids))
    t2 = time.perf_counter()
    assert sum(share.values()) == n
    return t1 - t0, t2 - t1, t2 - t0, d.action.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        ids = [f"veh-{k:07d}" for k in range(n)]
        canary = {v for v in ids if cohort_position(v) < 0.1}
        reports = fleet_reports(n, canary)
        runs = [one_decision(n, reports, ids) for _ in range(args.repeat)]
        med = sorted(runs, key=lambda r: r[2])[len(runs) // 2]  # the run with the median total
        rows.append((n, *med))
    base = rows[0]
    lines = ["| vehicles | aggregate + gate + decide (ms) | director, whole fleet (ms) | total (ms) | "
             "total / smallest | per vehicle (µs) | decision |", "|---:|---:|---:|---:|---:|---:|---|"]
    for n, agg, direc, total, action in rows:
        lines.append(f"| {n:,} | {agg * 1e3:.1f} | {direc * 1e3:.1f} | {total * 1e3:.1f} | "
                     f"{total / base[3]:.1f}× (n {n / base[0]:.0f}×) | {total / n * 1e6:.2f} | {action} |")
    table = "\n".join(lines)
    print(table)


if __name__ == "__main__":
    main()
