"""Shipping a vehicle's log spool to the cloud, in batches, without losing a line.

The vehicle owns the Protocol (:class:`LogSink`) and the HTTPS implementation (:class:`HttpLogSink`,
``POST /v1/logs/batch`` on the ingest server with the vehicle's token); the embedded local cloud and
the fleet's event stream implement the same Protocol one layer up, and the composition picks one.

:class:`LogShipper` sends the spool's oldest lines and drops them only once the sink answered for
them (stored, already stored, or refused for good). A failure to reach the cloud (connection refused,
timeout, 5xx, 429) leaves every line in the spool for the next attempt, so a disconnect costs nothing
but time, as long as the spool's cap holds what the vehicle logs meanwhile. A resent batch (the answer
was lost) is stored once: the cloud keys lines by (vehicle, ``event.sequence``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
from driveloop.core.tls import client_verify
from driveloop.core.tokens import check_token_url
from driveloop.edge.logspool import LogSpool

__all__ = ["LogSink", "HttpLogSink", "LogShipper", "ShipResult", "BATCH_PATH", "batch_body"]

logger = logging.getLogger(__name__)

BATCH_PATH = "/v1/logs/batch"
DEFAULT_BATCH_LINES = 500


class LogSink(Protocol):
    """Where a vehicle's lines go. ``send`` answers for every line of ``lines`` (JSON texts) or raises:
    UploadError / QuotaExceededError = not now (keep them), AuthError / UploadRejectedError = refused."""

    def send(self, vehicle_id: str, lines: Sequence[str]) -> LogAck: ...

    def close(self) -> None: ...


def batch_body(lines: Sequence[str]) -> bytes:
    """``{"lines": [...]}`` from already-rendered JSON lines (no parse and re-render on the vehicle)."""
    return b'{"lines":[' + ",".join(lines).encode("utf-8") + b"]}"


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    return str(body.get("error", body))[:200] if isinstance(body, Mapping) else str(body)[:200]


class HttpLogSink:
    """The ingest server's ``POST /v1/logs/batch`` with the vehicle's bearer token (HTTPS verified
    against ``ca_file``, or plain HTTP on loopback only). ``client`` may be injected (tests)."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0, ca_file: Path | str | None = None,
                 client: httpx.Client | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL must be http(s)://…, got {base_url!r}")
        if not token:
            raise ConfigError("a cloud token is required to ship logs over HTTP")
        if client is None:
            check_token_url(base_url, False)
            client = httpx.Client(timeout=timeout_s, verify=client_verify(ca_file))
        self._client = client
        self._url = base_url.rstrip("/") + BATCH_PATH
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def send(self, vehicle_id: str, lines: Sequence[str]) -> LogAck:
        try:
            r = self._client.post(self._url, content=batch_body(lines), headers=self._headers)
        except httpx.TransportError as e:
            raise UploadError(f"POST {BATCH_PATH}: {type(e).__name__}: {e}") from e
        if r.status_code in (401, 403):
            raise AuthError(f"POST {BATCH_PATH}: {_error_text(r)}", status=r.status_code)
        if r.status_code == 429:
            after = r.headers.get("Retry-After", "")
            raise QuotaExceededError(f"POST {BATCH_PATH}: {_error_text(r)}", int(after) if after.isdigit() else 60)
        if r.status_code >= 500:
            raise UploadError(f"POST {BATCH_PATH}: HTTP {r.status_code}: {_error_text(r)}")
        if r.status_code >= 400:
            raise UploadRejectedError(f"POST {BATCH_PATH}: HTTP {r.status_code}: {_error_text(r)}",
                                      status=r.status_code)
        try:
            return LogAck.model_validate(r.json())
        except ValueError as e:
            raise UploadError(f"POST {BATCH_PATH}: malformed answer {r.text[:200]!r}") from e

    def close(self) -> None:
        self._client.close()


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
            pending = self.spool.pending(self.batch_lines)
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
