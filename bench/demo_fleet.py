"""The demo's fleet drive over the host's cores (cloud/fleet_shards.py) against one thread, measured in one run.

The demo drives its fleet (8 vehicles, the seeded mixed routes) for a 240 s data drive and up to 15 rollout
windows of 20 s per iteration. This drives the same kind of fleet — two models, the second with the first in
shadow, recording into a spool as the data drive does — in alternating rounds: ``one`` = the fleet in this
thread (``FleetShardPool(1)``), ``sharded`` = ``--shards`` shards (this thread + worker processes, warmed up
before the first round). It prints each round's wall seconds, the ratio of the medians (one / sharded), the
CPU seconds of this process and its workers (``/proc``), checks that both drove the same vehicles the same, and
states the machine's load (``os.getloadavg``) before and after.

    python bench/demo_fleet.py [--vehicles 8] [--seconds 20] [--rounds 3] [--shards 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _models(tmp: Path) -> dict[str, Any]:
    import torch

    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.sim_exec import ModelPayload
    from driveloop.contracts.manifest import build_manifest

    out = {}
    for seed, key in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        path = export_onnx(PolicyNet(), tmp / f"m{seed}.onnx")
        out[key] = ModelPayload.read(path, build_manifest(path, name="bench", version=seed + 1))
    return out


def _cpu_tree() -> float:
    """CPU seconds of this process and every live process it started (the pool's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    mine, frontier = {os.getpid()}, {os.getpid()}
    while frontier:
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier} - mine
        mine |= frontier
    return sum(stats[pid][1] for pid in mine if pid in stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vehicles", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per drive (a rollout window: 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from driveloop.cloud.fleet_shards import FleetShardPool, Recording
    from driveloop.edge.drive import plan_fleet

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        models = _models(tmp)
        plans = [p.__class__(p.vehicle_id, p.scenario, p.seed, "a" if i % 2 else "b")
                 for i, p in enumerate(plan_fleet("mix", args.vehicles, seed=0, prefix="car"))]
        versions = {p.vehicle_id: "1" if p.model == "a" else "2" for p in plans}
        shadows = {"b": models["a"]}
        times: dict[str, list[float]] = {"one": [], "sharded": []}
        cpu: dict[str, list[float]] = {"one": [], "sharded": []}
        rows: dict[str, Any] = {}
        with FleetShardPool(1) as one, FleetShardPool(args.shards) as sharded:
            pools = {"one": one, "sharded": sharded}
            sharded.drive(plans[: args.shards], models, 0.5, shadows)  # workers warm, as the demo's are after its first drive
            one.drive(plans[:1], models, 0.5, shadows)
            for r in range(args.rounds):
                for name, pool in pools.items():
                    rec = Recording(tmp / f"spool-{name}-{r}", 2**30, versions)
                    c0, t0 = _cpu_tree(), time.perf_counter()
                    report = pool.drive(plans, models, args.seconds, shadows, recording=rec)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(_cpu_tree() - c0)
                    rows[name] = [(v.vehicle_id, v.distance_m, v.interventions, v.collisions) for v in report.vehicles]
    p50 = {k: statistics.median(v) for k, v in times.items()}
    out = {"vehicles": args.vehicles, "seconds": args.seconds, "shards": args.shards, "rounds": args.rounds,
           "wall_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
           "cpu_s": {k: [round(t, 2) for t in v] for k, v in cpu.items()},
           "speedup_median": round(p50["one"] / p50["sharded"], 3),
           "cpu_use_sharded": round(statistics.median(c / t for c, t in zip(cpu["sharded"], times["sharded"])), 2),
           "same_vehicles": rows["one"] == rows["sharded"],
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.vehicles} vehicles × {args.seconds:g} s, {args.rounds} rounds; load {out['load_before']} → "
          f"{out['load_after']}")
    for k in ("one", "sharded"):
        print(f"  {k:8s} wall {out['wall_s'][k]} s, cpu {out['cpu_s'][k]} s")
    print(f"  speed-up (median one / median sharded): {out['speedup_median']}×; sharded CPU use "
          f"{out['cpu_use_sharded'] * 100:.0f} %; same vehicles: {out['same_vehicles']}")


if __name__ == "__main__":
    main()
