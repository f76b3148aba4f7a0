"""The cloud data loop, one iteration: new segments -> a gated, registered candidate model.

    catalog (new segments) -> validate each file -> Ray Data (read_mcap -> mine + hindsight label per
    segment -> select hard + replay frames) -> dataset version (content-addressed, reused on reruns)
    -> Ray Train fine-tune from the current model's torch weights (resumable run dir)
    -> ONNX export + parity (<= 1e-4) -> closed-loop gate on the held-out suite (current vs candidate)
    -> register with lineage; candidate -> validated only if the gate passed (else rejected)
    -> mark the consumed segments in the catalog (only now, after everything succeeded).

Rules it keeps: a segment that fails validation is reported and skipped, never fed to Ray (one damaged
file would abort the whole Ray dataset); every stage is timed; a rerun on unchanged input reuses the
dataset version, the training run and cached evaluations instead of recomputing them; Ray Data and Ray
Train get disjoint CPUs (``_ray.cpu_split``) and the dataset is materialized before training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driveloop.cloud.evaluation import ClassMetrics, EvalSuite, GateTolerances, evaluate_models, gate
from driveloop.cloud.labeling import LABEL_VERSION, LabelerConfig
from driveloop.cloud.mining import MiningConfig
from driveloop.cloud.sim_exec import Execution, SimExecutor
from driveloop.cloud.train import FinetuneConfig
from driveloop.core.exceptions import DriveloopError, NoModelError, PipelineError, SegmentError, StorageError

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, str], None]  # (stage, "start" | "done" | "skipped")


@dataclass(frozen=True)
class PipelineConfig:
    """Where the loop reads and writes, and the settings of every stage."""

    home: Path
    catalog_url: str
    store_url: str
    registry_dir: Path
    ray_address: str | None = None
    num_cpus: int = 2
    base_ref: str | None = None  # registry ref of the current model; None: newest released, else validated
    mining: MiningConfig = field(default_factory=MiningConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    suite: EvalSuite = field(default_factory=EvalSuite)
    tolerances: GateTolerances = field(default_factory=GateTolerances)
    seed: int = 0
    max_segments: int | None = None
    sim_backend: str = "auto"  # the gate's episodes: auto (Ray when ray_address is set), ray or local

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> PipelineConfig:
        return cls(
            home=Path(settings.home), catalog_url=settings.resolved_catalog_url(), store_url=settings.resolved_store_url(),
            registry_dir=Path(settings.registry_dir), ray_address=settings.ray_address, num_cpus=settings.num_cpus,
            **{"sim_backend": getattr(settings, "sim_backend", "auto"), **overrides},
        )

    @property
    def cloud_dir(self) -> Path:
        return self.home / "cloud"


@dataclass
class PipelineReport:
    status: str = "ok"  # ok | no_new_segments
    segments_new: int = 0
    segments_used: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    base_version: int | None = None
    dataset_version: str | None = None
    dataset_reused: bool = False
    samples: int = 0
    hard_samples: int = 0
    replay_samples: int = 0
    labeler: dict[str, Any] = field(default_factory=dict)
    mining: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    parity_max_abs: float | None = None
    candidate: int | None = None
    candidate_stage: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)  # where the gate's episodes ran (sim_exec.Execution)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stages:
    """Times each stage and tells the progress display."""

    def __init__(self, report: PipelineReport, callback: StageCallback | None) -> None:
        self.report, self.callback = report, callback or (lambda stage, state: None)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.callback(name, "start")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.report.timings_s[name] = round(self.report.timings_s.get(name, 0.0) + time.perf_counter() - t0, 3)
        self.callback(name, "done")

    def mark(self, name: str) -> None:
        self.callback(name, "done")


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _validate(records: list[Any], store: Any, workdir: Path, report: PipelineReport) -> list[tuple[Path, str, str]]:
    """Local, validated copies of the new segments, ordered by what was recorded (vehicle, seed, start
    time, scenario), not by content hash: a segment's bytes carry wall-clock fields, and the dataset's
    row order and replay draw follow this order. Bad ones are reported and skipped."""
    from driveloop.contracts.segment import validate_segment

    good: list[tuple[tuple[Any, ...], Path, str, str]] = []
    for rec in records:
        try:
            if store.is_local:
                path = Path(store.url_of(rec.sha256))
            else:  # Ray and the validator read local files: copy the object down first
                path = workdir / f"{rec.sha256}.mcap"
                with open(path, "wb") as f:
                    store.copy_to(rec.sha256, f)
            info = validate_segment(path)
            if info.sha256 != rec.sha256:
                raise SegmentError(f"content sha256 {info.sha256[:12]}… differs from the catalog's {rec.sha256[:12]}…")
            m = info.meta
            good.append(((m.vehicle, m.seed, m.start_s, m.scenario, rec.sha256), path, rec.sha256, m.scenario))
        except (SegmentError, StorageError, OSError) as e:
            logger.warning("skipping segment %s: %s", rec.sha256[:12], e)
            report.rejected.append({"sha256": rec.sha256, "reason": str(e)})
    return [(path, sha, scenario) for _, path, sha, scenario in sorted(good, key=lambda g: g[0])]


def _cached_evals(cache_dir: Path, models: list[tuple[Path, Any]], suite: EvalSuite,
                  executor: SimExecutor | None = None) -> tuple[list[dict[str, ClassMetrics]], Execution]:
    """Closed-loop metrics of model files on the suite, cached by (model sha256, suite); the models not
    cached yet are evaluated together (on Ray they share the cluster). Returns the metrics in the order
    given and where the episodes ran (no units when every result came from the cache)."""
    from driveloop.core.atomic import write_atomic

    executor = executor or SimExecutor()
    paths = [cache_dir / f"{_digest({'model': m.sha256, 'suite': suite.to_dict()})[:24]}.json" for _, m in models]
    out: list[dict[str, ClassMetrics] | None] = [
        {k: ClassMetrics(**v) for k, v in json.loads(p.read_text()).items()} if p.is_file() else None for p in paths
    ]
    todo = [i for i, metrics in enumerate(out) if metrics is None]
    execution = Execution(executor.backend, 0, 0)
    if todo:
        run = evaluate_models([models[i] for i in todo], suite, executor)
        execution = run.execution
        for i, metrics in zip(todo, run.metrics):
            data = {k: {n: getattr(m, n) for n in ClassMetrics.__dataclass_fields__} for k, m in metrics.items()}
            write_atomic(paths[i], json.dumps(data).encode())
            out[i] = metrics
    return [m for m in out if m is not None], execution


def _cached_eval(cache_dir: Path, onnx_path: Path, manifest: Any, suite: EvalSuite) -> dict[str, ClassMetrics]:
    """Closed-loop metrics of one model file on the suite, cached by (model sha256, suite)."""
    return _cached_evals(cache_dir, [(onnx_path, manifest)], suite)[0][0]


@dataclass(frozen=True)
class ShippedCandidate:
    version: int
    stage: str  # "validated" (gate passed) or "rejected"
    gate: Any  # GateResult
    parity_max_abs: float
    execution: Execution | None = None  # where the gate's episodes ran


def gate_and_register(
    state: dict[str, Any],
    base: Any,
    registry: Any,
    *,
    registry_dir: Path,
    work_dir: Path,
    eval_cache_dir: Path,
    suite: EvalSuite,
    tolerances: GateTolerances,
    dataset_version: str | None,
    training_run: dict[str, Any],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    timer: Callable[[str], Any] | None = None,
    executor: SimExecutor | None = None,
) -> ShippedCandidate:
    """Fine-tuned weights -> ONNX (parity <= 1e-4) -> closed-loop gate vs ``base`` on the held-out suite ->
    registered candidate with lineage + torch weights; ``validated`` only if the gate passed, else
    ``rejected`` with the failed checks as the reason. Shared by the cloud pipeline and federated runs.
    ``executor`` runs the gate's episodes (``cloud.sim_exec``; default in-process)."""
    from contextlib import nullcontext

    from driveloop.cloud.checkpoints import save_weights
    from driveloop.cloud.export import check_parity, export_onnx
    from driveloop.contracts.manifest import build_manifest
    from driveloop.cloud.model import PolicyNet

    time_it = timer or (lambda name: nullcontext())
    with time_it("export"):
        model = PolicyNet()
        model.load_state_dict(state)
        onnx_path = export_onnx(model, Path(work_dir) / "candidate.onnx")
        parity = float(check_parity(model, onnx_path))
    with time_it("evaluate"):
        provisional = build_manifest(onnx_path, name=base.manifest.name, version=base.version)
        (baseline, candidate), execution = _cached_evals(
            eval_cache_dir, [(base.onnx_path, base.manifest), (onnx_path, provisional)], suite, executor)
        result = gate(baseline, candidate, tolerances)
    with time_it("register"):
        cand = registry.register(
            onnx_path, name=base.manifest.name, parent_version=base.version, dataset_version=dataset_version,
            training_run=training_run, metrics={**metrics, "gate": result.as_dict(), "parity_max_abs": parity},
            lineage={**lineage, "eval_suite": suite.to_dict()},
        )
        save_weights(registry_dir, cand.sha256, state)
        if result.passed:
            registry.set_stage(cand.version, "validated", "closed-loop gate passed")
        else:
            registry.set_stage(cand.version, "rejected", "gate failed: " + "; ".join(result.reasons))
    return ShippedCandidate(cand.version, "validated" if result.passed else "rejected", result, parity, execution)


def run_pipeline(config: PipelineConfig, on_stage: StageCallback | None = None) -> PipelineReport:
    """Run one iteration of the loop (see module docstring); returns what it did and measured."""
    import torch

    from driveloop.cloud._dataset_build import build_arrays_with_ray
    from driveloop.cloud.ray_runtime import cpu_split, ensure_ray
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.checkpoints import load_weights
    from driveloop.cloud.datasets import DatasetManifest, DatasetStore, code_version
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.store import ObjectStore
    from driveloop.cloud.train import train_with_ray

    torch.set_num_threads(1)
    report = PipelineReport()
    stage = _Stages(report, on_stage)
    catalog = Catalog(config.catalog_url)
    registry = Registry(config.registry_dir)
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-", dir=config.cloud_dir if config.cloud_dir.is_dir() else None))
    try:
        with stage("discover"):
            records = catalog.new_segments(limit=config.max_segments)
            report.segments_new = len(records)
        if not records:
            report.status = "no_new_segments"
            return report
        with stage("validate"):
            segments = _validate(records, ObjectStore(config.store_url), workdir, report)
            report.segments_used = len(segments)
        if not segments:
            raise PipelineError(f"none of the {len(records)} new segments is valid (see the rejected list)")
        try:
            base = registry.learning_base(config.base_ref)  # resolve(), a variant → its parent
        except NoModelError as e:
            raise PipelineError("no released or validated model to fine-tune from "
                                "(run `driveloop bootstrap` first)") from e
        report.base_version = base.version
        base_weights = load_weights(config.registry_dir, base.manifest)

        manifest = DatasetManifest(
            segments=tuple(sha for _, sha, _ in segments), label_version=LABEL_VERSION, code_version=code_version(),
            base_model_version=base.version,
            selection={"mining": asdict(config.mining), "labeler": asdict(config.labeler), "seed": config.seed},
        )
        split = cpu_split(config.num_cpus)
        store = DatasetStore(config.cloud_dir / "datasets")

        def produce() -> tuple[Any, Any]:
            ensure_ray(config.ray_address, config.num_cpus)
            return build_arrays_with_ray(segments, config.mining, config.labeler, config.seed, split.data_cpus,
                                         on_step=lambda name: stage.mark(f"dataset.{name}"))

        with stage("dataset"):
            dataset, report.dataset_reused = store.build(manifest, produce)
        report.dataset_version = dataset.version
        report.samples = dataset.samples
        report.hard_samples = int(dataset.stats.get("hard", 0))
        report.replay_samples = int(dataset.stats.get("replay", 0))
        report.labeler = dict(dataset.stats.get("labeler", {}))
        report.mining = {k: dataset.stats.get(k) for k in ("frames", "events_by_scenario", "top_segments")}
        if not report.dataset_reused:  # the Ray Data sub-stages inside "dataset"
            report.timings_s.update({f"dataset.{k}": v for k, v in dataset.stats.get("timings_s", {}).items()})

        run_id = f"{dataset.manifest.digest[:16]}-{_digest(config.finetune.to_dict())[:8]}"
        run_dir = config.cloud_dir / "runs" / run_id
        with stage("train"):
            final = run_dir / "checkpoints" / "final.pt"
            if final.is_file():  # this exact run already finished: reuse its output
                out = torch.load(final, weights_only=False)
                state, train_metrics = out["state"], out["metrics"]
            else:
                ensure_ray(config.ray_address, config.num_cpus)
                state, train_metrics = train_with_ray(base_weights, dataset.path / "arrays.npz", config.finetune, run_dir,
                                                      cpus_per_worker=split.cpus_per_train_worker)
        report.training = {k: v for k, v in train_metrics.items() if k != "history"} | {"run_id": run_id}

        shipped = gate_and_register(
            state, base, registry, registry_dir=config.registry_dir, work_dir=run_dir,
            eval_cache_dir=config.cloud_dir / "eval_cache", suite=config.suite, tolerances=config.tolerances,
            dataset_version=dataset.version,
            training_run={"run_id": run_id, "config": config.finetune.to_dict(), "metrics": report.training},
            metrics={"labeler": report.labeler},
            lineage={"base_version": base.version, "dataset_digest": dataset.manifest.digest, "segments": len(segments),
                     "label_version": LABEL_VERSION, "code_version": dataset.manifest.code_version},
            timer=stage,
            executor=SimExecutor.choose(config.sim_backend, config.ray_address, config.num_cpus),
        )
        report.parity_max_abs, report.gate = shipped.parity_max_abs, shipped.gate.as_dict()
        report.execution = shipped.execution.to_dict() if shipped.execution else {}
        report.candidate, report.candidate_stage = shipped.version, shipped.stage
        with stage("register"):
            catalog.mark_consumed([sha for _, sha, _ in segments], dataset.version)
        return report
    except DriveloopError:
        raise
    except Exception as e:  # a third-party failure inside a stage: one clear pipeline error
        raise PipelineError(f"pipeline failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        catalog.close()
        registry.close()
