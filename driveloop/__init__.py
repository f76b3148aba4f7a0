"""driveloop: an edge autonomous-driving data closed loop.

Subpackages (folders at the repo root): ``driveloop.safety``, ``driveloop.edge``, ``driveloop.cloud``,
``driveloop.federated``, ``driveloop.ota``. This top package holds the CLI, settings, the demo and the
shared error tree; importing it stays cheap (no heavy imports here).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
