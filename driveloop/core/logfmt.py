"""One structured log format for every driveloop process: ECS-style JSON lines, plus a readable
rendering for a terminal.

Rules it keeps:

- **One line, one JSON object**, with ECS field names (``@timestamp``, ``log.level``, ``log.logger``,
  ``service.name``, ``event.action``, ``vehicle.id``, ``model.version``, ``rollout.id``, ``fl.round``,
  ``trace.id``, ``span.id``, ``message``); the wire schema is ``contracts/logline.py``. Absent context
  is absent, never ``null``.
- **Context comes from where the work runs**, not from each call: the vehicle loop, the pipeline, the
  rollout and FL rounds bind their ids with :func:`log_context` (a ``contextvars`` variable, so threads
  and asyncio tasks each see their own) and every line logged inside carries them.
- **No secret in any line.** Every string that goes into a line passes :func:`redact`: bearer
  credentials, ``token=…``-style assignments, URL passwords, PEM private keys and random-looking
  base64url runs (a token's shape) are replaced before the line exists.
- Stdlib ``logging`` only: the existing ``logging.getLogger(__name__)`` calls need no change; a safety
  activation or other *event* says so with :func:`log_event` (``event.action``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = ["CONTEXT_FIELDS", "LEVELS", "log_context", "bind", "unbind", "current_context", "log_event",
           "redact", "ecs_fields", "render_json", "JsonFormatter", "ConsoleFormatter", "new_trace_id",
           "new_span_id", "level_name", "LIVE_STDERR"]

# Context keyword -> ECS field. The keywords are what code binds (``log_context(vehicle_id=…)``).
CONTEXT_FIELDS: Mapping[str, str] = MappingProxyType({
    "vehicle_id": "vehicle.id",
    "model_version": "model.version",
    "rollout_id": "rollout.id",
    "fl_round": "fl.round",
    "trace_id": "trace.id",
    "span_id": "span.id",
})
LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_MESSAGE_CHARS = 8192  # one line, not a dump: longer messages are cut (the schema's bound)
_EXTRA_KEY = "driveloop_ecs"  # where log_event puts its fields on a LogRecord

_context: ContextVar[Mapping[str, Any]] = ContextVar("driveloop_log_context", default=MappingProxyType({}))


def _check_context(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"unknown log context field(s) {sorted(unknown)}; known: {sorted(CONTEXT_FIELDS)}")
    out = {k: v for k, v in fields.items() if v is not None}
    if "model_version" in out:  # the wire carries the canonical text ("3"), whoever bound an int
        out["model_version"] = str(out["model_version"])
    return out


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add ``fields`` to the current context (until :func:`unbind` of the returned token)."""
    return _context.set(MappingProxyType({**_context.get(), **_check_context(fields)}))


def unbind(token: Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside the block (in this thread or task) carries ``fields``."""
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, Any]:
    return _context.get()


def new_trace_id() -> str:
    """A W3C trace id: 16 random bytes, lowercase hex (what OTLP and ECS ``trace.id`` carry)."""
    return secrets.token_hex(16)


def new_span_id() -> str:
    """A W3C span id: 8 random bytes, lowercase hex."""
    return secrets.token_hex(8)


def log_event(logger: logging.Logger, level: int, action: str, message: str, *args: Any,
              labels: Mapping[str, str | int | float | bool] | None = None, **context: Any) -> None:
    """Log an *event* (``event.action`` = ``action``, e.g. ``aeb``): searchable by its action, with
    ``labels`` (small scalar facts: ``ttc_s``…) and extra context for this line only."""
    if not logger.isEnabledFor(level):
        return
    ecs: dict[str, Any] = {"event.action": action}
    for k, v in _check_context(context).items():
        ecs[CONTEXT_FIELDS[k]] = v
    if labels:
        ecs["labels"] = dict(labels)
    logger.log(level, message, *args, extra={_EXTRA_KEY: ecs}, stacklevel=2)


# -- secrets ------------------------------------------------------------------------------------------
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")  # RFC 6750 token68: a word is not one
_ASSIGNED = re.compile(r"(?i)\b((?:[a-z_]*_)?(?:token|secret|password|passwd|api[_-]?key))(\s*[=:]\s*)"
                       r"(?!\[REDACTED\])[^\s\"',;&]+")
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^/\s:@]+):[^@\s/]+@", re.IGNORECASE)
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL)
_RUN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])")


def _looks_random(run: str) -> bool:
    """A token's shape: base64url with upper case, lower case and digits (identifiers, metric names,
    hex digests and paths do not mix all three)."""
    return any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``[REDACTED]`` (see the module's rules)."""
    if len(text) < 16:  # nothing shorter can hold a token worth hiding (tokens are >= 16 characters)
        return text
    text = _PEM.sub("[REDACTED KEY]", text)
    text = _BEARER.sub(r"\1 [REDACTED]", text)
    text = _ASSIGNED.sub(r"\1\2[REDACTED]", text)
    text = _URL_PASSWORD.sub(r"\1:[REDACTED]@", text)
    return _RUN.sub(lambda m: "[REDACTED]" if _looks_random(m.group(0)) else m.group(0), text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None  # strict JSON
    return redact(str(value))


# -- records -> fields ----------------------------------------------------------------------------------
def level_name(levelno: int) -> str:
    """``log.level`` of a stdlib level number (custom levels round down to the nearest known one)."""
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def _timestamp(created_s: float) -> str:
    return datetime.fromtimestamp(created_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ecs_fields(record: logging.LogRecord, service: str) -> dict[str, Any]:
    """The line's fields for ``record``, context and secrets applied (the schema's shape)."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError) as e:  # a bad %-format in a log call must not lose the line
        message = f"{record.msg!r} (unformattable args: {e})"
    out: dict[str, Any] = {
        "@timestamp": _timestamp(record.created),
        "log.level": level_name(record.levelno),
        "log.logger": record.name,
        "service.name": service,
        "message": redact(message[:MAX_MESSAGE_CHARS]),
    }
    for key, value in _context.get().items():
        out[CONTEXT_FIELDS[key]] = _clean(value)
    extra = getattr(record, _EXTRA_KEY, None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            if key == "labels":
                out["labels"] = {str(k)[:64]: _clean(v) for k, v in value.items()}
            else:
                out[key] = _clean(value)
    if record.exc_info and record.exc_info[0] is not None:
        etype, evalue, tb = record.exc_info
        out["error.type"] = etype.__name__
        out["error.message"] = redact(str(evalue))[:MAX_MESSAGE_CHARS]
        out["error.stack_trace"] = redact("".join(traceback.format_exception(etype, evalue, tb)))[-MAX_MESSAGE_CHARS:]
    return out


def render_json(fields: Mapping[str, Any]) -> str:
    """One line of strict JSON (no NaN, no newline inside)."""
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)


class JsonFormatter(logging.Formatter):
    """Formats a record as one ECS JSON line for ``service``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        return render_json(ecs_fields(record, self.service))


_CONSOLE_SKIP = ("@timestamp", "log.level", "log.logger", "service.name", "message", "error.stack_trace")


class ConsoleFormatter(logging.Formatter):
    """A terminal line: ``14:02:07 WARNING edge.agent: aeb activation  vehicle.id=veh003 …`` (the
    same fields as the JSON line, secrets redacted alike; the traceback follows when there is one)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        f = ecs_fields(record, self.service)
        clock = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        name = record.name.removeprefix("driveloop.")
        extras = "  ".join(f"{k}={v}" for k, v in f.items() if k not in _CONSOLE_SKIP and not k.startswith("error."))
        line = f"{clock} {f['log.level'].upper()} {name}: {f['message']}" + (f"  {extras}" if extras else "")
        if "error.stack_trace" in f:
            line += "\n" + f["error.stack_trace"].rstrip()
        return line


class _LiveStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is *now* (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


LIVE_STDERR = _LiveStderr
