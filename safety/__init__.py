"""driveloop.safety — see DESIGN.md. Public API listed in __all__ (kept import-light)."""

from __future__ import annotations

__all__: list[str] = []
