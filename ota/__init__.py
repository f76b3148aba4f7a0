"""driveloop.ota — see DESIGN.md. Public API listed in __all__ (kept import-light)."""

from __future__ import annotations

__all__: list[str] = []

# Signed releases (lazy: python-tuf loads only when these names are used).
_LAZY_RELEASE_API = {"ReleaseService": "release", "TargetInfo": "release", "RepoPolicy": "_tuf_repo", "KeyStore": "keys"}
__all__ += list(_LAZY_RELEASE_API)


def __getattr__(name: str) -> object:
    if name in _LAZY_RELEASE_API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_RELEASE_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
