"""The log line on the wire: one ECS-style JSON object, as :mod:`driveloop.core.logfmt` writes it.

A vehicle ships its lines in a :class:`LogBatch` (``POST /v1/logs/batch`` on the ingest server, or
through the fleet's event stream); a collector may send OTLP/HTTP JSON instead
(:mod:`driveloop.contracts.otlp_logs` turns it into the same lines). Every line is validated here
before it is indexed: unknown fields, a malformed id or an unbounded value are refused, so the index
holds only what this schema allows. :func:`log_line_schema` is the JSON Schema the tests validate
every line of a drive and of both servers against.

``event.sequence`` is the vehicle's own line number (its log spool's): the index keeps one line per
(vehicle, sequence), so a batch sent twice after a lost acknowledgement is stored once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from driveloop.core.exceptions import ConfigError
from driveloop.core.ids import VEHICLE_ID_PATTERN
from driveloop.core.version import MODEL_VERSION_PATTERN

__all__ = ["LogLine", "LogBatch", "LogAck", "MAX_BATCH_LINES", "MAX_LINE_BYTES", "log_line_schema", "parse_line",
           "batch_items", "validate_lines", "Level", "LEVEL_RANK"]

Level = Literal["debug", "info", "warning", "error", "critical"]
LEVEL_RANK: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
MAX_BATCH_LINES = 2000  # per request: ~1 MB at the typical line size
MAX_LINE_BYTES = 32 * 1024  # a message (8 KiB) plus a stack trace (8 KiB) plus fields, with room
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"
_ACTION = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_Label = Annotated[str, Field(max_length=1024)] | int | float | bool | None


class LogLine(BaseModel):
    """One line. Field names are the ECS ones (aliases); Python code uses the snake_case names."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    timestamp: str = Field(alias="@timestamp", max_length=40,
                           pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
    level: Level = Field(alias="log.level")
    logger: str | None = Field(default=None, alias="log.logger", max_length=256)
    service: str = Field(alias="service.name", pattern=_NAME)
    message: str = Field(max_length=8192)
    action: str | None = Field(default=None, alias="event.action", pattern=_ACTION)
    sequence: int | None = Field(default=None, alias="event.sequence", ge=0, le=2**62)
    vehicle_id: str | None = Field(default=None, alias="vehicle.id", pattern=VEHICLE_ID_PATTERN)
    model_version: str | None = Field(default=None, alias="model.version", pattern=MODEL_VERSION_PATTERN)
    rollout_id: int | None = Field(default=None, alias="rollout.id", ge=1, le=2**31 - 1)
    fl_round: int | None = Field(default=None, alias="fl.round", ge=0, le=2**31 - 1)
    trace_id: str | None = Field(default=None, alias="trace.id", pattern=r"^[0-9a-f]{32}$")
    span_id: str | None = Field(default=None, alias="span.id", pattern=r"^[0-9a-f]{16}$")
    labels: dict[Annotated[str, Field(max_length=64)], _Label] | None = Field(default=None, max_length=32)
    error_type: str | None = Field(default=None, alias="error.type", max_length=256)
    error_message: str | None = Field(default=None, alias="error.message", max_length=8192)
    error_stack_trace: str | None = Field(default=None, alias="error.stack_trace", max_length=8192)

    @field_validator("timestamp")
    @classmethod
    def _real_time(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"not a timestamp: {e}") from e
        return v

    @property
    def time_s(self) -> float:
        """Seconds since the epoch (what the index sorts and filters on)."""
        return datetime.fromisoformat(self.timestamp.replace("Z", "+00:00")).timestamp()

    def to_json(self) -> dict[str, Any]:
        """The ECS object (aliases, absent fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class LogBatch(BaseModel):
    """What a vehicle sends: its lines, oldest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lines: list[LogLine] = Field(min_length=1, max_length=MAX_BATCH_LINES)


class LogAck(BaseModel):
    """The server's answer to a batch it read: lines stored now, lines it already had (a resend) and
    lines it refused (invalid, or another vehicle's), with the first refusal's reason. Every line of
    an answered batch is settled: the vehicle drops them all from its spool (a refused line would be
    refused again)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    rejected: int = Field(default=0, ge=0)
    error: str | None = Field(default=None, max_length=512)


def log_line_schema() -> dict[str, Any]:
    """The JSON Schema of one line (ECS names)."""
    return LogLine.model_json_schema(by_alias=True)


def parse_line(text: str | bytes) -> LogLine:
    """One JSON line → a validated :class:`LogLine`; anything else is a ConfigError naming the problem."""
    if len(text) > MAX_LINE_BYTES:
        raise ConfigError(f"log line longer than {MAX_LINE_BYTES} bytes")
    try:
        return LogLine.model_validate(json.loads(text))
    except ValueError as e:  # json's and pydantic's (ValidationError is a ValueError)
        raise ConfigError(f"invalid log line: {_first_error(e)}") from e


def batch_items(body: Any) -> list[Any] | None:
    """The items of a parsed ``{"lines": [...]}`` batch body of 1..``MAX_BATCH_LINES`` lines, or None when the
    body is not one (each item still unchecked: see :func:`validate_lines`)."""
    items = body.get("lines") if isinstance(body, dict) and set(body) == {"lines"} else None
    return items if isinstance(items, list) and 1 <= len(items) <= MAX_BATCH_LINES else None


def validate_lines(items: Sequence[Any]) -> tuple[list[LogLine], int, str | None]:
    """Each item judged on its own, so one bad line does not hold back its neighbours: (the valid lines, how
    many were refused, the first refusal as ``line <i>: <field>: <why>``)."""
    good: list[LogLine] = []
    rejected, error = 0, None
    for i, item in enumerate(items):
        try:
            good.append(LogLine.model_validate(item))
        except ValidationError as e:
            rejected += 1
            if error is None:
                err = e.errors()[0]
                error = f"line {i}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return good, rejected, error


def _first_error(e: ValueError) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(e).splitlines()[0]
