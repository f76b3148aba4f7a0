"""Federated fine-tuning benchmarks (issue 6 acceptance), measured in one run on this machine.

    python bench/fl_scale.py [--home DIR] [--base REF] [--vehicles 10] [--rounds 100] [--sections compare,scale] [--out F]

Sections:
- ``compare``: from the bootstrap model, the same K vehicles' local data used several ways, all gated on
  the same held-out suite against the same baseline:
    (1) FL (FedAvg aggregation + the server's Adam, one local gradient step per round) vs the centralized
        fine-tune on the union of the vehicles' data (the cloud's step: Adam, ``--central-epochs``):
        held-out interventions/h within 10%, zero collisions. Also classic FedAvg (local Adam epochs,
        plain averaging, ``--classic-rounds`` × 2 epochs) on the same data: why the server holds the optimiser;
    (2) FL with 30% of vehicles dropping out mid-round (a fresh draw every round): round wall time vs the
        clean run's and vs the median client time, gate passed;
    (3) 20% poisoned vehicles (one x50-scaled, one sign-flipped, every round): a robust strategy (trimmed
        mean with norm clipping) poisoned vs clean, and plain FedAvg (classic, no clipping) poisoned vs
        clean, on the offline action loss over the held-out vehicles' hard frames (continuous: the suite's
        interventions/h move in steps of one event, ~4 %), held-out interventions/h and progress.
- ``scale``: 100 virtual vehicles (tiny local data) in one simulated round on 2 cores: wall time and peak
  memory of the whole process tree (driver + Ray workers), sampled from /proc.

Ratios compare runs made in this same process on this same machine (2-core CPU, no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

HELD_OUT = 10  # vehicles that prepare data but never train: their hard frames score every model offline

class TreeMemory:
    """Peak summed RSS of this process and all its descendants (Ray's raylet and workers included)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peak_bytes = period_s, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                parents[int(d)] = int(parts[1])
                rss[int(d)] = int(parts[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        root, total = os.getpid(), 0
        for pid, size in rss.items():
            p, seen = pid, 0
            while p > 1 and seen < 64:
                if p == root:
                    total += size
                    break
                p, seen = parents.get(p, 0), seen + 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_rss())
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def ensure_bootstrap(home: Path) -> None:
    from driveloop.cloud.bootstrap import BootstrapConfig, bootstrap
    from driveloop.cloud.registry import Registry
    from driveloop.core.exceptions import RegistryError

    try:
        with Registry(home / "registry") as reg:
            reg.get("validated")
        return
    except RegistryError:
        pass
    _log("bootstrapping model v1 (behaviour cloning)")
    bootstrap(home / "registry", BootstrapConfig(episodes=12, episode_s=20.0, epochs=8, workers=2, check_episodes=1))


def offline_loss(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> float:
    """Mean action loss of a model on held-out hard frames (hindsight labels)."""
    import torch

    from driveloop.cloud.model import PolicyNet, loss_parts

    net = PolicyNet()
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    net.eval()
    idx = np.flatnonzero(arrays["hard"])
    if not len(idx):  # replay frames' targets are the base's own outputs: they would score the base 0
        _log("offline loss: the held-out vehicles have no hard frames")
        return math.nan
    with torch.no_grad():
        pred = net(*(torch.from_numpy(np.ascontiguousarray(arrays[k][idx])) for k in ("kinematics", "lidar", "grid")))
        return float(loss_parts(pred, torch.from_numpy(arrays["target_action"][idx]))["action"])


def _summary(gate: dict[str, Any]) -> dict[str, Any]:
    return {side: {k: gate[side][k] for k in ("interventions_per_hour", "collisions", "progress")}
            for side in ("baseline", "candidate")} | {"passed": gate["passed"]}


def section_compare(home: Path, base_version: int, vehicles: int, rounds: int, central_epochs: int,
                    classic_rounds: int, suite_s: float) -> dict[str, Any]:
    import torch

    from driveloop.cloud.evaluation import EvalSuite, gate
    from driveloop.cloud.export import export_onnx
    from driveloop.contracts.manifest import build_manifest
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.pipeline import _cached_eval
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.train import FinetuneConfig, finetune
    from driveloop.federated.client import VehicleSettings, vehicle_id_for
    from driveloop.federated.run import (
        FlRunConfig,
        _start,
        prepare_vehicles,
        run_federated,
    )
    from driveloop.federated.server import ServerSettings, load_checkpoint

    torch.set_num_threads(1)
    suite = EvalSuite(duration_s=suite_s)
    base_cfg = FlRunConfig(vehicle=VehicleSettings(home=str(home), registry_dir=str(home / "registry"), episodes=3, episode_s=20.0),
                           server=ServerSettings(vehicles=vehicles, rounds=rounds, quorum_frac=0.6),
                           base_ref=str(base_version), suite=suite)
    t0 = time.perf_counter()
    _, initial, _, _, vs = _start(base_cfg)
    samples = prepare_vehicles(vs, vehicles + HELD_OUT)  # extra vehicles never train: the offline held-out set
    prep_s = time.perf_counter() - t0
    from driveloop.federated.vehicle_data import VehicleDataConfig, local_dataset

    dcfg = VehicleDataConfig(episodes=3, episode_s=20.0, seed=base_cfg.vehicle.data_seed)
    with Registry(home / "registry") as reg:
        art = reg.get(base_version)
        local = {vehicle_id_for(i): local_dataset(vs.vehicle_dir(vehicle_id_for(i)), vehicle_id_for(i), art, dcfg)
                 for i in range(vehicles + HELD_OUT)}
    held = {k: np.concatenate([local[vehicle_id_for(vehicles + j)][k] for j in range(HELD_OUT)]) for k in local["fl000"]}
    _log(f"vehicles ready in {prep_s:.0f} s: {samples}")

    results: dict[str, Any] = {"vehicles": vehicles, "num_cpus": base_cfg.num_cpus, "rounds": rounds, "central_epochs": central_epochs,
                               "samples_per_vehicle": samples, "prepare_s": round(prep_s, 1), "runs": {}}

    def fl(name: str, server: dict[str, Any] | None = None, vehicle: dict[str, Any] | None = None,
           **kw: Any) -> dict[str, Any]:
        """One run: ``server``/``vehicle`` change the base run's settings, ``kw`` its run-level fields."""
        cfg = replace(base_cfg, run_name=f"bench-{name}", server=replace(base_cfg.server, **(server or {})),
                      vehicle=replace(base_cfg.vehicle, **(vehicle or {})), **kw)
        shutil.rmtree(home / "federated" / cfg.run_name, ignore_errors=True)  # a fresh run, not a resumed one
        t = time.perf_counter()
        r = run_federated(cfg)
        wall = time.perf_counter() - t
        arrays = load_checkpoint(home / "federated" / f"bench-{name}").arrays  # type: ignore[union-attr]
        out = {"strategy": cfg.server.strategy, "wall_s": round(wall, 1), "gate": _summary(r["gate"]),
               "stage": r["candidate_stage"], "offline_loss": offline_loss(arrays, held),
               "round_wall_s": [x["wall_s"] for x in r["round_log"]],
               "median_client_s": [x["median_client_s"] for x in r["round_log"]],
               "participants": r["participants_per_round"], "faults": r["faults"],
               "rejected": [len(x["rejected"]) for x in r["round_log"]], "clipped": [x["clipped"] for x in r["round_log"]]}
        _log(f"{name}: {json.dumps(out)}")
        results["runs"][name] = out
        return out

    fl("fedavg-clean")
    # centralized: the cloud pipeline's fine-tune step (Adam, minibatches) on the union of the same data
    union = {k: np.concatenate([local[vehicle_id_for(i)][k] for i in range(vehicles)]) for k in local["fl000"]}
    union["segment_index"] = np.concatenate([  # segments numbered per vehicle: keep them apart in the union
        local[vehicle_id_for(i)]["segment_index"] + 1000 * i for i in range(vehicles)])
    t = time.perf_counter()
    state, _ = finetune({k: torch.from_numpy(v.copy()) for k, v in initial.items()}, union,
                        FinetuneConfig(epochs=central_epochs, batch_size=64, torch_threads=1))
    central_s = time.perf_counter() - t
    net = PolicyNet()
    net.load_state_dict(state)
    onnx = export_onnx(net, home / "federated" / "central.onnx")
    with Registry(home / "registry") as reg:
        base = reg.get(base_version)
    cache = home / "cloud" / "eval_cache"
    cand = _cached_eval(cache, onnx, build_manifest(onnx, name=base.manifest.name, version=base.version), suite)
    g = gate(_cached_eval(cache, base.onnx_path, base.manifest, suite), cand, base_cfg.tolerances).as_dict()
    results["runs"]["central"] = {"wall_s": round(central_s, 1), "gate": _summary(g), "offline_loss": offline_loss(
        {k: v.numpy() for k, v in state.items()}, held), "samples": len(union["target_action"])}
    _log(f"central: {json.dumps(results['runs']['central'])}")
    results["base_offline_loss"] = offline_loss(initial, held)

    # FedAvg as first published: local epochs, the server averages models
    classic_server = {"rounds": classic_rounds, "server_opt": "none"}
    classic_vehicle = {"local_epochs": 2, "optimizer": "adam", "batch_size": 64, "lr": 2e-4}
    fl("fedavg-classic", server=classic_server, vehicle=classic_vehicle)
    fl("fedavg-dropout30", vehicle={"dropout_frac": 0.3})
    fl("trimmedavg-clean", server={"strategy": "trimmedavg"})
    fl("trimmedavg-poison20", server={"strategy": "trimmedavg"}, poison=0.2)
    fl("fedavg-poison20", poison=0.2)
    fl("fedavg-classic-poison20-noclip", server=classic_server | {"clip_median_factor": 0.0}, vehicle=classic_vehicle,
       poison=0.2)
    return results


def acceptance(runs: dict[str, Any], vehicles: int, cpus: int) -> dict[str, Any]:
    """The issue's criteria from one compare section's runs (ratios of runs made in the same process).

    A round's lower bound on this machine: every sampled vehicle trains (dropouts fail after training) and
    Flower runs ``cpus`` of them at a time, so ceil(vehicles / cpus) × the median client time."""
    def rel(key: str, run: str, ref: str) -> float:
        a, b = (runs[r][key] if key == "offline_loss" else runs[r]["gate"]["candidate"][key] for r in (run, ref))
        return (a - b) / max(b, 1e-9)

    clean, drop = runs["fedavg-clean"], runs["fedavg-dropout30"]
    steady = slice(1, None)  # round 1 also starts Flower's Ray actors
    return {
        "1_fl_vs_central_iph_rel": rel("interventions_per_hour", "fedavg-clean", "central"),
        "1_fl_collisions": clean["gate"]["candidate"]["collisions"], "1_fl_gate_passed": clean["gate"]["passed"],
        "2_dropout_round_wall_over_clean": float(np.median(drop["round_wall_s"][steady]) / np.median(clean["round_wall_s"][steady])),
        "2_dropout_round_wall_over_cpu_bound": float(np.median(
            [w / (math.ceil(vehicles / cpus) * c) for w, c in zip(drop["round_wall_s"][steady], drop["median_client_s"][steady]) if c])),
        "2_dropout_gate_passed": drop["gate"]["passed"],
        **{f"3_robust_poisoned_vs_clean_{k}_rel": rel(k, "trimmedavg-poison20", "trimmedavg-clean")
           for k in ("offline_loss", "interventions_per_hour", "progress")},
        **{f"3_fedavg_poisoned_vs_clean_{k}_rel": rel(k, "fedavg-classic-poison20-noclip", "fedavg-classic")
           for k in ("offline_loss", "interventions_per_hour", "progress")},
        **{f"3_default_poisoned_vs_clean_{k}_rel": rel(k, "fedavg-poison20", "fedavg-clean")
           for k in ("offline_loss", "interventions_per_hour", "progress")},
    }


def section_scale(home: Path, base_version: int, vehicles: int) -> dict[str, Any]:
    from driveloop.federated.client import VehicleSettings
    from driveloop.federated.run import FlRunConfig, _start, prepare_vehicles, simulate
    from driveloop.federated.server import ServerSettings

    cfg = FlRunConfig(vehicle=VehicleSettings(home=str(home), registry_dir=str(home / "registry"), episodes=1, episode_s=5.0),
                      server=ServerSettings(vehicles=vehicles, rounds=1), base_ref=str(base_version),
                      run_name=f"bench-scale-{vehicles}", evaluate=False)
    _, initial, _, server, vs = _start(cfg)
    shutil.rmtree(server.run_dir, ignore_errors=True)  # time a round, not a resumed (finished) run
    t = time.perf_counter()
    prepare_vehicles(vs, vehicles)
    prep_s = time.perf_counter() - t
    with TreeMemory() as mem:
        t = time.perf_counter()
        state = simulate(server, vs, initial, cfg.num_cpus)
        wall = time.perf_counter() - t
    rec = state["rounds"][0]
    out = {"vehicles": vehicles, "prepare_s": round(prep_s, 1), "round_wall_s": rec["wall_s"],
           "simulation_wall_s": round(wall, 1), "peak_tree_rss_mib": round(mem.peak_bytes / 2**20),
           "accepted": rec["accepted"], "median_client_s": rec["median_client_s"]}
    _log(f"scale: {json.dumps(out)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/tmp/driveloop-flbench"))
    ap.add_argument("--vehicles", type=int, default=10)
    ap.add_argument("--base", default="validated", help="Registry ref of the model every run starts from.")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--central-epochs", type=int, default=6)
    ap.add_argument("--classic-rounds", type=int, default=3)
    ap.add_argument("--suite-duration", type=float, default=30.0)  # the held-out suite default
    ap.add_argument("--scale-vehicles", type=int, default=100)
    ap.add_argument("--sections", default="compare,scale")
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON results here.")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    args.home.mkdir(parents=True, exist_ok=True)
    ensure_bootstrap(args.home)
    from driveloop.cloud.registry import Registry

    # Every run and section starts from this model: a candidate validated by one run must not become the
    # next run's base, nor re-distil the vehicles' replay targets (their dataset caches) for the next section.
    with Registry(args.home / "registry") as reg:
        base_version = reg.get(args.base).version
    results: dict[str, Any] = {"machine": f"{os.cpu_count()}-core CPU, no GPU"}
    sections = args.sections.split(",")
    if "compare" in sections:
        results["compare"] = section_compare(args.home, base_version, args.vehicles, args.rounds, args.central_epochs,
                                             args.classic_rounds, args.suite_duration)
        results["acceptance"] = acceptance(results["compare"]["runs"], args.vehicles, results["compare"]["num_cpus"])
    if "scale" in sections:
        results["scale"] = section_scale(args.home, base_version, args.scale_vehicles)
    text = json.dumps(results, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o))
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
