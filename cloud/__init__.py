"""driveloop.cloud — see DESIGN.md. Public API listed in __all__ (kept import-light)."""

from __future__ import annotations

__all__: list[str] = []

# Policy model, export and registry (lazy: torch/onnx load only when these names are used).
_LAZY_MODEL_API = {
    "PolicyNet": "model", "PolicyConfig": "model", "LossWeights": "model", "loss": "model",
    "export_onnx": "export", "check_parity": "export",
    "ModelManifest": "manifest", "read_manifest": "manifest", "write_manifest": "manifest", "sha256_file": "manifest",
    "Registry": "registry", "ModelArtifact": "registry",
}
__all__ += list(_LAZY_MODEL_API)


def __getattr__(name: str) -> object:
    if name in _LAZY_MODEL_API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_MODEL_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Backflow: object store, catalog, campaigns, vehicle auth, ingest (same lazy lookup; fastapi loads on use).
_LAZY_BACKFLOW_API = {
    "ObjectStore": "store", "Catalog": "catalog", "SegmentRecord": "catalog", "SegmentQuery": "catalog",
    "Campaign": "campaigns", "CampaignSpec": "campaigns", "register_vehicle": "auth",
    "IngestConfig": "ingest", "IngestService": "ingest", "create_app": "ingest",
}
_LAZY_MODEL_API.update(_LAZY_BACKFLOW_API)
__all__ += list(_LAZY_BACKFLOW_API)

# Data loop: mining, hindsight labels, dataset versions, fine-tune, gate, pipeline (lazy: ray/torch on use).
_LAZY_PIPELINE_API = {
    "MiningConfig": "mining", "SegmentFrames": "mining", "LabelerConfig": "labeling", "label_segment": "labeling",
    "DatasetManifest": "datasets", "DatasetStore": "datasets", "FinetuneConfig": "train", "finetune": "train",
    "train_with_ray": "train", "ClassMetrics": "evaluation", "EvalSuite": "evaluation", "GateTolerances": "evaluation",
    "GateResult": "evaluation", "gate": "evaluation", "evaluate_model": "evaluation",
    "PipelineConfig": "pipeline", "PipelineReport": "pipeline", "run_pipeline": "pipeline",
    "gate_and_register": "pipeline",
}
_LAZY_MODEL_API.update(_LAZY_PIPELINE_API)
__all__ += list(_LAZY_PIPELINE_API)
