"""Edge inference bench: ONNX Runtime vs torch eager for the same policy, all measured in one run.

    python bench/edge_inference.py [--json] [--iters N] [--batch 1 64] [--device cpu|cuda]
                                   [--no-isolated] [--no-agent] [--agent-seconds S]

Reports, per batch size, p50/p99 latency (µs) of
- ``torch_eager``: ``PolicyNet`` under ``torch.inference_mode`` (1 thread),
- ``ort_session``: a bare ONNX Runtime session (CPU EP, 1 intra-op thread),
- ``ort_runtime``: :class:`driveloop.edge.runtime.ModelRuntime.run` (batch validation + latency log
  included: what the vehicle pays),
and the ratio torch_eager / ort_runtime at p50. Engines are measured in alternating rounds so that
load from other processes on the machine hits them alike. Optional extras:
- ``isolated``: submit + poll round trip through :class:`IsolatedRuntime` (model in a child process);
- ``agent``: the control loop's own cost per tick (sensors + inference + supervisor) next to the bare
  simulator step (``env.step``) for one vehicle, from :func:`driveloop.edge.fleet.run_fleet`.

Targets (issue 3, acceptance 4): ORT ≥ 4× faster than torch eager at batch 1, ORT p50 ≤ 50 µs.
Benchmarks print ratios against a baseline measured in the same run; they are not timed tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROUNDS = 5  # alternating measurement rounds per engine


def summarize(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean()),
            "n": int(a.size)}


def _time(fn: Callable[[], object], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_inference(iters: int = 2000, batch_sizes: tuple[int, ...] = (1, 64), device: str = "cpu",
                    seed: int = 0) -> dict[str, Any]:
    """ORT (bare session and ModelRuntime) vs torch eager on the same weights and inputs."""
    import onnxruntime as ort
    import torch

    from driveloop.cloud.export import check_parity, export_onnx
    from driveloop.cloud.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
    from driveloop.edge import contract as C
    from driveloop.edge.runtime import ModelRuntime

    torch.set_num_threads(1)
    net = PolicyNet(PolicyConfig(seed=seed)).eval()
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(net, Path(d) / "model.onnx")
        parity = check_parity(net, path)
        rt = ModelRuntime(path, build_manifest(path, name="bench", version=1), device=device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        results: dict[str, Any] = {"params": net.count_params(), "parity_max_abs_err": parity,
                                   "provider": rt.provider, "batches": {}}
        for n in batch_sizes:
            tensors = example_inputs(n, seed=n)
            feed = {name: t.numpy() for name, t in zip(C.INPUT_NAMES, tensors)}
            engines: dict[str, Callable[[], object]] = {
                "torch_eager": partial(net, *tensors),
                "ort_session": partial(sess.run, None, feed),
                "ort_runtime": partial(rt.run, feed),
            }
            samples: dict[str, list[float]] = {k: [] for k in engines}
            with torch.inference_mode():
                for fn in engines.values():
                    _time(fn, max(50, iters // 20))  # warm-up: allocations, arena growth, caches
                for _ in range(ROUNDS):
                    for name, fn in engines.items():
                        samples[name] += _time(fn, max(1, iters // ROUNDS))
            row: dict[str, Any] = {name: summarize(s) for name, s in samples.items()}
            row["speedup_p50"] = row["torch_eager"]["p50_us"] / row["ort_runtime"]["p50_us"]
            row["ort_runtime_per_sample_us"] = row["ort_runtime"]["p50_us"] / n
            results["batches"][str(n)] = row
    return results


def bench_isolated(iters: int = 500, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Round trip (submit + poll) through the isolated model process, vs the in-process runtime."""
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
    from driveloop.edge import contract as C
    from driveloop.edge.isolated import IsolatedRuntime

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(PolicyNet(PolicyConfig(seed=seed)), Path(d) / "model.onnx")
        feed = {name: t.numpy() for name, t in zip(C.INPUT_NAMES, example_inputs(batch))}
        with IsolatedRuntime(path, build_manifest(path, name="bench", version=1)) as iso:
            t0 = time.perf_counter()
            if not iso.wait_ready():
                raise RuntimeError(f"isolated model process did not start: {iso.error}")
            startup_s = time.perf_counter() - t0

            def round_trip() -> None:
                now = time.monotonic()
                if not iso.submit(feed, now) or iso.poll(now + 1.0) is None:
                    raise RuntimeError("isolated model process missed a 1 s deadline")

            _time(round_trip, 50)
            samples = _time(round_trip, iters)
    return {"batch": batch, "startup_s": startup_s, **summarize(samples)}


def bench_agent_overhead(seconds: float = 30.0, scenario: str = "highway", seed: int = 0) -> dict[str, Any]:
    """The loop's cost per tick (sensors + inference + supervisor) beside the bare env.step, one vehicle."""
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet
    from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
    from driveloop.edge.runtime import ModelRuntime

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(PolicyNet(PolicyConfig(seed=seed)), Path(d) / "model.onnx")
        rt = ModelRuntime(path, build_manifest(path, name="bench", version=1), device="cpu")
        plans = [VehiclePlan("bench000", scenario, seed, "default")]
        report = run_fleet(plans, {"default": InProcessInference(rt)}, seconds)
    tick, sim = np.asarray(report.tick_ms), np.asarray(report.sim_ms)
    return {
        "scenario": scenario, "ticks": int(tick.size),
        "agent_ms_p50": float(np.percentile(tick, 50)), "agent_ms_p99": float(np.percentile(tick, 99)),
        "env_step_ms_p50": float(np.percentile(sim, 50)), "env_step_ms_p99": float(np.percentile(sim, 99)),
        "overhead_ratio_p50": float(np.percentile(tick, 50) / np.percentile(sim, 50)),
    }


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__}


def _print(result: dict[str, Any]) -> None:
    inf = result["inference"]
    print(f"policy: {inf['params']} params, parity max |ORT-torch| = {inf['parity_max_abs_err']:.2e}, "
          f"provider {inf['provider']}")
    print(f"{'batch':>5} {'engine':<12} {'p50 µs':>9} {'p99 µs':>9}")
    for n, row in inf["batches"].items():
        for engine in ("torch_eager", "ort_session", "ort_runtime"):
            print(f"{n:>5} {engine:<12} {row[engine]['p50_us']:9.1f} {row[engine]['p99_us']:9.1f}")
        print(f"{n:>5} {'speedup':<12} {row['speedup_p50']:8.2f}x  (torch eager / ORT runtime, p50)")
    if "isolated" in result:
        iso = result["isolated"]
        print(f"isolated round trip (batch {iso['batch']}): p50 {iso['p50_us']:.1f} µs, p99 {iso['p99_us']:.1f} µs, "
              f"child startup {iso['startup_s']:.2f} s")
    if "agent" in result:
        ag = result["agent"]
        print(f"agent per tick ({ag['ticks']} ticks): p50 {ag['agent_ms_p50']:.3f} ms vs env.step p50 "
              f"{ag['env_step_ms_p50']:.3f} ms -> overhead {100 * ag['overhead_ratio_p50']:.1f}%")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--no-isolated", action="store_true")
    p.add_argument("--no-agent", action="store_true")
    p.add_argument("--agent-seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"machine": machine(),
                              "inference": bench_inference(args.iters, tuple(args.batch), args.device)}
    if not args.no_isolated:
        result["isolated"] = bench_isolated(max(100, args.iters // 5))
    if not args.no_agent:
        result["agent"] = bench_agent_overhead(args.agent_seconds)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return result


if __name__ == "__main__":
    main()
