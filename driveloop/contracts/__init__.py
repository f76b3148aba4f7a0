"""driveloop.contracts — everything that crosses a process or network boundary, defined once.

The observation/action tensor contract, the model manifest, the segment schema and metadata, the
tick record, upload status, and the fleet server's wire messages (health report, update offer).
Imports only ``driveloop.core`` (plus numpy, pydantic, mcap): no torch, onnxruntime or network.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "TensorSpec": "observation", "Observation": "observation", "io_contract": "observation",
    "ModelManifest": "manifest", "read_manifest": "manifest", "write_manifest": "manifest",
    "TickRecord": "segment", "SegmentMeta": "segment", "SegmentInfo": "segment", "validate_segment": "segment",
    "validate_segment_bytes": "segment", "read_ticks": "segment", "scan_directory": "segment",
    "UploadStatus": "upload",
    "HealthReport": "fleet", "UpdateOffer": "fleet",
})
