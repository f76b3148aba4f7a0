"""The cloud's stream consumers: durable pull consumers that turn the fleet's live stream into an event
index in the catalog and live metrics in Prometheus, plus the queries campaigns and the pipeline ask.

Rules it keeps:
- Every message crossing in is checked (:func:`parse_message`): malformed, oversized, wrong-subject,
  subject/body mismatch and unknown-vehicle messages are dropped, counted (``driveloop_stream_dropped_total``
  by reason), logged and acked, so they never redeliver forever.
- Per-vehicle order with parallel workers: one durable consumer per service, its messages dealt to
  ``workers`` shards by vehicle (:func:`shard_of`), each shard handling its vehicles in stream order.
- A message is acked only after its handler ran; a handler failure naks it for redelivery. The event index
  is keyed on (vehicle, seq), so a redelivery, a spool replay or a duplicate outside the broker's de-dup
  window is indexed once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from driveloop.cloud.broker import fetch_prompt
from driveloop.cloud.catalog import Catalog, StreamEventRecord
from driveloop.cloud.shift import (
    ApprovalPolicy,
    Baseline,
    LiveShift,
    ShiftAlert,
    ShiftPolicy,
    open_campaign,
    stream_class_events,
    threshold_per_hour,
)
from driveloop.contracts.stream import (
    MAX_MESSAGE_BYTES,
    Telemetry,
    VehicleEvent,
    decode_event,
    decode_telemetry,
    telemetry_subject,
    vehicle_of_subject,
)
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, StorageError, StreamError
from driveloop.core.loop_thread import LoopThread
from driveloop.edge.stream_client import nats_servers

logger = logging.getLogger(__name__)

Parsed = Telemetry | VehicleEvent
KnownVehicle = Callable[[str], bool]
Handler = Callable[[list[Parsed]], None]  # blocking (database): run in a worker thread


@dataclass(frozen=True)
class Rejected:
    """Why a message was dropped: ``reason`` is the metric label, ``detail`` the log line."""

    reason: str
    detail: str


def sender_of(subject: str, data: bytes, max_bytes: int, known: KnownVehicle | None = None,
              prefix: str | None = None) -> str | Rejected:
    """The vehicle a message came from: its subject's (the broker lets a vehicle publish only on its own
    subjects), or why it is dropped: over ``max_bytes``, a subject not starting with ``prefix`` or naming no
    vehicle, a vehicle ``known`` does not know. Every stream's checks begin here, in this order."""
    if len(data) > max_bytes:
        return Rejected("oversized", f"{len(data)} bytes on {subject[:100]}")
    if prefix is not None and not subject.startswith(prefix):
        return Rejected("bad_subject", f"not a {prefix[:-1]} subject: {subject[:100]!r}")
    try:
        vehicle = vehicle_of_subject(subject)
    except StreamError as e:
        return Rejected("bad_subject", str(e))
    if known is not None and not known(vehicle):
        return Rejected("unknown_vehicle", f"vehicle {vehicle!r} is not enrolled")
    return vehicle


def parse_message(subject: str, data: bytes, known: KnownVehicle | None = None) -> Parsed | Rejected:
    """A vehicle message checked against its subject; a :class:`Rejected` instead of raising."""
    sender = sender_of(subject, data, MAX_MESSAGE_BYTES, known)
    if isinstance(sender, Rejected):
        return sender
    try:
        return decode_telemetry(data, subject) if subject.startswith("tel.") else decode_event(data, subject)
    except StreamError as e:
        reason = "subject_mismatch" if "does not match" in str(e) else "malformed"
        return Rejected(reason, str(e))


def shard_of(vehicle_id: str, shards: int) -> int:
    """The worker that handles every message of ``vehicle_id`` (stable across runs and processes)."""
    return zlib.crc32(vehicle_id.encode()) % shards


class StreamMetrics:
    """The live metrics: consumed per stream, dropped per reason, events per kind, consumer lag, and the
    age of the newest telemetry (how live the fleet view is)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("driveloop_stream_consumed", "Stream messages consumed", ["stream"], registry=r)
        self.dropped = Counter("driveloop_stream_dropped", "Stream messages dropped as bad", ["stream", "reason"],
                               registry=r)
        self.events = Counter("driveloop_stream_events", "Vehicle events by kind", ["kind"], registry=r)
        self.lag = Gauge("driveloop_stream_consumer_lag", "Messages not yet delivered to a consumer", ["consumer"],
                         registry=r)
        self._latest_wall_ts = 0.0
        self.telemetry_age = Gauge("driveloop_stream_latest_telemetry_age_seconds",
                                   "Seconds since the newest telemetry message was produced", registry=r)
        self.telemetry_age.set_function(lambda: time.time() - self._latest_wall_ts if self._latest_wall_ts else -1.0)

    def observe(self, messages: Sequence[Parsed]) -> None:
        """The metrics service's handler."""
        for m in messages:
            if isinstance(m, VehicleEvent):
                self.events.labels(m.kind).inc()
            elif m.wall_ts > self._latest_wall_ts:
                self._latest_wall_ts = m.wall_ts


def event_record(e: VehicleEvent) -> StreamEventRecord:
    return StreamEventRecord(
        vehicle=e.vehicle_id, seq=e.seq, kind=e.kind, t_s=e.t_s, wall_ts=e.wall_ts, road=e.road, x_m=e.x_m,
        lane=e.lane, speed_mps=e.speed_mps, decel_mps2=e.decel_mps2, scenario=e.scenario,
        model_version=e.model_version, trace_id=e.trace_id,
    )  # fmt: skip


class EventIndex:
    """The event index in the catalog, and the questions campaigns and the pipeline ask of it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(self, messages: Sequence[Parsed]) -> int:
        """The event-index service's handler: index the events (telemetry is not indexed here)."""
        records = [event_record(m) for m in messages if isinstance(m, VehicleEvent)]
        try:
            return self.catalog.add_stream_events(records)
        except StorageError:  # another sink process indexed one of them first: the retry skips it
            return self.catalog.add_stream_events(records)

    def events_near(self, vehicle: str, t_s: float, window_s: float = 10.0, kind: str | None = None
                    ) -> list[StreamEventRecord]:
        """Events of ``vehicle`` (of ``kind``) within ``window_s`` of its time ``t_s``."""
        return self.catalog.stream_events(vehicle=vehicle, kind=kind, from_s=t_s - window_s, until_s=t_s + window_s)

    def vehicles_with_recent(self, kind: str, since_wall_ts: float) -> list[str]:
        """Vehicles that reported an event of ``kind`` since Unix time ``since_wall_ts``."""
        return sorted({e.vehicle for e in self.catalog.stream_events(kind=kind, since_wall_ts=since_wall_ts)})


# -- the consumers -------------------------------------------------------------------------------------------


@dataclass
class ConsumerSpec:
    """One service's durable consumer: a stream, the subjects it wants, and its handler."""

    durable: str
    stream: str
    subject: str
    handler: Handler
    workers: int = 4
    batch: int = 256
    # another stream's checks (``cloud.log_stream`` for LOGS): subject, payload -> something with a
    # ``vehicle_id`` (handed to ``handler``) or a Rejected; default: parse_message for telemetry and events
    parse: Callable[[str, bytes], Any] | None = None


@dataclass
class _Shard:
    queue: asyncio.Queue[tuple[Any, Parsed]] = field(default_factory=asyncio.Queue)


async def run_consumer(js: Any, spec: ConsumerSpec, metrics: StreamMetrics, stop: asyncio.Event,
                       known: KnownVehicle | None = None,
                       on_handled: Callable[[int, list[Parsed]], Awaitable[None] | None] | None = None) -> None:
    """Fetch from ``spec``'s durable consumer until ``stop``; bad messages dropped, the rest handled per shard."""
    from nats.js.api import AckPolicy, ConsumerConfig

    config = ConsumerConfig(durable_name=spec.durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0,
                            max_ack_pending=spec.batch * spec.workers * 4, filter_subject=spec.subject)
    psub = await js.pull_subscribe(spec.subject, durable=spec.durable, stream=spec.stream, config=config)
    shards = [_Shard() for _ in range(spec.workers)]

    async def work(index: int, shard: _Shard) -> None:
        while True:
            items = [await shard.queue.get()]
            while not shard.queue.empty() and len(items) < spec.batch:
                items.append(shard.queue.get_nowait())
            parsed = [p for _, p in items]
            try:
                await asyncio.to_thread(spec.handler, parsed)
            except Exception as e:  # the database is down: redeliver later, in order
                logger.warning("consumer %s: handler failed (%s); redelivering %d", spec.durable, e, len(items))
                for msg, _ in items:
                    await msg.nak(delay=1.0)
                continue
            for msg, _ in items:
                await msg.ack()
            metrics.consumed.labels(spec.stream).inc(len(items))
            if on_handled is not None:
                res = on_handled(index, parsed)
                if res is not None:
                    await res

    tasks = [asyncio.create_task(work(i, s)) for i, s in enumerate(shards)]
    last_lag = 0.0
    try:
        while not stop.is_set():
            try:
                msgs = await fetch_prompt(psub, spec.batch, 0.5)
            except Exception as e:  # the connection is down or the stream moves: retry, do not die
                logger.warning("consumer %s: fetch failed (%s); retrying", spec.durable, e)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                got = (spec.parse(msg.subject, msg.data) if spec.parse is not None
                       else parse_message(msg.subject, msg.data, known))
                if isinstance(got, Rejected):
                    metrics.dropped.labels(spec.stream, got.reason).inc()
                    logger.warning("consumer %s dropped a message (%s): %s", spec.durable, got.reason, got.detail)
                    await msg.ack()
                    continue
                shards[shard_of(got.vehicle_id, spec.workers)].queue.put_nowait((msg, got))
            now = time.monotonic()
            if now - last_lag > 1.0 or not msgs:
                last_lag = now
                try:
                    info = await psub.consumer_info()
                except Exception as e:  # lag is a metric, not worth stopping for
                    logger.info("consumer %s: no consumer info (%s)", spec.durable, e)
                else:
                    metrics.lag.labels(spec.durable).set(info.num_pending + info.num_ack_pending)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SinkRunner:
    """The consumers of the cloud services in one background thread (``core.loop_thread``) with its own
    connection."""

    def __init__(self, url: str, specs: Sequence[ConsumerSpec], metrics: StreamMetrics, user: str | None = None,
                 password: str | None = None, known: KnownVehicle | None = None) -> None:
        self.url, self.specs, self.metrics = url, list(specs), metrics
        self._user, self._password, self._known = user, password, known
        self._thread = LoopThread("stream-sinks")
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> SinkRunner:
        self._thread.start(self._main(self._thread.stopping))
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise StreamError(f"stream sinks could not start on {self.url}: {self._error}")
        return self

    async def _main(self, stop: asyncio.Event) -> None:
        import nats

        try:
            nc = await nats.connect(nats_servers(self.url), user=self._user, password=self._password, name="driveloop-sinks",
                                    max_reconnect_attempts=-1, reconnect_time_wait=0.25)
        except Exception as e:  # noqa: BLE001 (reported to start())
            self._error = e
            self._ready.set()
            return
        js = nc.jetstream()
        tasks = [asyncio.create_task(run_consumer(js, s, self.metrics, stop, self._known)) for s in self.specs]
        self._ready.set()
        try:
            done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t in tasks and t.exception() is not None:
                    logger.error("stream consumer failed: %r", t.exception())
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await nc.close()

    def stop(self) -> None:
        self._thread.stop(timeout_s=30)


# -- the shift detector ---------------------------------------------------------------------------------------


class ShiftDetector:
    """The shift-detector service (``cloud.shift``): per scenario class rates from the live stream, compared
    with the baseline; a class that rose gets one targeted campaign through the existing campaign path, approved
    when the operator's policy says so.

    Rules it keeps:
    - Its handler (:meth:`observe`) is fed by two durable consumers (TELEMETRY: exposure, EVENTS: interventions
      and collisions, see :func:`~driveloop.cloud.shift.stream_class_events`); a message is counted once: per
      stream and vehicle only a higher ``seq`` than the last counted one is added, so a redelivery or a spool
      replay outside the broker's de-dup window adds nothing.
    - The baseline is ``<dir>/baseline.json`` when there is one (the operator's, or one taken before); without
      it, the reference period's rates (``LiveShift``) are taken and written there, atomically.
    - Opening a campaign never fails the handler (that would redeliver counted messages): a failure is logged
      and the alert is tried again on the next batch.
    - ``<dir>/status.json`` (atomic, at most every ``status_every_s`` and at each campaign) is what
      ``driveloop cloud shift status`` shows: per class live rates, the baseline and the campaigns opened.
    """

    def __init__(self, state_dir: Path, ingest: Callable[[], Any], approval: ApprovalPolicy,
                 policy: ShiftPolicy | None = None, live: LiveShift | None = None,
                 clock: Callable[[], float] = time.time, status_every_s: float = 1.0) -> None:
        self.dir, self.ingest, self.approval = Path(state_dir), ingest, approval
        self.policy, self.live, self.clock = policy or ShiftPolicy(), live or LiveShift(), clock
        self.status_every_s = status_every_s
        self.campaigns: dict[str, dict[str, Any]] = {}
        self.campaign_errors = 0
        self._last_seq: dict[tuple[str, str], int] = {}
        self._duplicates = 0
        self._written_at = -math.inf
        self._lock = threading.Lock()
        self.baseline_source = "reference period"
        stored = self.dir / "baseline.json"
        if stored.is_file():
            try:
                self.live.baseline = Baseline.from_dict(json.loads(stored.read_text()))
            except (ValueError, ConfigError) as e:
                raise ConfigError(f"shift baseline {stored}: {e}; fix or delete it") from None
            self.baseline_source = str(stored)

    def consumers(self, workers: int = 4) -> list[ConsumerSpec]:
        return [ConsumerSpec("shift-telemetry", "TELEMETRY", "tel.>", self.observe, workers=workers),
                ConsumerSpec("shift-events", "EVENTS", "evt.>", self.observe, workers=workers)]

    def observe(self, messages: Sequence[Parsed]) -> None:
        """The service's handler (called from several worker threads)."""
        with self._lock:
            fresh = []
            for m in messages:
                key = ("tel" if isinstance(m, Telemetry) else "evt", m.vehicle_id)
                if m.seq <= self._last_seq.get(key, -1):
                    self._duplicates += 1
                    continue
                self._last_seq[key] = m.seq
                fresh.append(m)
            now = self.clock()
            self.live.add(stream_class_events(fresh), now)
            taken = self.live.freeze()
            if taken is not None:
                write_atomic(self.dir / "baseline.json", json.dumps(taken.as_dict(), sort_keys=True).encode())
                logger.info("shift baseline taken from the reference period: %.1f interventions/h fleet-wide",
                            taken.fleet_per_hour)
            opened = False
            for alert in self.live.alerts(self.policy, self.campaigns):
                opened |= self._open(alert)
            if opened or now - self._written_at >= self.status_every_s:
                self._write_status(now)

    def _open(self, alert: ShiftAlert) -> bool:
        try:
            service = self.ingest()
            try:
                campaign = open_campaign(service, alert, self.policy, self.approval)
            finally:
                service.catalog.close()
        except Exception as e:  # noqa: BLE001 - the catalog is down: try again on the next batch
            self.campaign_errors += 1
            logger.warning("shift in %s: campaign not opened (%s: %s); retrying", alert.scenario_class,
                           type(e).__name__, e)
            return False
        self.campaigns[alert.scenario_class] = {**campaign, "alert": alert.as_dict()}
        return True

    def status(self) -> dict[str, Any]:
        """Per class: live rate, baseline and threshold; the baseline; the campaigns this service opened."""
        with self._lock:
            return self._status(self.clock())

    def _status(self, now: float) -> dict[str, Any]:
        base = self.live.baseline
        classes = {}
        for cls, r in self.live.rates().items():
            b = base.for_class(cls) if base is not None else None
            classes[cls] = {"exposure_h": round(r.exposure_h, 5), "interventions": int(r.interventions),
                            "collisions": int(r.collisions), "per_hour": round(r.per_hour, 3),
                            "baseline_per_hour": None if b is None else round(b, 3),
                            "threshold_per_hour": None if b is None else round(threshold_per_hour(b, self.policy), 3)}
        return {"updated_at": now, "window_s": self.live.window_s, "latest_event_s": self.live.latest_s
                if math.isfinite(self.live.latest_s) else None,
                "baseline": None if base is None else {**base.as_dict(), "source": self.baseline_source},
                "reference_until_s": self.live.reference_until_s, "classes": classes,
                "campaigns": dict(sorted(self.campaigns.items())), "stale": self.live.stale,
                "duplicates": self._duplicates, "campaign_errors": self.campaign_errors}

    def _write_status(self, now: float) -> None:
        write_atomic(self.dir / "status.json", json.dumps(self._status(now), sort_keys=True).encode())
        self._written_at = now

    def flush(self) -> None:
        """Write the status now (when the service stops)."""
        with self._lock:
            self._write_status(self.clock())


def standard_consumers(index: EventIndex, metrics: StreamMetrics, workers: int = 4) -> list[ConsumerSpec]:
    """The event index (EVENTS) and live metrics (TELEMETRY and EVENTS) services' consumers."""
    return [
        ConsumerSpec("event-index", "EVENTS", "evt.>", index.add, workers=workers),
        ConsumerSpec("metrics-telemetry", "TELEMETRY", "tel.>", metrics.observe, workers=workers),
        ConsumerSpec("metrics-events", "EVENTS", "evt.>", metrics.observe, workers=workers),
    ]


async def replay_vehicle(js: Any, vehicle_id: str, since_wall_ts: float, batch: int = 1000) -> list[Telemetry]:
    """A vehicle's telemetry stored since ``since_wall_ts`` (Unix s), in order, through an ephemeral consumer."""
    from datetime import UTC, datetime

    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    subject = telemetry_subject(vehicle_id)
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_TIME,
                            opt_start_time=datetime.fromtimestamp(since_wall_ts, UTC),
                            filter_subject=subject, inactive_threshold=30.0)
    psub = await js.pull_subscribe(subject, stream="TELEMETRY", config=config)
    out: list[Telemetry] = []
    try:
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=0.5)
            except (NatsTimeout, asyncio.TimeoutError):
                break
            for m in msgs:
                got = parse_message(m.subject, m.data)
                if isinstance(got, Telemetry):
                    out.append(got)
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await psub.unsubscribe()
    return out
