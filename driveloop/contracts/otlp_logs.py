"""OTLP/HTTP JSON logs (``ExportLogsServiceRequest``) → driveloop log lines.

So that a standard OpenTelemetry collector can feed the log index (or replace the vehicles' own
shipping), ``POST /v1/logs`` accepts the OTLP JSON encoding: ``resourceLogs[].scopeLogs[].logRecords[]``
with ``AnyValue`` attributes, hex ``traceId``/``spanId``, nanosecond times as strings or numbers.

Mapping: ``service.name`` from the resource (``otlp`` when absent); ``vehicle.id``, ``model.version``,
``rollout.id``, ``fl.round``, ``event.action`` from the record's attributes, else the resource's; the
severity number (OTLP ranges 1-4 trace … 21-24 fatal) or text gives ``log.level``; the body is the
message (non-string bodies as JSON); the scope name is ``log.logger``; other scalar attributes become
``labels`` (at most 32). A record that does not make a valid line is counted as rejected, with the
first reason (OTLP's ``partialSuccess``); a body that is not an export request is a ConfigError.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from driveloop.contracts.logline import MAX_BATCH_LINES, LogLine
from driveloop.core.exceptions import ConfigError

__all__ = ["OtlpResult", "otlp_to_lines", "SEVERITY_LEVELS"]

# OTLP SeverityNumber ranges (1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN, 17-20 ERROR, 21-24 FATAL).
SEVERITY_LEVELS = ((1, "debug"), (9, "info"), (13, "warning"), (17, "error"), (21, "critical"))
_TEXT_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
                "error": "error", "fatal": "critical", "critical": "critical"}
_PROMOTED = {"vehicle.id": "vehicle.id", "model.version": "model.version", "rollout.id": "rollout.id",
             "fl.round": "fl.round", "event.action": "event.action"}
_MAX_LABELS = 32


@dataclass
class OtlpResult:
    lines: list[LogLine] = field(default_factory=list)
    rejected: int = 0
    error: str | None = None

    def reject(self, why: str) -> None:
        self.rejected += 1
        if self.error is None:
            self.error = why[:500]


def _value(v: Any) -> Any:
    """An OTLP ``AnyValue`` → a Python value (ints from their string encoding)."""
    if not isinstance(v, Mapping) or len(v) != 1:
        raise ValueError("an AnyValue has exactly one field")
    (kind, x), = v.items()
    if kind == "stringValue" and isinstance(x, str):
        return x
    if kind == "boolValue" and isinstance(x, bool):
        return x
    if kind == "intValue" and (isinstance(x, int) and not isinstance(x, bool) or isinstance(x, str) and x.lstrip("-").isdigit()):
        return int(x)
    if kind == "doubleValue" and isinstance(x, int | float) and not isinstance(x, bool):
        return float(x)
    if kind == "arrayValue" and isinstance(x, Mapping):
        return [_value(i) for i in x.get("values", [])]
    if kind == "kvlistValue" and isinstance(x, Mapping):
        return _attributes(x.get("values", []))
    if kind == "bytesValue" and isinstance(x, str):
        return x
    raise ValueError(f"unsupported AnyValue {kind!r}")


def _attributes(items: Any) -> dict[str, Any]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise ValueError("attributes must be a list of {key, value}")
    out: dict[str, Any] = {}
    for kv in items:
        if not isinstance(kv, Mapping) or not isinstance(kv.get("key"), str):
            raise ValueError("an attribute needs a string key")
        out[kv["key"]] = _value(kv.get("value", {"stringValue": ""}))
    return out


def _level(record: Mapping[str, Any]) -> str:
    number = record.get("severityNumber")
    if isinstance(number, str):  # the enum's name: SEVERITY_NUMBER_WARN
        text = number.removeprefix("SEVERITY_NUMBER_").rstrip("0123456789").lower()
        if text in _TEXT_LEVELS:
            return _TEXT_LEVELS[text]
        raise ValueError(f"unknown severityNumber {number!r}")
    if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 24:
        return [name for low, name in SEVERITY_LEVELS if number >= low][-1]
    if number not in (None, 0):
        raise ValueError(f"severityNumber must be 1..24, got {number!r}")
    text = str(record.get("severityText") or "info").lower()
    if text not in _TEXT_LEVELS:
        raise ValueError(f"unknown severityText {text!r}")
    return _TEXT_LEVELS[text]


def _timestamp(record: Mapping[str, Any], now_s: float) -> str:
    for key in ("timeUnixNano", "observedTimeUnixNano"):
        raw = record.get(key)
        if raw in (None, "", 0, "0"):
            continue
        if isinstance(raw, bool) or not (isinstance(raw, int) or isinstance(raw, str) and raw.isdigit()):
            raise ValueError(f"{key} must be an integer")
        ns = int(raw)
        if not 0 < ns < 2**63:
            raise ValueError(f"{key} out of range")
        return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return datetime.fromtimestamp(now_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(record: Any, resource: dict[str, Any], scope: str | None, now_s: float) -> LogLine:
    if not isinstance(record, Mapping):
        raise ValueError("a log record must be an object")
    attrs = _attributes(record.get("attributes"))
    body = record.get("body")
    message = "" if body is None else _value(body)
    fields: dict[str, Any] = {
        "@timestamp": _timestamp(record, now_s),
        "log.level": _level(record),
        "service.name": str(resource.get("service.name") or "otlp"),
        "message": message if isinstance(message, str) else json.dumps(message, default=str),
    }
    if scope:
        fields["log.logger"] = scope
    for key, target in _PROMOTED.items():
        value = attrs.pop(key, resource.get(key))
        if value is not None:
            fields[target] = str(value) if target == "model.version" else value
    for key, target in (("traceId", "trace.id"), ("spanId", "span.id")):
        value = record.get(key)
        if value:
            fields[target] = str(value).lower()
    labels = {k: v for k, v in attrs.items() if isinstance(v, str | int | float | bool)}
    if labels:
        fields["labels"] = dict(list(labels.items())[:_MAX_LABELS])
    return LogLine.model_validate(fields)


def otlp_to_lines(body: Any, now_s: float | None = None) -> OtlpResult:
    """The lines of an export request (see the module docstring); at most ``MAX_BATCH_LINES`` records."""
    now = time.time() if now_s is None else now_s
    if not isinstance(body, Mapping) or not isinstance(body.get("resourceLogs", []), list):
        raise ConfigError("not an OTLP ExportLogsServiceRequest: expected {\"resourceLogs\": [...]}")
    out = OtlpResult()
    seen = 0
    for rl in body.get("resourceLogs", []):
        if not isinstance(rl, Mapping) or not isinstance(rl.get("scopeLogs", []), list):
            raise ConfigError("resourceLogs[] must be objects with a scopeLogs list")
        try:
            resource = _attributes((rl.get("resource") or {}).get("attributes"))
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"bad resource attributes: {e}") from e
        for sl in rl.get("scopeLogs", []):
            if not isinstance(sl, Mapping) or not isinstance(sl.get("logRecords", []), list):
                raise ConfigError("scopeLogs[] must be objects with a logRecords list")
            scope = (sl.get("scope") or {}).get("name") if isinstance(sl.get("scope"), Mapping) else None
            for record in sl.get("logRecords", []):
                seen += 1
                if seen > MAX_BATCH_LINES:
                    raise ConfigError(f"more than {MAX_BATCH_LINES} log records in one request")
                try:
                    out.lines.append(_line(record, resource, scope if isinstance(scope, str) else None, now))
                except ValidationError as e:
                    err = e.errors()[0]
                    out.reject(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
                except (ValueError, TypeError, OverflowError) as e:
                    out.reject(str(e))
    return out
