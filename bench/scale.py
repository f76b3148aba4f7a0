"""Scale-out: simulation as Ray work (cloud/sim_exec.py) against the in-process run, measured in one run.

1. Ray's overhead at 1 CPU: held-out evaluation episodes per CPU-second, in-process vs Ray tasks on a
   local runtime of 1 CPU (workers warmed up first; the Ray side counts the driver's and the workers'
   CPU). Target: Ray within 10 %.
2. Nodes: the same episodes on a Ray cluster of 1 node × 1 CPU, then with a second node × 1 CPU joined
   (``ray.cluster_utils.Cluster``: separate raylets, as ``ray start``); episodes per wall second.
   Target: 2 nodes ≥ 1.7× one node (the machine has 2 cores; its other load is reported with the result).
3. A fleet of ``--fleet-vehicles`` (1,000) vehicles for ``--fleet-duration`` (60) simulated seconds as
   shards on Ray actors over 2 CPUs: wall time, vehicle-seconds per CPU-second, resident memory per vehicle.
4. The gate's suite for one candidate (baseline + candidate, the default held-out suite): in-process
   vs Ray on 2 CPUs, wall time.

Models are random-weight PolicyNets exported to ONNX here (the sim cost does not depend on the weights;
the candidate differs from the baseline). ``--quick`` shrinks every part (a smoke run, not a measurement).

    python bench/scale.py [--quick] [--fleet-vehicles 1000] [--fleet-duration 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _models(tmp: Path) -> list[tuple[Path, Any]]:
    import torch

    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyNet
    from driveloop.contracts.manifest import build_manifest

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = export_onnx(PolicyNet(), tmp / f"m{seed}.onnx")
        out.append((path, build_manifest(path, name="bench", version=seed + 1)))
    return out


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_descendants() -> float:
    """CPU seconds of every live process this one started (the local Ray runtime: GCS, raylet, workers,
    agents), from /proc, so the Ray side is charged all it costs."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended between listing and reading
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier} - mine
        mine |= frontier
    return sum(stats[pid][1] for pid in mine)


def _episodes(run: Any) -> int:
    return sum(m.episodes for metrics in run.metrics for m in metrics.values())


def _suite(quick: bool) -> Any:
    from driveloop.cloud.evaluation import EvalSuite

    classes = {"ccrs": ("ccrs-30", "ccrs-50", "ccrs-70"), "highway": ("highway",), "dense": ("dense",),
               "ccrm": ("ccrm-50", "ccrm-70")}
    return EvalSuite(classes=classes, vehicles_per_scenario=2, duration_s=6.0 if quick else 20.0)


def overhead_at_one_cpu(models: list[tuple[Path, Any]], quick: bool) -> dict[str, Any]:
    """Episodes per CPU-second, in-process vs Ray tasks on a 1-CPU local runtime."""
    from driveloop.cloud.evaluation import evaluate_models
    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray
    from driveloop.cloud.sim_exec import SimExecutor

    suite, model = _suite(quick), models[:1]
    evaluate_models(model, suite)  # warm: imports, compiled kernels
    c0, t0 = _cpu_self(), time.perf_counter()
    local = evaluate_models(model, suite)
    local_cpu, local_wall = _cpu_self() - c0, time.perf_counter() - t0

    ensure_ray(None, 1)
    ex = SimExecutor("ray", num_cpus=1)
    evaluate_models(model, suite, ex)  # warm the worker the same way

    w0, c0, t0 = _cpu_descendants(), _cpu_self(), time.perf_counter()
    remote = evaluate_models(model, suite, ex)
    remote_wall = time.perf_counter() - t0
    remote_cpu = (_cpu_self() - c0) + (_cpu_descendants() - w0)
    shutdown_ray()
    assert remote.metrics == local.metrics, "Ray and in-process results differ"
    eps = _episodes(local)
    return {"episodes": eps, "local_cpu_s": round(local_cpu, 2), "local_wall_s": round(local_wall, 2),
            "ray_cpu_s": round(remote_cpu, 2), "ray_wall_s": round(remote_wall, 2),
            "local_eps_per_cpu_s": round(eps / local_cpu, 3), "ray_eps_per_cpu_s": round(eps / remote_cpu, 3),
            "ratio_ray_vs_local": round(local_cpu / remote_cpu, 3)}


def nodes_scaling(models: list[tuple[Path, Any]], quick: bool) -> dict[str, Any]:
    """Episodes per wall second on 1 node × 1 CPU, then 2 nodes × 1 CPU (a second raylet joined)."""
    import ray
    from ray.cluster_utils import Cluster

    from driveloop.cloud.evaluation import evaluate_models
    from driveloop.cloud.sim_exec import SimExecutor

    suite = _suite(quick)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    out: dict[str, Any] = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
        ex = SimExecutor("ray", ray_address=cluster.address)
        evaluate_models(models, suite, ex)  # warm the head's worker
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                evaluate_models(models, suite, ex)  # warm the new node's worker
            t0 = time.perf_counter()
            run = evaluate_models(models, suite, ex)
            wall = time.perf_counter() - t0
            out[f"{nodes}_node"] = {"episodes": _episodes(run), "wall_s": round(wall, 2),
                                    "eps_per_s": round(_episodes(run) / wall, 3),
                                    "nodes_used": run.execution.nodes}
        out["ratio_2_vs_1"] = round(out["2_node"]["eps_per_s"] / out["1_node"]["eps_per_s"], 3)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def fleet(models: list[tuple[Path, Any]], vehicles: int, duration_s: float) -> dict[str, Any]:
    """The fleet sharded over Ray actors on 2 CPUs (one shard per CPU)."""
    from driveloop._cli_fleet import fleet_report
    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray
    from driveloop.cloud.sim_exec import ModelPayload, SimExecutor
    from driveloop.edge.drive import plan_fleet

    ensure_ray(None, 2)
    payload = ModelPayload.read(*models[0])
    plans = plan_fleet("mix", vehicles, seed=0, prefix="fleet")
    t0 = time.perf_counter()
    mapped = SimExecutor("ray", num_cpus=2).drive_shards(payload, plans, duration_s, shards=2)
    report = fleet_report(mapped, time.perf_counter() - t0)
    shutdown_ray()
    keys = ("vehicles", "driven_s", "collisions", "interventions", "wall_s", "cpu_s", "vehicle_s_per_cpu_s",
            "memory_per_vehicle_bytes", "shards", "execution")
    return {k: report[k] for k in keys}


def gate_suite(models: list[tuple[Path, Any]], quick: bool) -> dict[str, Any]:
    """The default held-out suite for baseline + candidate: in-process, then Ray on 2 CPUs."""
    from driveloop.cloud.evaluation import EvalSuite, evaluate_models
    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray
    from driveloop.cloud.sim_exec import SimExecutor

    suite = EvalSuite(duration_s=6.0) if quick else EvalSuite()
    warm = EvalSuite(duration_s=1.0)  # every scenario once: imports, compiled kernels, both models loaded
    evaluate_models(models, warm)
    t0 = time.perf_counter()
    local = evaluate_models(models, suite)
    local_wall = time.perf_counter() - t0
    ensure_ray(None, 2)
    ex = SimExecutor("ray", num_cpus=2)
    evaluate_models(models, warm, ex)  # the same warm-up on both workers
    t0 = time.perf_counter()
    remote = evaluate_models(models, suite, ex)
    ray_wall = time.perf_counter() - t0
    shutdown_ray()
    assert remote.metrics == local.metrics, "Ray and in-process results differ"
    return {"episodes": _episodes(local), "units": remote.execution.units, "local_wall_s": round(local_wall, 2),
            "ray_2cpu_wall_s": round(ray_wall, 2), "speedup": round(local_wall / ray_wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fleet-vehicles", type=int, default=1000)
    ap.add_argument("--fleet-duration", type=float, default=60.0)
    ap.add_argument("--parts", default="overhead,nodes,fleet,gate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    vehicles, duration = (40, 5.0) if args.quick else (args.fleet_vehicles, args.fleet_duration)
    result: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(Path(tmp))
        parts = {"overhead": lambda: overhead_at_one_cpu(models, args.quick),
                 "nodes": lambda: nodes_scaling(models, args.quick),
                 "fleet": lambda: fleet(models, vehicles, duration),
                 "gate": lambda: gate_suite(models, args.quick)}
        for name in args.parts.split(","):
            t0 = time.perf_counter()
            result[name] = parts[name]()
            result[name]["load_after"] = os.getloadavg()
            if not args.json:
                print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(result[name])}", flush=True)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=None if not args.json else 1))


if __name__ == "__main__":
    main()
