"""Shipping a vehicle's log spool to the cloud, in batches, without losing a line.

The vehicle owns the Protocol (:class:`LogSink`) and the HTTPS implementation (:class:`HttpLogSink`,
``POST /v1/logs/batch`` on the ingest server with the vehicle's token); the embedded local cloud and
the fleet's event stream implement the same Protocol one layer up, and the composition picks one.

:class:`LogShipper` sends the spool's oldest lines (WARNING and above ahead of the rest, so a safety
event is not queued behind a backlog) and drops them only once the sink answered for
them (stored, already stored, or refused for good). A failure to reach the cloud (connection refused,
timeout, 5xx, 429) leaves every line in the spool for the next attempt, so a disconnect costs nothing
but time, as long as the spool's cap holds what the vehicle logs meanwhile. A resent batch (the answer
was lost) is stored once: the cloud keys lines by (vehicle, ``event.sequence``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from driveloop.contracts.logline import LogAck
from driveloop.core.exceptions import (
    AuthError,
    ConfigError,
    DriveloopError,
    QuotaExceededError,
    UploadError,
    UploadRejectedError,
)
from driveloop.edge.logspool import LogSpool
from driveloop.edge.transport import HttpTransport

__all__ = ["LogSink", "HttpLogSink", "LogShipper", "ShipResult", "BATCH_PATH", "batch_body"]

logger = logging.getLogger(__name__)

BATCH_PATH = "/v1/logs/batch"
DEFAULT_BATCH_LINES = 500
URGENT_LEVEL = "warning"  # lines at this level or above ship ahead of older, lower ones


class LogSink(Protocol):
    """Where a vehicle's lines go. ``send`` answers for every line of ``lines`` (JSON texts) or raises:
    UploadError / QuotaExceededError = not now (keep them), AuthError / UploadRejectedError = refused."""

    def send(self, vehicle_id: str, lines: Sequence[str]) -> LogAck: ...

    def close(self) -> None: ...


def batch_body(lines: Sequence[str]) -> bytes:
    """``{"lines": [...]}`` from already-rendered JSON lines (no parse and re-render on the vehicle)."""
    return b'{"lines":[' + ",".join(lines).encode("utf-8") + b"]}"


class HttpLogSink:
    """The ingest server's ``POST /v1/logs/batch`` with the vehicle's bearer token, over the vehicle's
    :class:`~driveloop.edge.transport.HttpTransport` (its TLS, token-URL check and status → error mapping).
    ``client`` may be injected (tests)."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0, ca_file: Path | str | None = None,
                 client: httpx.Client | None = None) -> None:
        self._http = HttpTransport(base_url, token, timeout_s, client=client, ca_file=ca_file)

    def send(self, vehicle_id: str, lines: Sequence[str]) -> LogAck:
        r = self._http.request("POST", BATCH_PATH, content=batch_body(lines),
                               headers={"Content-Type": "application/json"})
        try:
            return LogAck.model_validate(r.json())
        except ValueError as e:
            raise UploadError(f"POST {BATCH_PATH}: malformed answer {r.text[:200]!r}") from e

    def close(self) -> None:
        self._http.close()


@dataclass
class ShipResult:
    """One shipping pass: what went out and what the cloud answered; ``error`` when it stopped early
    (the lines it could not send are still in the spool)."""

    batches: int = 0
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "sent": self.sent, "accepted": self.accepted,
                "duplicates": self.duplicates, "rejected": self.rejected, "error": self.error}


class LogShipper:
    """Drains one vehicle's spool into a sink, ``batch_lines`` at a time (see the module docstring)."""

    def __init__(self, vehicle_id: str, spool: LogSpool, sink: LogSink, batch_lines: int = DEFAULT_BATCH_LINES) -> None:
        if batch_lines < 1:
            raise ConfigError(f"batch_lines must be >= 1, got {batch_lines}")
        self.vehicle_id, self.spool, self.sink, self.batch_lines = vehicle_id, spool, sink, batch_lines

    def ship(self, max_batches: int | None = None) -> ShipResult:
        """Send until the spool is empty, ``max_batches`` went out, or the sink fails."""
        result = ShipResult()
        while max_batches is None or result.batches < max_batches:
            # WARNING and above first: an AEB event must not wait behind a backlog of chatter (the cloud keys
            # lines by sequence number, so their order of arrival does not matter).
            pending = (self.spool.pending(self.batch_lines, min_level=URGENT_LEVEL)
                       or self.spool.pending(self.batch_lines))
            if not pending:
                break
            try:
                ack = self.sink.send(self.vehicle_id, [line for _, line in pending])
            except (UploadError, QuotaExceededError, AuthError, UploadRejectedError) as e:
                result.error = f"{type(e).__name__}: {e}"
                # Not at WARNING: a vehicle out of coverage is normal, and this line would itself be spooled.
                logger.info("log shipping of %s paused: %s (%d lines kept)", self.vehicle_id, e, len(pending))
                break
            except DriveloopError as e:
                result.error = f"{type(e).__name__}: {e}"
                break
            self.spool.ack([seq for seq, _ in pending])
            result.batches += 1
            result.sent += len(pending)
            result.accepted += ack.accepted
            result.duplicates += ack.duplicates
            result.rejected += ack.rejected
        return result
