"""The segment contract (DESIGN.md: Segment), defined once: the recorder writes it, the cloud imports it.

A segment is one MCAP file per vehicle per <=20 s; its topics, JSON schemas and the tick record's
encoding live in ``_segment_schema`` and are re-exported here, so this module is the one public name.

The segment's metadata is the MCAP metadata record named ``driveloop`` (all values are strings, an
MCAP rule): ``SegmentMeta`` is the one definition of those provenance fields; ``SegmentInfo`` (a
validated segment) and the cloud catalog's ``SegmentRecord`` contain it rather than repeat it.

``validate_segment_bytes`` is the trust boundary (recorder self-check, uploader, cloud ingest) as a
pure function of the bytes, python-tuf style (no files, no clock): it checks every CRC (data section,
chunks, summary) before decompressing anything, then the schemas, metadata and message counts, and
raises only ``SegmentError``. ``validate_segment(path)`` reads a file and calls it; ``read_ticks``
replays a segment without Ray; ``scan_directory`` reports-and-skips bad files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mcap.exceptions import EndOfFile
from mcap.records import Channel, Chunk, DataEnd, Footer, Header, Message, Metadata, Schema, Statistics
from mcap.stream_reader import StreamReader, breakup_chunk

from driveloop.contracts._segment_schema import (
    GRID_CELLS,
    METADATA_NAME,
    OCCUPANCY_LEVELS,
    PART_SUFFIX,
    PROFILE,
    SCHEMA_VERSION,
    SCHEMAS,
    SEGMENT_SUFFIX,
    SPEED_STEPS_PER_MPS,
    TICK_TOPICS,
    TOPIC_APPLIED,
    TOPIC_EVENT,
    TOPIC_GRID,
    TOPIC_KINEMATICS,
    TOPIC_LIDAR,
    TOPIC_MODEL,
    TOPIC_STATE,
    TOPICS,
    TickRecord,
    decode_grid,
    decode_tick,
    encode_tick,
    schema_bytes,
)
from driveloop.contracts.observation import OBS_VERSION
from driveloop.core.exceptions import SegmentError

__all__ = [
    "GRID_CELLS", "MAX_SEGMENT_BYTES", "MCAP_MAGIC", "METADATA_NAME", "OCCUPANCY_LEVELS", "PART_SUFFIX",
    "PROFILE", "SCHEMAS", "SCHEMA_VERSION", "SEGMENT_SUFFIX", "SPEED_STEPS_PER_MPS", "TICK_TOPICS",
    "TOPICS", "TOPIC_APPLIED", "TOPIC_EVENT", "TOPIC_GRID", "TOPIC_KINEMATICS", "TOPIC_LIDAR", "TOPIC_MODEL",
    "TOPIC_STATE", "ScanReport", "SegmentInfo", "SegmentMeta", "TickRecord", "decode_grid", "decode_tick",
    "encode_tick", "read_events", "read_ticks", "scan_directory", "schema_bytes", "validate_segment",
    "validate_segment_bytes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentMeta:
    """The ``driveloop`` MCAP metadata record: a segment's provenance, defined once.

    ``priority`` is the highest trigger priority that marked the segment (0 = routine); ``has_event``
    also covers a trigger's pre/post window. A segment file always carries every field; a holder that
    keeps only part of them (the cloud catalog keeps neither priority, recording time nor versions)
    gives None for the rest rather than a guess.
    """

    vehicle: str
    scenario: str
    seed: int
    model_version: str
    start_s: float
    end_s: float
    n_ticks: int
    events: dict[str, int]
    has_event: bool
    priority: int | None
    recorded_at_unix_s: float | None
    obs_version: int | None = OBS_VERSION
    schema_version: int | None = SCHEMA_VERSION

    def to_record(self) -> dict[str, str]:
        if self.priority is None or self.recorded_at_unix_s is None or self.obs_version is None \
                or self.schema_version is None:  # a segment file is complete: its reader requires every field
            raise SegmentError("segment metadata without priority, recording time or versions cannot be written")
        return {
            "schema_version": str(self.schema_version), "obs_version": str(self.obs_version),
            "vehicle": self.vehicle, "scenario": self.scenario, "seed": str(self.seed),
            "model_version": self.model_version, "start_s": repr(float(self.start_s)),
            "end_s": repr(float(self.end_s)), "n_ticks": str(self.n_ticks),
            "events": json.dumps(dict(sorted(self.events.items()))),
            "has_event": "true" if self.has_event else "false", "priority": str(self.priority),
            "recorded_at_unix_s": repr(float(self.recorded_at_unix_s)),
        }

    @classmethod
    def from_record(cls, rec: dict[str, str]) -> SegmentMeta:
        try:
            events = json.loads(rec["events"])
            if not isinstance(events, dict) or not all(isinstance(v, int) for v in events.values()):
                raise ValueError("events must map trigger name -> count")
            return cls(
                vehicle=rec["vehicle"], scenario=rec["scenario"], seed=int(rec["seed"]),
                model_version=rec["model_version"], start_s=float(rec["start_s"]), end_s=float(rec["end_s"]),
                n_ticks=int(rec["n_ticks"]), events={str(k): int(v) for k, v in events.items()},
                has_event=rec["has_event"] == "true", priority=int(rec["priority"]),
                recorded_at_unix_s=float(rec["recorded_at_unix_s"]),
                obs_version=int(rec["obs_version"]), schema_version=int(rec["schema_version"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise SegmentError(f"segment metadata '{METADATA_NAME}' is malformed: {e!r}") from e


# ---------------------------------------------------------------- validation and reading

MCAP_MAGIC = b"\x89MCAP0\r\n"
MAX_SEGMENT_BYTES = 256 * 2**20  # a 20 s segment is ~1 MB; anything near this is not ours
_FOOTER_TAIL_BYTES = 4 + len(MCAP_MAGIC)  # summary_crc + closing magic (end of the CRC'd summary range)


@dataclass(frozen=True)
class SegmentInfo:
    """What a validated segment is: identity (sha256, size), provenance (``meta``) and message count.
    ``path`` is the file it was read from; None when bytes were validated in memory (cloud ingest)."""

    sha256: str
    size_bytes: int
    n_messages: int
    meta: SegmentMeta
    path: Path | None = None

    @property
    def size(self) -> int:
        return self.size_bytes


@dataclass(frozen=True)
class ScanReport:
    """Result of scanning a directory: good segments and (path, reason) for every rejected one."""

    valid: list[SegmentInfo]
    rejected: list[tuple[Path, str]]


def validate_segment_bytes(data: bytes) -> SegmentInfo:
    """Fully check one segment's bytes; raise SegmentError (never anything else) if they are not sound.
    Pure: no files, so the caller decides where bytes come from and go (``path`` is None)."""
    return _check(data)[0]


def validate_segment(path: str | os.PathLike[str]) -> SegmentInfo:
    """Read and check one segment file (``validate_segment_bytes`` plus the path in the result and in
    every error message); raise SegmentError (never anything else) if it is not sound."""
    return _load(Path(path))[0]


def read_ticks(path: str | os.PathLike[str]) -> Iterator[TickRecord]:
    """Replay a validated segment tick by tick (for consumers that do not use Ray)."""
    _, by_topic = _load(Path(path))
    columns = [by_topic[t] for t in TICK_TOPICS]
    for row in zip(*columns):
        try:
            yield decode_tick(dict(zip(TICK_TOPICS, row)))
        except (TypeError, ValueError, KeyError) as e:  # CRC-valid but crafted content
            raise SegmentError(f"{path}: tick {row[0].get('tick')} does not decode: {e!r}") from e


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The trigger events recorded on ``/safety/event``, in time order."""
    return _load(Path(path))[1][TOPIC_EVENT]


def scan_directory(root: str | os.PathLike[str]) -> ScanReport:
    """Validate every ``*.mcap`` under ``root`` (sorted); bad ones are logged and skipped, never raised."""
    valid: list[SegmentInfo] = []
    rejected: list[tuple[Path, str]] = []
    for p in sorted(Path(root).glob(f"*{SEGMENT_SUFFIX}")):
        try:
            valid.append(validate_segment(p))
        except SegmentError as e:
            logger.warning("skipping bad segment: %s", e)
            rejected.append((p, str(e)))
    return ScanReport(valid, rejected)


_Topics = dict[str, list[dict[str, Any]]]


def _load(p: Path) -> tuple[SegmentInfo, _Topics]:
    """Read ``p`` (size checked first: never read a huge file into memory) and check its bytes;
    every error names the file."""
    try:
        size = p.stat().st_size
        if size > MAX_SEGMENT_BYTES:
            raise SegmentError(f"{size} bytes exceeds the {MAX_SEGMENT_BYTES}-byte segment limit")
        data = p.read_bytes()
        info, by_topic = _check(data)
    except SegmentError as e:
        raise SegmentError(f"{p}: {e}") from e
    except OSError as e:
        raise SegmentError(f"{p}: cannot read: {e}") from e
    return replace(info, path=p), by_topic


def _check(data: bytes) -> tuple[SegmentInfo, _Topics]:
    try:
        if len(data) > MAX_SEGMENT_BYTES:
            raise SegmentError(f"{len(data)} bytes exceeds the {MAX_SEGMENT_BYTES}-byte segment limit")
        if not data:
            raise SegmentError("empty file")
        if not data.startswith(MCAP_MAGIC):
            raise SegmentError("not an MCAP file (bad magic)")
        if not data.endswith(MCAP_MAGIC):
            raise SegmentError("truncated or unfinalized (no closing magic)")
        return _parse(data)
    except SegmentError:
        raise
    except EndOfFile as e:
        raise SegmentError(f"truncated or unfinalized (no footer): {e!r}") from e
    except Exception as e:  # trust boundary: any decoder failure on corrupt bytes is a bad segment
        raise SegmentError(f"corrupt MCAP: {type(e).__name__}: {e}") from e


def _parse(data: bytes) -> tuple[SegmentInfo, _Topics]:
    # Pass 1: structure and every CRC, with chunks still compressed (never inflate untrusted bytes).
    reader = StreamReader(io.BytesIO(data), emit_chunks=True, validate_crcs=True, record_size_limit=len(data))
    records = list(reader.records)
    if not records or not isinstance(records[0], Header):
        raise SegmentError("no MCAP header")
    footer, data_end = records[-1], next((r for r in records if isinstance(r, DataEnd)), None)
    stats = next((r for r in records if isinstance(r, Statistics)), None)
    if not isinstance(footer, Footer) or data_end is None:
        raise SegmentError("truncated or unfinalized (no data end / footer)")
    if data_end.data_section_crc == 0 or footer.summary_crc == 0 or footer.summary_start == 0 or stats is None:
        raise SegmentError("unfinalized or not written by the driveloop recorder (no CRCs / summary)")
    if not 0 < footer.summary_start < len(data) - _FOOTER_TAIL_BYTES:
        raise SegmentError("footer points outside the file")
    if zlib.crc32(data[footer.summary_start:len(data) - _FOOTER_TAIL_BYTES]) != footer.summary_crc:
        raise SegmentError("summary section CRC mismatch (bit rot or tampering)")
    metas = [r for r in records if isinstance(r, Metadata) and r.name == METADATA_NAME]
    if len(metas) != 1:
        raise SegmentError(f"expected one '{METADATA_NAME}' metadata record, found {len(metas)}")
    meta = SegmentMeta.from_record(metas[0].metadata)
    if meta.schema_version != SCHEMA_VERSION:
        raise SegmentError(f"wrong schema: segment schema_version {meta.schema_version} != {SCHEMA_VERSION}")

    # Pass 2: inflate the (CRC-verified) chunks.
    schemas = {r.id: r for r in records if isinstance(r, Schema)}
    channels = {r.id: r for r in records if isinstance(r, Channel)}
    messages: list[Message] = []
    for chunk in (r for r in records if isinstance(r, Chunk)):
        if chunk.compression != "zstd":
            raise SegmentError(f"chunk compression {chunk.compression!r}, expected zstd")
        for r in breakup_chunk(chunk, validate_crc=True):
            if isinstance(r, Schema):
                schemas[r.id] = r
            elif isinstance(r, Channel):
                channels[r.id] = r
            elif isinstance(r, Message):
                messages.append(r)
    messages += [r for r in records if isinstance(r, Message)]
    topic_of = _check_channels(channels, schemas)

    by_topic: dict[str, list[dict[str, Any]]] = {t: [] for t in TOPICS}
    counts: dict[int, int] = {}
    for m in sorted(messages, key=lambda m: (m.log_time, m.channel_id, m.sequence)):
        if m.channel_id not in topic_of:
            raise SegmentError(f"message on unknown channel {m.channel_id}")
        counts[m.channel_id] = counts.get(m.channel_id, 0) + 1
        by_topic[topic_of[m.channel_id]].append(_check_message(topic_of[m.channel_id], m.data))
    if stats.message_count != len(messages) or {k: v for k, v in stats.channel_message_counts.items() if v} != counts:
        raise SegmentError(f"message counts disagree with the summary ({len(messages)} read, "
                           f"{stats.message_count} in statistics)")
    ticks = [msg["tick"] for msg in by_topic[TOPIC_STATE]]
    if len(ticks) != meta.n_ticks or meta.n_ticks == 0:
        raise SegmentError(f"{len(ticks)} ticks recorded but metadata says n_ticks={meta.n_ticks}")
    for t in TICK_TOPICS:
        if [msg["tick"] for msg in by_topic[t]] != ticks:
            raise SegmentError(f"topic {t} does not have exactly one message per tick")
    events: dict[str, int] = {}
    for ev in by_topic[TOPIC_EVENT]:
        events[ev["trigger"]] = events.get(ev["trigger"], 0) + 1
    if events != meta.events:
        raise SegmentError(f"event messages {events} disagree with metadata events {meta.events}")
    states = by_topic[TOPIC_STATE]
    if states[0]["t_s"] != meta.start_s or states[-1]["t_s"] != meta.end_s:
        raise SegmentError("metadata start_s/end_s disagree with the recorded ticks")
    info = SegmentInfo(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), n_messages=len(messages),
                       meta=meta)
    return info, by_topic


def _check_channels(channels: dict[int, Channel], schemas: dict[int, Schema]) -> dict[int, str]:
    topic_of = {cid: ch.topic for cid, ch in channels.items()}
    if sorted(topic_of.values()) != sorted(TOPICS):
        raise SegmentError(f"wrong schema: topics {sorted(topic_of.values())} != {sorted(TOPICS)}")
    for ch in channels.values():
        sch = schemas.get(ch.schema_id)
        name = SCHEMAS[ch.topic][0]
        if ch.message_encoding != "json" or sch is None or sch.name != name or sch.encoding != "jsonschema" \
                or sch.data != schema_bytes(ch.topic):
            got = "none" if sch is None else f"{sch.name}/{sch.encoding}"
            raise SegmentError(f"wrong schema on {ch.topic}: {got} ({ch.message_encoding}), expected {name}")
    return topic_of


def _check_message(topic: str, raw: bytes) -> dict[str, Any]:
    """Decode one message and check what consumers index blindly: required keys and array lengths."""
    msg = json.loads(raw)
    schema = SCHEMAS[topic][1]
    if not isinstance(msg, dict) or not set(schema["required"]) <= msg.keys() or not isinstance(msg["tick"], int):
        raise SegmentError(f"message on {topic} does not match its schema")
    for key, prop in schema["properties"].items():
        n = prop.get("minItems")
        v = msg[key]
        if n is not None and not (v is None and "null" in prop["type"]) and not (isinstance(v, list) and len(v) == n):
            raise SegmentError(f"message on {topic}: field {key!r} must be a list of {n}")
    return msg
