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
