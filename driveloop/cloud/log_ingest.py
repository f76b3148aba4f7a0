"""Log lines into the index: the one place a batch is validated, attributed and stored.

Every path goes through :class:`LogIngest` — the ingest server's ``POST /v1/logs/batch`` (a vehicle's
spool), ``POST /v1/logs`` (OTLP/HTTP JSON from a collector or a vehicle), the embedded local cloud
(:class:`LocalLogSink`) and the event stream's consumer — so a line is judged the same whichever way
it came. Rules:

- each line is validated against ``contracts/logline.py``; an invalid one is refused and counted, its
  neighbours are still stored (one bad line must not hold back an AEB event);
- a vehicle speaks only for itself: a line naming another vehicle is refused, a line naming none is
  attributed to the sender; only an admin token (a collector) may send lines of any vehicle;
- a batch is answered only after its lines are stored (the vehicle then drops them).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from driveloop.cloud.logindex import LogIndex, LogQuery
from driveloop.contracts.logline import MAX_BATCH_LINES, LogAck, LogBatch, LogLine, batch_items, validate_lines
from driveloop.contracts.otlp_logs import otlp_to_lines
from driveloop.core.exceptions import AuthError, ConfigError, UploadRejectedError

__all__ = ["LogIngest", "LocalLogSink", "register_log_routes", "MAX_LOG_BODY_BYTES"]

logger = logging.getLogger(__name__)

MAX_LOG_BODY_BYTES = 4 * 2**20  # MAX_BATCH_LINES typical lines, with room


@dataclass
class LogStats:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ack: LogAck) -> None:
        with self.lock:
            self.accepted += ack.accepted
            self.duplicates += ack.duplicates
            self.rejected += ack.rejected
            self.batches += 1


class LogIngest:
    """Validates and stores lines for one sender at a time (see the module docstring)."""

    def __init__(self, index: LogIndex) -> None:
        self.index = index
        self.stats = LogStats()

    def _attribute(self, sender: str | None, line: LogLine) -> LogLine | str:
        if sender is None:
            return line
        if line.vehicle_id is None:
            return line.model_copy(update={"vehicle_id": sender})
        if line.vehicle_id != sender:
            return f"line of vehicle {line.vehicle_id!r} sent by {sender!r}"
        return line

    def accept(self, sender: str | None, lines: Sequence[LogLine], rejected: int = 0,
               error: str | None = None) -> LogAck:
        """Store already-validated ``lines`` of ``sender`` (None: a trusted collector)."""
        keep: list[LogLine] = []
        for line in lines:
            judged = self._attribute(sender, line)
            if isinstance(judged, str):
                rejected += 1
                error = error or judged
            else:
                keep.append(judged)
        stored = self.index.add(keep)
        ack = LogAck(accepted=stored.accepted, duplicates=stored.duplicates, rejected=rejected,
                     error=None if error is None else error[:500])
        self.stats.add(ack)
        if rejected:
            logger.info("log batch from %s: %d line(s) refused: %s", sender or "a collector", rejected, error)
        return ack

    def accept_json(self, sender: str | None, raw: bytes, guard: Callable[[bytes], object] | None = None) -> LogAck:
        """A ``{"lines": [...]}`` body: validated whole when it is all good (fast), else line by line.
        ``guard`` (e.g. a nesting-depth check) runs only before that slow path's recursive ``json.loads``:
        the fast path's parser bounds its own recursion, and a body it accepts is flat by the schema, so a
        byte-by-byte scan of every good batch (which cost the server a fifth of its time) is not needed."""
        try:
            return self.accept(sender, LogBatch.model_validate_json(raw).lines)
        except ValidationError:
            pass
        if guard is not None:
            guard(raw)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise UploadRejectedError(f"body is not JSON: {e}", status=422) from e
        items = batch_items(body)
        if items is None:
            raise UploadRejectedError(f"expected {{\"lines\": [1..{MAX_BATCH_LINES} log lines]}}", status=422)
        return self.accept(sender, *validate_lines(items))

    def accept_otlp(self, sender: str | None, body: Any) -> dict[str, Any]:
        """An OTLP ExportLogsServiceRequest; the OTLP answer (``partialSuccess`` when some were refused)."""
        parsed = otlp_to_lines(body)
        ack = self.accept(sender, parsed.lines, parsed.rejected, parsed.error)
        if not ack.rejected:
            return {}
        return {"partialSuccess": {"rejectedLogRecords": str(ack.rejected), "errorMessage": ack.error or ""}}


class LocalLogSink:
    """The embedded local cloud as a vehicle's log sink: the same :class:`LogIngest`, in-process."""

    def __init__(self, ingest: LogIngest) -> None:
        self.ingest = ingest

    def send(self, vehicle_id: str, lines: Sequence[str]) -> LogAck:
        return self.ingest.accept_json(vehicle_id, b'{"lines":[' + ",".join(lines).encode("utf-8") + b"]}")

    def close(self) -> None:
        pass


async def _body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_LOG_BODY_BYTES):
        raise UploadRejectedError(f"log body larger than {MAX_LOG_BODY_BYTES} bytes", status=413)
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_LOG_BODY_BYTES:
            raise UploadRejectedError(f"log body larger than {MAX_LOG_BODY_BYTES} bytes", status=413)
    return bytes(raw)


def register_log_routes(app: FastAPI, ingest: LogIngest, vehicle: Callable[[str | None], str],
                        admin: Callable[[str | None], str], nesting: Callable[[bytes], int], max_depth: int) -> None:
    """``POST /v1/logs/batch`` (vehicle token), ``POST /v1/logs`` (OTLP/HTTP JSON; vehicle or admin
    token), ``GET /v1/logs/search`` (admin token). ``vehicle``/``admin`` authenticate a header;
    ``nesting`` measures a body's depth before it is parsed (the server's own guard)."""

    def sender(authorization: str | None) -> str | None:
        """None for an admin (a collector may send any vehicle's lines), else the vehicle's id."""
        try:
            admin(authorization)
            return None
        except AuthError:
            return vehicle(authorization)

    def _shallow(raw: bytes) -> bytes:
        if nesting(raw) > max_depth:
            raise UploadRejectedError(f"JSON nested deeper than {max_depth} levels", status=422)
        return raw

    @app.post("/v1/logs/batch")
    async def log_batch(request: Request) -> JSONResponse:
        who = await run_in_threadpool(vehicle, request.headers.get("authorization"))
        ack = await run_in_threadpool(ingest.accept_json, who, await _body(request), _shallow)
        return JSONResponse(ack.model_dump())

    @app.post("/v1/logs")
    async def otlp_logs(request: Request) -> JSONResponse:
        who = await run_in_threadpool(sender, request.headers.get("authorization"))
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UploadRejectedError("only OTLP/HTTP JSON (Content-Type: application/json) is accepted", status=415)
        raw = _shallow(await _body(request))
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise UploadRejectedError(f"body is not JSON: {e}", status=400) from e
        try:
            answer = await run_in_threadpool(ingest.accept_otlp, who, body)
        except ConfigError as e:
            raise UploadRejectedError(str(e), status=400) from e
        return JSONResponse(answer)

    @app.get("/v1/logs/search")
    async def search(request: Request, q: str = "", vehicle_id: str | None = None, level: str | None = None,
                     since_s: float | None = None, rollout_id: int | None = None, limit: int = 100) -> JSONResponse:
        await run_in_threadpool(admin, request.headers.get("authorization"))
        query = LogQuery(text=q, vehicle=vehicle_id, level=level, since_s=since_s, rollout_id=rollout_id, limit=limit)
        return JSONResponse({"lines": await run_in_threadpool(ingest.index.search, query)})
