"""The vehicle's recorder: TickRecords -> MCAP segments in the spool, events flagged by triggers.

Rules it keeps (DESIGN.md: Segment):
- one MCAP file per vehicle per <= ``segment_max_s`` (a tick at or after start + segment_max_s opens
  the next segment), zstd chunks, CRCs on chunks, data section and summary;
- written append-only to ``open/<id>.mcap.part``; finalized by finishing the writer, flushing,
  fsyncing, then ``os.replace`` into closed/ and fsyncing the directory. A power cut (SIGKILL) loses
  at most the open segment, never a closed one; on start the recorder publishes its vehicle's
  leftover .part files that are complete (killed between finish and rename) and quarantines the rest;
- every tick is run through the trigger engine; fired events go on ``/safety/event``, their counts
  into the segment metadata, and the segment's spool priority becomes the highest priority whose
  event or pre/post window touches it (a pre-window reaching back promotes the previous segment).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from mcap.writer import CompressionType, Writer

from driveloop.contracts.segment import (
    METADATA_NAME,
    PROFILE,
    SCHEMAS,
    TOPIC_EVENT,
    TOPICS,
    SegmentMeta,
    TickRecord,
    encode_tick,
    schema_bytes,
    validate_segment,
)
from driveloop.edge.spool import Spool
from driveloop.edge.triggers import FiredEvent, TriggerEngine, TriggerSpec, builtin_triggers
from driveloop.core.exceptions import ConfigError, SegmentError, StorageError
from driveloop.core.version import model_version_text
from driveloop.core.ids import check_vehicle_id
from driveloop.sim.scenarios import environment_signals

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_MAX_S = 20.0
DEFAULT_CHUNK_BYTES = 256 * 1024  # ~4 s of ticks per chunk: small enough to stream, big enough for zstd
_TIME_EPS_S = 1e-6  # float drift of an accumulated sim clock; far below one control period


@dataclass
class _OpenSegment:
    part: Path
    opened_ns: int
    file: IO[bytes]
    writer: Writer
    channels: dict[str, int]
    start_s: float
    last_t_s: float = -math.inf
    n_ticks: int = 0
    events: dict[str, int] = field(default_factory=dict)
    priority: int = 0


@dataclass(frozen=True)
class _Closed:
    path: Path
    end_s: float
    priority: int


class Recorder:
    """Records one vehicle's drive into the spool. Not thread-safe: one control loop owns it."""

    def __init__(
        self,
        spool: Spool,
        vehicle_id: str,
        scenario: str,
        seed: int,
        model_version: str | int,
        segment_max_s: float = DEFAULT_SEGMENT_MAX_S,
        triggers: TriggerEngine | Iterable[TriggerSpec] | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_BYTES,
        verify: bool = True,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if not (isinstance(segment_max_s, (int, float)) and 0 < segment_max_s <= 3600):
            raise ConfigError(f"segment_max_s must be in (0, 3600], got {segment_max_s!r}")
        if chunk_size_bytes < 1024:
            raise ConfigError(f"chunk_size_bytes must be >= 1024, got {chunk_size_bytes}")
        self.spool = spool
        self.vehicle_id = check_vehicle_id(vehicle_id)
        self.scenario = scenario
        self._env_signals = environment_signals(scenario)  # which environment this drive is in (campaigns)
        self.seed = int(seed)
        # Checked here, before any segment exists: metadata carries the canonical text ("3"), never "v3" or "0".
        self.model_version = model_version_text(model_version)
        self.segment_max_s = float(segment_max_s)
        self.chunk_size_bytes = chunk_size_bytes
        self.verify = verify
        self._clock_ns = clock_ns
        self.triggers = triggers if isinstance(triggers, TriggerEngine) else TriggerEngine(
            builtin_triggers() if triggers is None else triggers)
        self._base_specs = self.triggers.specs
        # Every segment this recorder published, under its current name (a promotion renames it);
        # the uploader or the quota may have removed it since.
        self.closed: list[Path] = []
        self.evicted: list[Path] = []
        self.recovered: list[Path] = []
        self.quarantined: list[Path] = []
        self._recover_leftovers()
        self._seg: _OpenSegment | None = None
        self._prev: _Closed | None = None
        self._post_until_s = -math.inf
        self._post_priority = 0
        self._last_opened_ns = 0
        self._done = False

    # ------------------------------------------------------------------ public
    def record(self, tick: TickRecord) -> list[FiredEvent]:
        """Write one tick (rolling over to a new segment when due); return the events it fired."""
        if self._done:
            raise SegmentError(f"recorder for {self.vehicle_id} is closed")
        seg = self._seg
        payloads = encode_tick(tick)  # first: a bad tick must change nothing (no rollover, no trigger state)
        if seg is not None and tick.t_s <= seg.last_t_s:
            raise SegmentError(f"tick {tick.tick}: t_s={tick.t_s} does not advance (last {seg.last_t_s})")
        if seg is not None and tick.t_s - seg.start_s >= self.segment_max_s - _TIME_EPS_S:
            self._finalize()
            seg = None
        if seg is None:
            seg = self._seg = self._open(tick.t_s)
        events = self.triggers.evaluate({**tick.signals(), **self._env_signals}, tick.t_s)
        log_ns = max(0, round(tick.t_s * 1e9))
        seq = int(tick.tick) & 0xFFFFFFFF  # MCAP sequence is uint32
        try:
            for topic, payload in payloads.items():
                seg.writer.add_message(seg.channels[topic], log_ns, payload, log_ns, sequence=seq)
            for ev in events:
                body = {"tick": int(tick.tick), "t_s": float(tick.t_s), "trigger": ev.trigger,
                        "priority": ev.priority, "pre_s": float(ev.pre_s), "post_s": float(ev.post_s)}
                seg.writer.add_message(seg.channels[TOPIC_EVENT], log_ns, _json(body), log_ns, sequence=seq)
        except OSError as e:
            raise StorageError(f"writing {seg.part} failed: {e}") from e
        seg.last_t_s = tick.t_s
        seg.n_ticks += 1
        for ev in events:
            seg.events[ev.trigger] = seg.events.get(ev.trigger, 0) + 1
            seg.priority = max(seg.priority, ev.priority)
            self._post_until_s = max(self._post_until_s, ev.t_s + ev.post_s)
            self._post_priority = max(self._post_priority, ev.priority)
            self._promote_previous(ev)
        if tick.t_s <= self._post_until_s:
            seg.priority = max(seg.priority, self._post_priority)
        else:
            self._post_priority = 0
        return events

    def set_campaign_triggers(self, specs: Iterable[TriggerSpec]) -> None:
        """Run ``specs`` (e.g. cloud campaigns, ``edge.transport.campaign_triggers``) next to the
        recorder's own triggers from the next tick on; replaces the previous campaign set. A bad set
        raises ConfigError and leaves the running triggers unchanged."""
        self.triggers.set_specs([*self._base_specs, *specs])

    def close(self) -> list[Path]:
        """Finalize the open segment (if any); returns every segment this recorder published."""
        if not self._done:
            self._done = True
            if self._seg is not None:
                self._finalize()
        return list(self.closed)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _recover_leftovers(self) -> None:
        """A previous run of this vehicle died with segments in open/. One that is complete (killed
        between finishing and publishing it) is published; anything else goes to quarantine."""
        for part in self.spool.open_parts(self.vehicle_id):
            try:
                info = validate_segment(part)
            except SegmentError as e:
                logger.warning("leftover segment is incomplete: %s", e)
                self.quarantined.append(self.spool.quarantine(part))
                continue
            path, evicted = self.spool.add_closed(part, self.vehicle_id, self.spool.part_opened_ns(part),
                                                  info.meta.priority or 0)  # always set in a segment file
            logger.warning("recovered a complete segment left open by a crash: %s", path.name)
            self.recovered.append(path)
            self.evicted += evicted

    def _open(self, start_s: float) -> _OpenSegment:
        opened_ns = max(self._clock_ns(), self._last_opened_ns + 1)  # unique, ordered names
        self._last_opened_ns = opened_ns
        part = self.spool.part_path(self.vehicle_id, opened_ns)
        try:
            f = open(part, "xb")  # noqa: SIM115 - stays open across ticks; closed in _finish
            writer = Writer(f, chunk_size=self.chunk_size_bytes, compression=CompressionType.ZSTD,
                            enable_crcs=True, enable_data_crcs=True)
            writer.start(profile=PROFILE, library="driveloop")
            channels = {}
            for topic in TOPICS:
                schema_id = writer.register_schema(SCHEMAS[topic][0], "jsonschema", schema_bytes(topic))
                channels[topic] = writer.register_channel(topic, "json", schema_id)
        except OSError as e:
            raise StorageError(f"cannot open segment {part}: {e}") from e
        logger.debug("opened segment %s at t=%.2fs", part.name, start_s)
        return _OpenSegment(part, opened_ns, f, writer, channels, start_s)

    def _finalize(self) -> None:
        seg, self._seg = self._seg, None
        assert seg is not None and seg.n_ticks > 0  # a segment is only opened by a tick
        self._finish(seg)
        if self.verify:
            validate_segment(seg.part)  # never publish a segment the cloud would reject
        path, evicted = self.spool.add_closed(seg.part, self.vehicle_id, seg.opened_ns, seg.priority)
        self.closed.append(path)
        self.evicted += evicted
        self._prev = _Closed(path, seg.last_t_s, seg.priority)
        logger.info("closed segment %s: %d ticks, %.1f-%.1fs, events %s", path.name, seg.n_ticks,
                    seg.start_s, seg.last_t_s, seg.events or "none")

    def _finish(self, seg: _OpenSegment) -> None:
        """Complete the MCAP (metadata, summary, footer) and make it durable, still as a .part."""
        meta = SegmentMeta(
            vehicle=self.vehicle_id, scenario=self.scenario, seed=self.seed, model_version=self.model_version,
            start_s=seg.start_s, end_s=seg.last_t_s, n_ticks=seg.n_ticks, events=dict(seg.events),
            has_event=seg.priority > 0, priority=seg.priority, recorded_at_unix_s=seg.opened_ns / 1e9,
        )
        try:
            seg.writer.add_metadata(METADATA_NAME, meta.to_record())
            seg.writer.finish()
            seg.file.flush()
            os.fsync(seg.file.fileno())
            seg.file.close()
        except OSError as e:
            raise StorageError(f"cannot finalize segment {seg.part}: {e}") from e

    def _promote_previous(self, ev: FiredEvent) -> None:
        prev = self._prev
        if prev is None or ev.t_s - ev.pre_s > prev.end_s or ev.priority <= prev.priority:
            return
        new_path = self.spool.promote(prev.path, ev.priority)
        self._prev = _Closed(new_path, prev.end_s, ev.priority)
        self.closed = [new_path if p == prev.path else p for p in self.closed]


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
