"""driveloop.safety — the rule-based safety layer: AEB, watchdog, actuator limits, arbitration.

Pure Python + numpy; imports nothing of driveloop except ``driveloop.exceptions``. See docs/SAFETY.md.
Public names are loaded lazily so importing the package stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SupervisorConfig": ".config",
    "AebConfig": ".config",
    "WatchdogConfig": ".config",
    "LimitsConfig": ".config",
    "FallbackConfig": ".config",
    "LaneConfig": ".config",
    "Supervisor": ".supervisor",
    "SupervisorState": ".supervisor",
    "step": ".supervisor",
    "SupervisorInputs": ".types",
    "ModelReply": ".types",
    "Decision": ".types",
    "Track": ".types",
    "TrackData": ".types",
    "FAULT_KINDS": ".types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
