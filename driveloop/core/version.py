"""The model-version rule, defined once for every layer.

The registry assigns model versions 1, 2, 3… across all names. The manifest holds the number; the
OTA wire, TUF target paths (``models/<version>/model.onnx``) and segment metadata carry its decimal
text. One rule serves them all, so "3", "03" and "v3" can never name three different things:

- a version is a whole number from 1 to ``MODEL_VERSION_MAX`` (nine digits: the wire pattern states
  the bound exactly, and every version fits a signed 32-bit SQL ``INTEGER`` on SQLite and PostgreSQL);
- its text form is canonical: ASCII digits, no sign, no leading zero, no prefix;
- people may type ``v3`` where the CLI always took it (registry refs); nothing on the wire may.

- ``MODEL_VERSION_REGEX`` / ``MODEL_VERSION_PATTERN``: the canonical text, bare and anchored (for
  pydantic ``Field(pattern=...)``).
- ``parse_model_version``: an int or decimal text (leading zeros and, with ``allow_prefix``, one
  ``v`` tolerated) → the number; anything else is a ConfigError, never an OverflowError.
- ``model_version_text``: the same input → the canonical text.
- ``check_model_version_text``: text that must already be canonical (a wire field, a target name).
"""

from __future__ import annotations

import re
from typing import NewType

from driveloop.core.exceptions import ConfigError

__all__ = [
    "MODEL_VERSION_MIN", "MODEL_VERSION_MAX", "MODEL_VERSION_REGEX", "MODEL_VERSION_PATTERN", "ModelVersion",
    "parse_model_version", "model_version_text", "check_model_version_text",
]

MODEL_VERSION_MIN = 1
MODEL_VERSION_MAX_DIGITS = 9
MODEL_VERSION_MAX = 10**MODEL_VERSION_MAX_DIGITS - 1
MODEL_VERSION_REGEX = rf"[1-9][0-9]{{0,{MODEL_VERSION_MAX_DIGITS - 1}}}"
MODEL_VERSION_PATTERN = rf"^{MODEL_VERSION_REGEX}$"

ModelVersion = NewType("ModelVersion", int)
"""A registry model version: an int already checked by :func:`parse_model_version`."""

_CANONICAL_RE = re.compile(MODEL_VERSION_REGEX)
_DIGITS_RE = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes '³' and '٣'
_RANGE = f"a whole number from {MODEL_VERSION_MIN} to {MODEL_VERSION_MAX}"


def _shown(value: object) -> str:
    """``value`` for an error message, cut short; a huge int is not printed (Python refuses > 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"of {value.bit_length()} bits"
    return f"{value!r:.40}"


def parse_model_version(value: object, *, allow_prefix: bool = False) -> ModelVersion:
    """``value`` (an int, or its decimal text; ``v3`` too when ``allow_prefix``) as a checked version.

    Raises ConfigError (one line) for bools, floats, signs, non-ASCII digits, 0 and out-of-range numbers.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value[1:] if allow_prefix and value[:1] in ("v", "V") else value
        if not _DIGITS_RE.fullmatch(text):
            hint = " (or v<number>)" if allow_prefix else ""
            raise ConfigError(f"invalid model version {_shown(value)}: use {_RANGE}{hint}")
        if len(text.lstrip("0")) > MODEL_VERSION_MAX_DIGITS:  # before int(): no 10 000-digit parse
            raise ConfigError(f"model version {_shown(value)} is too large: use {_RANGE}")
        number = int(text)
    else:
        raise ConfigError(f"invalid model version {_shown(value)}: use {_RANGE}")
    if number > MODEL_VERSION_MAX:  # no str(number): a 5000-digit int cannot even be printed
        raise ConfigError(f"model version {_shown(value)} is too large: use {_RANGE}")
    if number < MODEL_VERSION_MIN:
        raise ConfigError(f"invalid model version {_shown(value)}: use {_RANGE}")
    return ModelVersion(number)


def model_version_text(value: object, *, allow_prefix: bool = False) -> str:
    """The canonical text of ``value`` (``3`` / ``"03"`` → ``"3"``): what the wire and file names carry."""
    return str(parse_model_version(value, allow_prefix=allow_prefix))


def check_model_version_text(value: object) -> str:
    """Return ``value`` unchanged if it is canonical version text, else raise ConfigError (one line).

    For text that names something (a wire field, a TUF target), where ``"03"`` must not pass for ``"3"``.
    """
    if not isinstance(value, str):
        raise ConfigError(f"model version text must be a string, got {type(value).__name__} {_shown(value)}")
    if not _CANONICAL_RE.fullmatch(value):
        parse_model_version(value)  # the specific complaint: not a number, 0, too large…
        raise ConfigError(f"model version {_shown(value)} is not canonical: write it as {model_version_text(value)}")
    return value
