"""Compressed variants of a registered model: build one, gate it, register it with its parent recorded.

    parent (validated or released) -> fleet frames (catalog segments + the lineage's datasets)
    -> build: ``distill`` (a StudentNet trained on the parent graph's outputs, ONNX export + parity)
              or ``int8`` (ORT static QDQ quantization, per-channel, calibrated on frames with safety events)
    -> latency gate vs the fp32 parent, same run, same machine, interleaved (``latency_gate``)
    -> the closed-loop gate (``evaluation.gate``) against the model the parent itself was gated against
    -> registered as a variant {method, parent} of the parent: ``validated`` only if both gates passed,
       otherwise ``rejected`` with the measured reasons (a slower INT8 graph is rejected, not hidden).

Why the parent's own baseline: the variant replaces the parent on vehicles, so it must clear the same
bar the parent cleared (its base, its held-out suite). A root model has no base; its variants are judged
against the root itself, which asks them to do strictly better wherever the root needed the fallback.

The build methods are a table (``BUILDERS``); each returns the variant's ONNX file and what it measured.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.compress_frames import Frames, catalog_frames, dataset_frames, select_calibration
from driveloop.cloud.distill import DistillConfig
from driveloop.cloud.evaluation import EvalSuite, GateTolerances, gate
from driveloop.cloud.latency_gate import LatencyGateConfig, judge_latency, measure_interleaved
from driveloop.cloud.quantize import QUANT_OPS, Int8Config
from driveloop.contracts.manifest import VARIANT_METHODS
from driveloop.core.exceptions import ConfigError, PipelineError, RegistryError

logger = logging.getLogger(__name__)

COMPRESSIBLE_STAGES = ("validated", "released")


@dataclass(frozen=True)
class CompressConfig:
    home: Path
    catalog_url: str
    store_url: str
    registry_dir: Path
    max_segments: int = 64  # cataloged segments read for frames (half of them with safety events, if there are)
    suite: EvalSuite | None = None  # None: the suite the parent was gated on (its lineage), else the default
    tolerances: GateTolerances = field(default_factory=GateTolerances)
    latency: LatencyGateConfig = field(default_factory=LatencyGateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    int8: Int8Config = field(default_factory=Int8Config)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> CompressConfig:
        return cls(home=Path(settings.home), catalog_url=settings.resolved_catalog_url(),
                   store_url=settings.resolved_store_url(), registry_dir=Path(settings.registry_dir), **overrides)

    @property
    def cloud_dir(self) -> Path:
        return self.home / "cloud"


@dataclass
class CompressReport:
    variant: int
    method: str
    parent: int
    stage: str
    params: int
    parent_params: int
    size_bytes: int
    parent_size_bytes: int
    latency_ratio_b1: float
    latency_ratio_fleet: float
    fleet_batch: int
    gate: dict[str, Any]
    frames: dict[str, Any]
    build: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Built:
    """What a builder made: the variant's ONNX file and what it measured on the way."""

    onnx_path: Path
    info: dict[str, Any]
    training_run: dict[str, Any]
    state_dict: dict[str, Any] | None = None  # torch weights to keep beside it (a student), if any


def onnx_param_count(path: Path) -> int:
    """Elements of the weights and biases of the graph's Conv/Gemm/MatMul nodes (through a DequantizeLinear
    for an INT8 graph), so an fp32 graph and its INT8 form count alike (= ``count_params`` of the torch model)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    dq_src = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    total = 0
    for node in graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        for name in node.input[1:]:
            name = dq_src.get(name, name)
            if name in inits:
                total += int(np.prod(numpy_helper.to_array(inits[name]).shape))
    return total


def _build_distill(parent: Any, frames: Frames, config: CompressConfig, work_dir: Path) -> Built:
    from driveloop.cloud.distill import distill, teacher_outputs
    from driveloop.cloud.export import check_parity, export_onnx

    cfg = config.distill
    action, conf = teacher_outputs(parent.onnx_path, frames)
    student, metrics = distill(frames, action, conf, cfg)
    parent_params, params = onnx_param_count(parent.onnx_path), student.count_params()
    if params > cfg.max_param_ratio * parent_params:
        raise ConfigError(f"the student has {params} parameters, more than {cfg.max_param_ratio:.2f} of the parent's "
                          f"{parent_params}: choose smaller student widths")
    path = export_onnx(student, work_dir / "variant.onnx")
    parity = float(check_parity(student, path))
    info = {"student_config": asdict(cfg.student), "distill": metrics, "parity_max_abs": parity}
    return Built(path, info, {"kind": "distill", "config": cfg.to_dict(), "metrics": metrics},
                 {k: v.detach().clone() for k, v in student.state_dict().items()})


def _build_int8(parent: Any, frames: Frames, config: CompressConfig, work_dir: Path) -> Built:
    from driveloop.cloud.quantize import quantize_int8

    cfg = config.int8
    idx = select_calibration(frames, cfg.calibration_frames, cfg.event_share, cfg.seed)
    calib = frames.take(idx)
    report = quantize_int8(parent.onnx_path, work_dir / "variant.onnx", calib, cfg, work_dir / "int8")
    info = {"calibration": {"frames": len(calib), "event_frames": int(calib.event.sum()),
                            "event_segment_frames": int(calib.event_segment.sum())}, "int8": report}
    return Built(work_dir / "variant.onnx", info, {"kind": "int8", "config": cfg.to_dict()})


BUILDERS: dict[str, Callable[[Any, Frames, CompressConfig, Path], Built]] = {
    "distill": _build_distill,
    "int8": _build_int8,
}  # keys: the manifest's VARIANT_METHODS (a test holds them equal)


def check_method(method: str) -> str:
    if method not in BUILDERS or method not in VARIANT_METHODS:
        raise ConfigError(f"unknown compression method {method!r}; use one of: {', '.join(BUILDERS)}")
    return method


def suite_of(parent_manifest: Any) -> EvalSuite:
    """The held-out suite the parent was gated on (its lineage records it), else the default suite."""
    recorded = parent_manifest.lineage.get("eval_suite")
    if not recorded:
        return EvalSuite()
    try:
        return EvalSuite(classes={k: tuple(v) for k, v in recorded["classes"].items()},
                         vehicles_per_scenario=int(recorded["vehicles_per_scenario"]),
                         duration_s=float(recorded["duration_s"]), seed_base=int(recorded["seed_base"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"v{parent_manifest.version}'s recorded eval suite is malformed: {e!r}") from e


def _latency_feeds(frames: Frames, batches: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    """Recorded frames in each batch size (rows repeated when there are fewer frames than the batch)."""
    rows = np.resize(np.arange(len(frames)), max(batches))
    return {b: frames.batch(rows[:b]) for b in batches}


def _frames(parent: Any, registry: Any, config: CompressConfig, work_dir: Path) -> tuple[Frames, dict[str, Any]]:
    from_catalog, stats = catalog_frames(config.catalog_url, config.store_url, work_dir, config.max_segments)
    versions = [m.dataset_version for m in registry.lineage(parent.version) if m.dataset_version]
    from_datasets, used = dataset_frames(config.cloud_dir / "datasets", versions)
    frames = Frames.concat([from_catalog, from_datasets])
    if len(frames) == 0:
        raise PipelineError("no recorded frames in the catalog or the lineage's datasets: drive the fleet and "
                            "ingest segments first")
    return frames, {"catalog": stats, "datasets": used, "dataset_frames": len(from_datasets), "frames": len(frames)}


def compress(config: CompressConfig, parent_ref: int | str, method: str) -> CompressReport:
    """Build, gate and register one compressed variant of ``parent_ref`` (see module docstring)."""
    import torch

    from driveloop.cloud.checkpoints import save_weights
    from driveloop.cloud.pipeline import _cached_eval
    from driveloop.cloud.registry import Registry
    from driveloop.contracts.manifest import build_manifest
    from driveloop.edge.runtime import ModelRuntime

    check_method(method)
    torch.set_num_threads(1)
    if not (Path(config.registry_dir) / "registry.db").is_file():
        raise RegistryError(f"no model registry at {config.registry_dir}: run `driveloop bootstrap` first")
    registry = Registry(config.registry_dir)
    config.cloud_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="compress-", dir=config.cloud_dir))
    try:
        parent = registry.get(parent_ref)
        if parent.manifest.variant is not None:
            raise RegistryError(f"v{parent.version} is itself a {parent.manifest.variant.method} variant of "
                                f"v{parent.manifest.variant.parent}: compress v{parent.manifest.variant.parent}")
        if parent.stage not in COMPRESSIBLE_STAGES:
            raise RegistryError(f"v{parent.version} is {parent.stage!r}: only a validated or released model is compressed")
        frames, frame_stats = _frames(parent, registry, config, work_dir)
        built = BUILDERS[method](parent, frames, config, work_dir)
        provisional = build_manifest(built.onnx_path, name=parent.manifest.name, version=parent.version)

        lat_cfg = config.latency
        runtimes = (ModelRuntime(parent.onnx_path, parent.manifest, device="cpu"),
                    ModelRuntime(built.onnx_path, provisional, device="cpu"))
        samples = measure_interleaved(*runtimes, _latency_feeds(frames, lat_cfg.batches), lat_cfg.iters, lat_cfg.warmup)
        latency = judge_latency(samples, lat_cfg)

        suite = config.suite or suite_of(parent.manifest)
        base = registry.get(parent.manifest.parent_version) if parent.manifest.parent_version else parent
        cache = config.cloud_dir / "eval_cache"
        closed = gate(_cached_eval(cache, base.onnx_path, base.manifest, suite),
                      _cached_eval(cache, built.onnx_path, provisional, suite), config.tolerances)
        passed = latency.passed and closed.passed
        reasons = [f"latency: {r}" for r in latency.reasons] + [f"closed loop: {r}" for r in closed.reasons]
        gate_out = {"passed": passed, "latency": latency.as_dict(), "closed_loop": closed.as_dict(),
                    "baseline_version": base.version, "reasons": reasons}

        params, parent_params = onnx_param_count(built.onnx_path), onnx_param_count(parent.onnx_path)
        ratio_b1, ratio_fleet = latency.ratio(1), latency.ratio(lat_cfg.fleet_batch)
        manifest = registry.register(
            built.onnx_path, name=parent.manifest.name, parent_version=parent.version,
            dataset_version=parent.manifest.dataset_version, training_run=built.training_run,
            metrics={"gate": closed.as_dict(), "latency": latency.as_dict(), "latency_ratio_b1": ratio_b1,
                     "latency_ratio_fleet": ratio_fleet, "fleet_batch": lat_cfg.fleet_batch, "params": params,
                     "compress": built.info},
            lineage={"eval_suite": suite.to_dict(), "gate_baseline_version": base.version, "frames": frame_stats},
            variant={"method": method, "parent": parent.version},
        )
        if built.state_dict is not None:
            save_weights(config.registry_dir, manifest.sha256, built.state_dict)
        if passed:
            registry.set_stage(manifest.version, "validated", f"{method} variant of v{parent.version}: latency and "
                               "closed-loop gates passed")
        else:
            registry.set_stage(manifest.version, "rejected", "; ".join(reasons))
        return CompressReport(
            variant=manifest.version, method=method, parent=parent.version, stage="validated" if passed else "rejected",
            params=params, parent_params=parent_params, size_bytes=built.onnx_path.stat().st_size,
            parent_size_bytes=parent.onnx_path.stat().st_size, latency_ratio_b1=ratio_b1,
            latency_ratio_fleet=ratio_fleet, fleet_batch=lat_cfg.fleet_batch, gate=gate_out, frames=frame_stats,
            build=built.info,
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        registry.close()
