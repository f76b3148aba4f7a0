"""JSON output for ``--json`` flags: strict JSON (no NaN/Infinity), paths as strings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    return o


def dumps(obj: Any) -> str:
    """One line of strict JSON; non-finite floats become null."""
    return json.dumps(_clean(obj), allow_nan=False, default=str)
