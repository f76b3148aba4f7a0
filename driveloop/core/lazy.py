"""Lazy public names for package ``__init__`` modules, so ``import driveloop.<pkg>`` stays light.

Heavy dependencies (torch, onnxruntime, Ray, Flower, highway-env) load only when a name that needs
them is first used. Each package declares one table ``{public name: submodule}`` and gets its
``__all__`` and module ``__getattr__`` (PEP 562) from :func:`lazy_exports`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package`` whose public names live in ``table``'s submodules."""
    names = dict(table)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)  # cached: the next access is a plain attribute
        return value

    return sorted(names), __getattr__
