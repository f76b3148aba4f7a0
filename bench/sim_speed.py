"""Simulator and sensor speed: steps/s per scenario kind, and the cost of one ``observe()``.

Baseline, measured in the same run: stock highway-env ``highway-fast-v0`` (continuous actions, its own
Kinematics observation) stepped at the same 10 Hz control period. Ratios > 1 mean our adapter is faster.

Rates are per CPU-second of this process (``time.process_time``): the bench machine is shared, and
wall time there mostly measures the neighbours. ``--wall`` measures wall-clock time instead.

    python bench/sim_speed.py [--steps 300] [--seeds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

_clock = time.process_time


def _baseline_steps_per_s(steps: int, seed: int) -> float:
    import warnings

    import gymnasium as gym
    import highway_env  # noqa: F401 - registers the envs

    warnings.filterwarnings("ignore", module="gymnasium")
    env = gym.make(
        "highway-fast-v0",
        config={"action": {"type": "ContinuousAction"}, "policy_frequency": 10, "simulation_frequency": 10,
                "duration": 10_000},
    )
    env.reset(seed=seed)
    action = np.zeros(2, dtype=np.float32)
    t0 = _clock()
    done = 0
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(action)
        done += 1
        if terminated or truncated:
            env.reset(seed=seed)
    elapsed = _clock() - t0
    env.close()
    return done / elapsed


def _sim_steps_per_s(name: str, steps: int, seed: int, expert: bool) -> tuple[float, int]:
    from driveloop.sim.scenarios import parse_scenario
    from driveloop.sim.simulator import Simulator

    sim = Simulator(parse_scenario(name), seed)
    snap = sim.reset()
    t0 = _clock()
    for _ in range(steps):
        cmd = sim.expert_action() if expert else (0.0, 0.0)
        snap = sim.step(*cmd)
    elapsed = _clock() - t0
    sim.close()
    return steps / elapsed, len(snap.others) + 1


def _observe_us(name: str, seed: int, noise: float, calls: int = 2000) -> float:
    from driveloop.sim.scenarios import parse_scenario
    from driveloop.sim.sensors import SensorConfig, observe
    from driveloop.sim.simulator import Simulator

    sim = Simulator(parse_scenario(name), seed)
    snap = sim.reset()
    sim.close()
    rng = np.random.default_rng(seed)
    cfg = SensorConfig.uniform(noise)
    samples = []
    for _ in range(5):  # best of 5 batches: the machine is shared
        t0 = _clock()
        for _ in range(calls // 5):
            observe(snap, rng, cfg)
        samples.append((_clock() - t0) / (calls // 5) * 1e6)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of process CPU time")
    args = parser.parse_args()
    global _clock
    _clock = time.perf_counter if args.wall else time.process_time
    clock_name = "wall" if args.wall else "cpu"

    baseline = statistics.median(_baseline_steps_per_s(args.steps, s) for s in range(args.seeds))
    scenarios = ["highway", "dense", "cut-in", "merge", "ccrs-50", "ccrm-60", "ccrb-12-6"]
    rows = []
    for name in scenarios:
        steps = args.steps if not name.startswith("ccr") else min(args.steps, 100)
        plain = [_sim_steps_per_s(name, steps, s, expert=False) for s in range(args.seeds)]
        with_expert = [_sim_steps_per_s(name, steps, s, expert=True) for s in range(args.seeds)]
        rows.append({
            "scenario": name,
            "vehicles": plain[0][1],
            "steps_per_s": round(statistics.median(p[0] for p in plain), 1),
            "steps_per_s_with_expert": round(statistics.median(p[0] for p in with_expert), 1),
            "observe_us": round(_observe_us(name, 0, 0.0), 1),
            "observe_noisy_us": round(_observe_us(name, 0, 0.5), 1),
        })
        rows[-1]["vs_baseline"] = round(rows[-1]["steps_per_s"] / baseline, 2)
    result = {"clock": clock_name, "baseline_highway_fast_v0_steps_per_s": round(baseline, 1), "scenarios": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"clock: {clock_name} time; baseline highway-fast-v0 (ContinuousAction, 10 Hz): {baseline:.0f} steps/s")
    header = f"{'scenario':<10} {'veh':>4} {'steps/s':>8} {'+expert':>8} {'vs base':>8} {'obs µs':>7} {'obs σ.5':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scenario']:<10} {r['vehicles']:>4} {r['steps_per_s']:>8.0f} {r['steps_per_s_with_expert']:>8.0f} "
              f"{r['vs_baseline']:>7.2f}x {r['observe_us']:>7.0f} {r['observe_noisy_us']:>8.0f}")


if __name__ == "__main__":
    main()
