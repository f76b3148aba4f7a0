"""Mutation testing support: make ``driveloop.safety`` the mutated copy when mutmut runs the tests.

mutmut copies safety/ to mutants/safety/ and puts mutants/ first on sys.path, so the mutated package
imports as top-level ``safety`` with module names ``safety.<module>`` (which mutmut's trampolines
expect). The editable install would still resolve ``driveloop.safety`` to the original sources, so here,
and only under mutmut (it sets MUTANT_UNDER_TEST in every phase), the mutated modules are aliased.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path


def _alias_mutated_safety() -> None:
    if "MUTANT_UNDER_TEST" not in os.environ:
        return
    try:
        import safety
    except ImportError:
        return
    if "mutants" not in Path(safety.__file__).resolve().parts:
        return
    import driveloop

    sys.modules["driveloop.safety"] = safety
    driveloop.safety = safety  # type: ignore[attr-defined]
    for info in pkgutil.iter_modules(safety.__path__):
        sys.modules[f"driveloop.safety.{info.name}"] = importlib.import_module(f"safety.{info.name}")


_alias_mutated_safety()
