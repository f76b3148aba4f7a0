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
})
