"""driveloop.safety — the rule-based safety layer: AEB, watchdog, actuator limits, arbitration.

Pure Python + numpy; imports nothing of driveloop but ``driveloop.core``. See docs/SAFETY.md.
Public names are loaded lazily so importing the package stays light.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "SupervisorConfig": "config", "AebConfig": "config", "WatchdogConfig": "config", "LimitsConfig": "config",
    "FallbackConfig": "config", "LaneConfig": "config", "AdvisoryConfig": "config", "Advisory": "types",
    "Supervisor": "supervisor", "SupervisorState": "supervisor", "step": "supervisor",
    "SupervisorInputs": "types", "ModelReply": "types", "Decision": "types", "Track": "types", "TrackData": "types",
    "SideTrack": "types", "FAULT_KINDS": "types",
})
