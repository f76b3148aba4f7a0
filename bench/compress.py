"""Compressed variants vs their fp32 parent: ONNX Runtime p50/p99 per call at batch 1 and fleet batches.

The parent is the default ``PolicyNet`` (~74k parameters), the student the default ``StudentNet`` (distillation
shape, ~22.9k) and the INT8 graph the parent through ``cloud.quantize.quantize_int8`` (QDQ, per-channel,
calibrated on contract-shaped frames, a quarter of them flagged as events). Latency does not depend on what
the weights learned, so untrained weights measure the same shapes the CLI gates. Each variant is timed
against the parent in the same run, interleaved call by call (``cloud.latency_gate.measure_interleaved``),
one intra-op thread as on the vehicle; the ratio is the variant's over the parent's.

    python bench/compress.py [--iters 5000] [--batch 1 8 64] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _runtime(path: Path, version: int, device: str) -> Any:
    from driveloop.contracts.manifest import build_manifest
    from driveloop.edge.runtime import ModelRuntime

    return ModelRuntime(path, build_manifest(path, name="bench", version=version), device=device)


def bench(iters: int, batches: tuple[int, ...], device: str) -> dict[str, Any]:
    import torch

    from driveloop.cloud.compress import onnx_param_count
    from driveloop.cloud.compress_frames import Frames
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.latency_gate import LatencyGateConfig, judge_latency, measure_interleaved
    from driveloop.cloud.model import PolicyNet, StudentNet, example_inputs
    from driveloop.cloud.quantize import Int8Config, quantize_int8
    from driveloop.contracts import observation as C

    torch.set_num_threads(1)
    kin, lid, grid = (t.numpy() for t in example_inputs(512, seed=7))
    frames = Frames(kin, lid, grid, np.arange(512) % 4 == 0, np.ones(512, bool))
    feeds = {b: {n: t.numpy() for n, t in zip(C.INPUT_NAMES, example_inputs(b, seed=b))} for b in batches}
    gate_cfg = LatencyGateConfig(fleet_batch=max(batches), iters=iters)
    out: dict[str, Any] = {"iters": iters, "batches": list(batches), "device": device, "variants": {}}
    with tempfile.TemporaryDirectory() as d:
        parent_path = export_onnx(PolicyNet(), Path(d) / "parent.onnx")
        paths = {"student": export_onnx(StudentNet(), Path(d) / "student.onnx")}
        report = quantize_int8(parent_path, Path(d) / "int8.onnx", frames, Int8Config(), Path(d) / "int8work")
        paths["int8"] = Path(d) / "int8.onnx"
        out["params"] = {"parent": onnx_param_count(parent_path), **{k: onnx_param_count(p) for k, p in paths.items()}}
        out["size_bytes"] = {"parent": parent_path.stat().st_size, **{k: p.stat().st_size for k, p in paths.items()}}
        out["int8_excluded_nodes"] = report["excluded_nodes"]
        parent = _runtime(parent_path, 1, device)
        for i, (name, path) in enumerate(paths.items(), start=2):
            samples = measure_interleaved(parent, _runtime(path, i, device), feeds, iters, warmup=200)
            verdict = judge_latency(samples, gate_cfg)
            out["variants"][name] = verdict.as_dict()
    return out


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def _print(result: dict[str, Any]) -> None:
    print(f"machine: {result['machine']}")
    print(f"params: {result['params']}, size bytes: {result['size_bytes']}, "
          f"int8 nodes kept float: {result['int8_excluded_nodes'] or 'none'}")
    print(f"{'variant':<8} {'batch':>5} {'parent p50':>11} {'p50':>9} {'ratio':>6} {'parent p99':>11} {'p99':>9} "
          f"{'ratio':>6}  gate")
    for name, v in result["variants"].items():
        for n, b in v["batches"].items():
            ok = "ok" if all(b["checks"].values()) else "FAIL " + ",".join(k for k, x in b["checks"].items() if not x)
            print(f"{name:<8} {n:>5} {b['parent_p50_us']:11.1f} {b['variant_p50_us']:9.1f} {b['p50_ratio']:6.2f} "
                  f"{b['parent_p99_us']:11.1f} {b['variant_p99_us']:9.1f} {b['p99_ratio']:6.2f}  {ok}")
    print("(µs per call, ORT one intra-op thread; ratio = variant / parent, measured interleaved in this run; "
          "gate: p50 <= 0.8x and p99 <= 1.0x at every batch)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=5000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.device == "cuda":
        from driveloop.edge.runtime import cuda_works

        if not cuda_works():
            print("CUDA execution provider not usable here: skipping the cuda rows", file=sys.stderr)
            return {"skipped": "no working CUDA execution provider"}
    result = {"machine": machine(), **bench(args.iters, tuple(sorted(set(args.batch))), args.device)}
    result["machine_after"] = {"load_avg": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return result


if __name__ == "__main__":
    main()
