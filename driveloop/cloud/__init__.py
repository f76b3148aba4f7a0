"""driveloop.cloud — ingest, catalog, store, the Ray data pipeline, training, the evaluation gate,
export and the model registry. See docs/ARCHITECTURE.md.

Imports core, contracts, safety, sim and edge; never ota or federated. Public names are lazy: torch,
Ray and fastapi load only when used.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "PolicyNet": "model", "PolicyConfig": "model", "LossWeights": "model", "loss": "model",
    "export_onnx": "export", "check_parity": "export", "Registry": "registry", "ModelArtifact": "registry",
    "ObjectStore": "store", "Catalog": "catalog", "SegmentRecord": "catalog", "SegmentQuery": "catalog",
    "Campaign": "campaigns", "CampaignSpec": "campaigns", "register_vehicle": "auth",
    "IngestConfig": "ingest_service", "IngestService": "ingest_service", "create_app": "ingest",
    "QuotaConfig": "quotas",
    "LocalTransport": "local_transport", "make_transport": "local_transport",
    "MiningConfig": "mining", "SegmentFrames": "mining", "LabelerConfig": "labeling", "label_segment": "labeling",
    "DatasetManifest": "datasets", "DatasetStore": "datasets", "FinetuneConfig": "train", "finetune": "train",
    "train_with_ray": "train", "ClassMetrics": "evaluation", "EvalSuite": "evaluation", "GateTolerances": "evaluation",
    "GateResult": "evaluation", "gate": "evaluation", "evaluate_model": "evaluation",
    "PipelineConfig": "pipeline", "PipelineReport": "pipeline", "run_pipeline": "pipeline",
    "gate_and_register": "pipeline",
})
