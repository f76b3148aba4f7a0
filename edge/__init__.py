"""driveloop.edge — see DESIGN.md. Public API listed in __all__ (kept import-light)."""

from __future__ import annotations

__all__: list[str] = []

# Model runtime and isolation (lazy: onnxruntime loads only when these names are used).
_LAZY_RUNTIME_API = {
    "ModelRunner": "runtime", "ModelRuntime": "runtime", "load_runtime": "runtime",
    "IsolatedRuntime": "isolated", "FaultyRunner": "isolated", "Reply": "isolated",
}
__all__ += list(_LAZY_RUNTIME_API)


def __getattr__(name: str) -> object:
    if name in _LAZY_RUNTIME_API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_RUNTIME_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Recording: segment contract, recorder, triggers, spool (same lazy lookup as above).
_LAZY_RECORDING_API = {
    "TickRecord": "segment", "SegmentInfo": "segment", "validate_segment": "segment", "read_ticks": "segment",
    "scan_directory": "segment", "Recorder": "recorder", "Spool": "spool", "SpoolEntry": "spool",
    "TriggerSpec": "triggers", "TriggerEngine": "triggers", "compile_condition": "triggers",
}
_LAZY_RUNTIME_API.update(_LAZY_RECORDING_API)
__all__ += list(_LAZY_RECORDING_API)

# OTA client: A/B updater and resumable TUF fetcher (same lazy lookup; python-tuf loads on use).
_LAZY_OTA_CLIENT_API = {"VehicleUpdater": "updater", "Offer": "updater", "ResumableFetcher": "fetcher"}
_LAZY_RUNTIME_API.update(_LAZY_OTA_CLIENT_API)
__all__ += list(_LAZY_OTA_CLIENT_API)

# Simulated world: scenarios, simulator, sensors, perception (same lazy lookup; highway-env loads on use).
_LAZY_SIM_API = {
    "VehicleState": "world", "WorldSnapshot": "world", "lead_vehicle": "world", "gap_m": "world", "ttc_s": "world",
    "ScenarioSpec": "scenarios", "parse_scenario": "scenarios", "scenario_names": "scenarios",
    "CCR_CASES": "scenarios", "draw_mix": "scenarios", "SimConfig": "sim", "Simulator": "sim",
    "SensorConfig": "sensors", "SensorFrame": "sensors", "SensorSuite": "sensors", "observe": "sensors",
    "Track": "perception", "forward_track": "perception",
}
_LAZY_RUNTIME_API.update(_LAZY_SIM_API)
__all__ += list(_LAZY_SIM_API)

# Upload: transports and the spool uploader (same lazy lookup; httpx loads on use).
_LAZY_UPLOAD_API = {
    "UploadTransport": "transport", "UploadStatus": "transport", "HttpTransport": "transport",
    "LocalTransport": "transport", "make_transport": "transport", "campaign_triggers": "transport",
    "Uploader": "uploader", "BackoffPolicy": "uploader",
}
_LAZY_RUNTIME_API.update(_LAZY_UPLOAD_API)
__all__ += list(_LAZY_UPLOAD_API)

# Batched fleet sensing (same lazy lookup).
_LAZY_SENSING_API = {"SensorBatch": "sensors", "observe_batch": "sensors", "observe_suites": "sensors",
                     "sense_fleet": "agent"}
_LAZY_RUNTIME_API.update(_LAZY_SENSING_API)
__all__ += list(_LAZY_SENSING_API)
