"""driveloop.core — the lowest layer: the error tree, all-or-nothing file writes, identifiers.

Imports nothing of driveloop and no heavy dependency (no torch, onnxruntime, Ray, Flower, network),
so every other package may use it. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "DriveloopError": "exceptions",
    "write_atomic": "atomic", "fsync_dir": "atomic", "file_sha256": "atomic", "FileOps": "atomic",
    "lazy_exports": "lazy",
    "VEHICLE_ID_PATTERN": "ids", "is_vehicle_id": "ids", "check_vehicle_id": "ids",
    "ModelVersion": "version", "MODEL_VERSION_PATTERN": "version", "parse_model_version": "version",
    "model_version_text": "version", "check_model_version_text": "version",
    "new_token": "tokens", "hash_token": "tokens", "verify_token": "tokens", "parse_bearer": "tokens",
})
