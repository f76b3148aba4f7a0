"""driveloop.edge — the vehicle: model runtime, control loop, fleet runner, recorder, spool, uploader,
OTA client. See docs/ARCHITECTURE.md.

Imports core, contracts, safety and sim; never the cloud, ota or federated packages (where it needs
the cloud — an upload transport — it owns the Protocol and the composition happens above it).
Public names are lazy: onnxruntime, python-tuf and httpx load only when used.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ModelRunner": "runtime", "ModelRuntime": "runtime",
    "IsolatedRuntime": "isolated", "FaultyRunner": "faults", "Reply": "isolated",
    "Recorder": "recorder", "Spool": "spool", "SpoolEntry": "spool",
    "TriggerSpec": "triggers", "TriggerEngine": "triggers", "compile_condition": "triggers",
    "VehicleUpdater": "updater", "Offer": "updater", "ResumableFetcher": "fetcher", "DirectorClient": "director_client",
    "UploadTransport": "transport", "HttpTransport": "transport", "campaign_triggers": "transport",
    "Uploader": "uploader", "BackoffPolicy": "uploader", "sense_fleet": "agent",
})
