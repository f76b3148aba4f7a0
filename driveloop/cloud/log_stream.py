"""The cloud's LOGS consumer: vehicles' log batches from the event stream into the log index.

A durable pull consumer (``log-index`` on LOGS, ``log.>``) run by ``stream_sinks.run_consumer``, like the
event index: per-vehicle order over ``workers`` shards, ack after the handler ran, nak on a failure.
:class:`LogStreamService` hosts it (a context manager with its own thread and connection) wherever a
process wants it: a drive with a data plane, or ``driveloop logs consume`` as a service of its own.

Rules it keeps:
- A batch is checked whole before anything of it is stored (:func:`parse_log_batch`): at most
  ``MAX_LOG_BATCH_BYTES``, on a ``log.<vehicle>`` subject, a ``{"lines": [...]}`` body of 1..``MAX_BATCH_LINES``
  objects, each naming the subject's vehicle as ``vehicle.id``. The broker lets a vehicle publish only on its
  own subject, so the subject is the sender; a body naming another vehicle (or none) is forged or broken. A
  batch failing any of these is dropped, counted (``driveloop_stream_dropped_total{stream="LOGS",reason}``),
  logged and acked, so it never redelivers forever.
- Its lines are then judged by :class:`~driveloop.cloud.log_ingest.LogIngest`, as on the HTTPS path: a line
  failing the schema is refused and counted, its neighbours are stored (one bad line must not hold back an AEB
  event), idempotently on (vehicle, ``event.sequence``): a redelivery or a re-sent batch is stored once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError

from driveloop.cloud.broker import ensure_streams
from driveloop.cloud.log_ingest import LogIngest
from driveloop.cloud.logindex import LogIndex
from driveloop.cloud.stream_sinks import ConsumerSpec, KnownVehicle, Rejected, SinkRunner, StreamMetrics, sender_of
from driveloop.contracts.logline import MAX_BATCH_LINES, LogBatch, LogLine, batch_items, validate_lines
from driveloop.contracts.stream import MAX_LOG_BATCH_BYTES
from driveloop.core.exceptions import StreamError
from driveloop.edge.stream_client import nats_servers

__all__ = ["LOG_DURABLE", "StreamedBatch", "parse_log_batch", "log_consumer", "LogStreamService"]

logger = logging.getLogger(__name__)

LOG_DURABLE = "log-index"
LOG_WORKERS = 2  # SQLite takes one writer at a time: more shards only wait for its lock
LOG_FETCH_BATCH = 64  # batches per fetch (x 64 KiB at most): bounds what the consumer holds in memory


@dataclass(frozen=True)
class StreamedBatch:
    """A batch that passed the batch-level checks: its vehicle, its valid lines, and the lines refused."""

    vehicle_id: str
    lines: list[LogLine]
    rejected: int = 0
    error: str | None = None


def _names_vehicle(item: Any, vehicle: str) -> bool:
    return isinstance(item, dict) and item.get("vehicle.id") == vehicle


def parse_log_batch(subject: str, data: bytes, known: KnownVehicle | None = None) -> StreamedBatch | Rejected:
    """One LOGS message checked against its subject (see the module docstring); a Rejected instead of raising."""
    vehicle = sender_of(subject, data, MAX_LOG_BATCH_BYTES, known, prefix="log.")
    if isinstance(vehicle, Rejected):
        return vehicle
    try:  # the fast path: the whole batch valid, as a vehicle's own shipper writes it
        lines = LogBatch.model_validate_json(data).lines
    except ValidationError:
        return _parse_slowly(vehicle, data)
    for line in lines:
        if line.vehicle_id != vehicle:
            return Rejected("subject_mismatch", f"a line of {line.vehicle_id!r} on {subject[:100]}")
    return StreamedBatch(vehicle, list(lines))


def _parse_slowly(vehicle: str, data: bytes) -> StreamedBatch | Rejected:
    """A batch with at least one invalid line: the batch's shape and every line's vehicle still decide, the
    valid lines are kept and the invalid ones counted."""
    try:
        body = json.loads(data)
    except ValueError as e:
        return Rejected("malformed", f"log batch of {vehicle!r} is not JSON: {e}"[:300])
    items = batch_items(body)
    if items is None:
        return Rejected("malformed", f"log batch of {vehicle!r} is not {{\"lines\": [1..{MAX_BATCH_LINES} lines]}}")
    for item in items:
        if not _names_vehicle(item, vehicle):
            shown = item.get("vehicle.id") if isinstance(item, dict) else type(item).__name__
            return Rejected("subject_mismatch", f"a line of {shown!r:.80} in a batch of {vehicle!r}")
    return StreamedBatch(vehicle, *validate_lines(items))


class _Indexer:
    """The consumer's handler: each batch through :class:`LogIngest`, lines counted by outcome."""

    def __init__(self, ingest: LogIngest, metrics: StreamMetrics) -> None:
        self.ingest = ingest
        self.lines = Counter("driveloop_stream_log_lines", "Log lines from the LOGS stream by outcome", ["outcome"],
                             registry=metrics.registry)

    def __call__(self, batches: Sequence[StreamedBatch]) -> None:
        for b in batches:
            ack = self.ingest.accept(b.vehicle_id, b.lines, b.rejected, b.error)
            self.lines.labels("indexed").inc(ack.accepted)
            self.lines.labels("duplicate").inc(ack.duplicates)
            self.lines.labels("rejected").inc(ack.rejected)


def log_consumer(ingest: LogIngest, metrics: StreamMetrics, known: KnownVehicle | None = None,
                 workers: int = LOG_WORKERS) -> ConsumerSpec:
    """The LOGS durable consumer's spec for ``stream_sinks.SinkRunner``."""
    return ConsumerSpec(LOG_DURABLE, "LOGS", "log.>", _Indexer(ingest, metrics), workers=workers,
                        batch=LOG_FETCH_BATCH, parse=lambda subject, data: parse_log_batch(subject, data, known))


class LogStreamService:
    """The LOGS consumer feeding ``index``, in its own thread and connection (a context manager).

    ``ensure``: create the streams first (idempotent), for a process where nothing else did. :meth:`drain`
    waits until every batch stored in the stream so far was handled (a drive's end, ``logs consume --once``).
    """

    def __init__(self, url: str, index: LogIndex, user: str | None = None, password: str | None = None,
                 metrics: StreamMetrics | None = None, known: KnownVehicle | None = None, ensure: bool = True) -> None:
        self.url, self._user, self._password, self._ensure = url, user, password, ensure
        self.metrics = metrics or StreamMetrics()
        self.ingest = LogIngest(index)
        self._runner = SinkRunner(url, [log_consumer(self.ingest, self.metrics, known)], self.metrics, user, password)

    async def _connect(self) -> Any:
        import nats

        try:
            return await nats.connect(nats_servers(self.url), user=self._user, password=self._password,
                                      connect_timeout=5, max_reconnect_attempts=2, name="driveloop-log-stream")
        except Exception as e:  # noqa: BLE001 - one StreamError for the caller
            raise StreamError(f"log stream service: cannot connect to {self.url}: {type(e).__name__}: {e}") from e

    async def _ensure_streams(self) -> None:
        nc = await self._connect()
        try:
            await ensure_streams(nc.jetstream())
        finally:
            await nc.close()

    def start(self, timeout_s: float = 30.0) -> LogStreamService:
        if self._ensure:
            asyncio.run(asyncio.wait_for(self._ensure_streams(), timeout_s))
        self._runner.start(timeout_s)
        return self

    def stop(self) -> None:
        self._runner.stop()

    def __enter__(self) -> LogStreamService:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def _backlog(self) -> int:
        from nats.js.errors import NotFoundError

        nc = await self._connect()
        try:
            try:
                info = await nc.jetstream().consumer_info("LOGS", LOG_DURABLE)
            except NotFoundError:
                return -1  # the consumer is not created yet
            return int(info.num_pending + info.num_ack_pending)
        finally:
            await nc.close()

    def drain(self, timeout_s: float = 30.0, poll_s: float = 0.05) -> bool:
        """Wait until the consumer has nothing pending or unacknowledged (True), or ``timeout_s`` (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if asyncio.run(self._backlog()) == 0:
                    return True
            except StreamError as e:  # the broker is away: wait for it within the time given
                logger.info("log stream drain: %s", e)
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def stats(self) -> dict[str, Any]:
        """Batches and lines handled, and the batches dropped by reason (``logs consume``, a drive's summary)."""
        s = self.ingest.stats
        dropped = {dict(sample.labels)["reason"]: int(sample.value) for metric in self.metrics.dropped.collect()
                   for sample in metric.samples
                   if sample.name.endswith("_total") and dict(sample.labels).get("stream") == "LOGS"}
        return {"batches": s.batches, "indexed": s.accepted, "duplicates": s.duplicates, "rejected_lines": s.rejected,
                "dropped_batches": dropped}
