"""The vehicle-id rule, defined once for every layer.

A vehicle id goes into file names (spool segments, the uploader's per-vehicle state folder), URLs,
cloud tokens (``<id>.<secret>``) and SQL rows, so it must be safe in all of them: 1 to 64 ASCII
characters from ``[A-Za-z0-9._-]``, the first a letter or digit. The first-character rule is what keeps
``.`` and ``..`` (path traversal), hidden files and option-like ``-x`` out.

- ``VEHICLE_ID_REGEX``: the bare rule, to embed in larger patterns (e.g. segment file names).
- ``VEHICLE_ID_PATTERN``: anchored, for pydantic ``Field(pattern=...)`` (pydantic's Rust regex reads
  ``$`` as end of text).
- ``is_vehicle_id`` / ``check_vehicle_id``: for Python code; they use ``fullmatch``, because Python's
  ``$`` would also accept a trailing newline.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from driveloop.core.exceptions import ConfigError

__all__ = ["VEHICLE_ID_MAX_CHARS", "VEHICLE_ID_REGEX", "VEHICLE_ID_PATTERN", "is_vehicle_id", "check_vehicle_id"]

VEHICLE_ID_MAX_CHARS = 64
VEHICLE_ID_REGEX = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{VEHICLE_ID_MAX_CHARS - 1}}}"
VEHICLE_ID_PATTERN = rf"^{VEHICLE_ID_REGEX}$"

_VEHICLE_ID_RE = re.compile(VEHICLE_ID_REGEX)


def is_vehicle_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a well-formed vehicle id (for callers that answer with their own error)."""
    return isinstance(value, str) and _VEHICLE_ID_RE.fullmatch(value) is not None


def check_vehicle_id(value: object) -> str:
    """Return ``value`` unchanged if it is a valid vehicle id, else raise ConfigError (one line)."""
    if not is_vehicle_id(value):
        raise ConfigError(f"invalid vehicle id {value!r:.80}: use 1-{VEHICLE_ID_MAX_CHARS} ASCII letters, "
                          "digits, '.', '_' or '-', starting with a letter or digit")
    return value
