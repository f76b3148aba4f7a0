"""Wire contracts of the live stream (DESIGN.md: Stream): vehicle telemetry and events, their subjects,
and the road cells hazards are addressed to. Validated at every boundary.

Subjects (one stream each; a vehicle may publish only under its own token, see ``cloud.broker``):

| subject | stream | what |
|---|---|---|
| ``tel.<vehicle>`` | TELEMETRY (``tel.>``) | 10 Hz kinematics and safety state (:class:`Telemetry`) |
| ``evt.<vehicle>.<kind>`` | EVENTS (``evt.>``, longer retention) | safety activations, triggers, faults (:class:`VehicleEvent`) |
| ``haz.<road>.<cell>`` | HAZARDS (``haz.>``, max age and de-dup window = the longest hazard validity) | hazards pushed to vehicles (``contracts.hazard``), each on the cells :func:`hazard_cells` names; a vehicle subscribes to its own cell |
| ``log.<vehicle>`` | LOGS (``log.>``) | vehicle log batches (opaque here) |

Rules it keeps:
- A vehicle id may contain ``.``, a NATS token separator: in a subject it is written with ``~`` (never part
  of a vehicle id), so ``evt.a.>`` can never match vehicle ``a.b``'s events and permissions stay exact.
- A message is at most ``MAX_MESSAGE_BYTES``; every number is bounded and finite, every string and the
  event's ``detail`` have a length limit, unknown fields are refused.
- A body must name the vehicle its subject names (``decode_*`` with ``subject``): a subject/body mismatch
  is as bad as malformed JSON. Every failure is a :class:`StreamError`, never a pydantic traceback.
- ``(vehicle_id, seq)`` identifies a message: the JetStream message id (server de-dup) and the sink's key.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driveloop.contracts.observation import CONTROL_PERIOD_S
from driveloop.core.exceptions import StreamError
from driveloop.core.ids import VEHICLE_ID_PATTERN, is_vehicle_id
from driveloop.core.version import MODEL_VERSION_PATTERN

__all__ = [
    "CELL_M", "TELEMETRY_PERIOD_S", "MAX_MESSAGE_BYTES", "MAX_LOG_BATCH_BYTES", "HEADER_ROOM_BYTES", "MAX_LOG_PAYLOAD_BYTES",
    "EVENT_KINDS", "EventKind", "Telemetry", "VehicleEvent",
    "ROAD_PATTERN", "SCENARIO_PATTERN", "STREAMS", "StreamSpec", "telemetry_subject", "event_subject",
    "hazard_subject", "log_subject", "subject_token", "vehicle_of_subject", "cell_of", "cells_ahead", "msg_id",
    "WATCH_HORIZON_M", "WATCH_CELLS", "hazard_cells",
    "log_batch_msg_id",
    "encode", "decode_telemetry", "decode_event",
]

TELEMETRY_PERIOD_S = CONTROL_PERIOD_S  # a vehicle sends telemetry every control tick: each one is this much driving
CELL_M = 250.0  # road cell length, metres: hazards are addressed to cells, vehicles watch the cells ahead
MAX_MESSAGE_BYTES = 4096  # telemetry, events and hazards; the streams refuse anything larger
MAX_LOG_BATCH_BYTES = 65536  # one vehicle log batch (the LOGS stream's limit)
# JetStream holds a message's headers against the stream's max_msg_size too: the Nats-Msg-Id header (a vehicle
# id of up to 64 characters and a line range) must fit beside the body, or the broker refuses it for good
HEADER_ROOM_BYTES = 512
MAX_LOG_PAYLOAD_BYTES = MAX_LOG_BATCH_BYTES - HEADER_ROOM_BYTES  # the most a log batch's body may be
MAX_SEQ = 2**63 - 1  # what a database integer holds
MAX_TIME_S = 1e12  # simulated or Unix seconds
MAX_POS_M = 1e7  # metres along/across a road
MAX_CELLS = 400  # cells one vehicle may watch at once (100 km at CELL_M)
# How far ahead a vehicle must hear of a hazard: 67 s at 108 km/h, enough to slow down comfortably. A protocol
# constant, a whole number of cells: the cloud publishes each hazard this far upstream of its relevance area
# (``hazard_cells``), so a vehicle needs to subscribe to its own cell only.
WATCH_CELLS = 8
WATCH_HORIZON_M = WATCH_CELLS * CELL_M
ROAD_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"  # no '.': a road is one subject token
SCENARIO_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # scenario names as sim.scenarios writes them
_DETAIL_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
_ROAD_RE = re.compile(ROAD_PATTERN[1:-1])

# ``intervention``: the supervisor's fallback activation (``Decision.activation``, what a fleet report counts);
# ``collision``: a crash as the vehicle's own accounting counts it. Both carry the scenario class they happened in.
EventKind = Literal["aeb", "aeb_full", "fcw", "watchdog", "lane", "fault", "trigger", "slow_traffic",
                    "sensor_degraded", "intervention", "collision"]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
Mode = Literal["model", "fallback"]

_Time = Annotated[float, Field(ge=0.0, le=MAX_TIME_S, allow_inf_nan=False)]
_Pos = Annotated[float, Field(ge=-MAX_POS_M, le=MAX_POS_M, allow_inf_nan=False)]
_DetailValue = (Annotated[int, Field(ge=-(2**53), le=2**53)] | Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)]
                | Annotated[str, Field(max_length=128)])


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _VehicleMessage(_Wire):
    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    seq: int = Field(ge=0, le=MAX_SEQ)
    t_s: _Time  # simulated time of the tick
    wall_ts: _Time  # Unix seconds when the vehicle produced it (ages and latencies)
    road: str = Field(default="hw1", pattern=ROAD_PATTERN)
    x_m: _Pos
    y_m: _Pos
    lane: int = Field(ge=-1, le=63)  # -1: not on a lane
    speed_mps: float = Field(ge=-150.0, le=150.0, allow_inf_nan=False)
    model_version: str | None = Field(default=None, pattern=MODEL_VERSION_PATTERN)
    scenario: str = Field(default="nominal", pattern=SCENARIO_PATTERN)


class Telemetry(_VehicleMessage):
    """One vehicle's 10 Hz summary: where it is, how it moves, who drives (model or fallback)."""

    accel_mps2: float = Field(ge=-100.0, le=100.0, allow_inf_nan=False)
    mode: Mode


class VehicleEvent(_VehicleMessage):
    """A safety activation, trigger or fault as it happens (``decel_mps2``: the braking it caused)."""

    kind: EventKind
    decel_mps2: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    trace_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    detail: dict[Annotated[str, Field(pattern=_DETAIL_KEY_PATTERN)], _DetailValue] = Field(default_factory=dict,
                                                                                          max_length=16)


class StreamSpec(_Wire):
    """One JetStream stream: its subjects and limits (created or updated by ``cloud.broker``)."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    max_msg_size: int
    duplicate_window_s: float = 120.0
    max_bytes: int = -1


HAZARD_MAX_VALIDITY_S = 900.0  # the longest hazard validity (15 min): HAZARDS keeps nothing older
STREAMS: dict[str, StreamSpec] = {
    "TELEMETRY": StreamSpec(name="TELEMETRY", subjects=("tel.>",), max_age_s=24 * 3600.0, max_msg_size=MAX_MESSAGE_BYTES),
    "EVENTS": StreamSpec(name="EVENTS", subjects=("evt.>",), max_age_s=30 * 24 * 3600.0, max_msg_size=MAX_MESSAGE_BYTES),
    # de-duplicated for as long as it keeps anything: a repetition (the same signed bytes on the same cell,
    # ``hazard_msg_id``) still reaches every live subscriber, but is stored once, so a late joiner's read of its
    # cell gets each live version once instead of every repetition since it was issued
    "HAZARDS": StreamSpec(name="HAZARDS", subjects=("haz.>",), max_age_s=HAZARD_MAX_VALIDITY_S,
                          max_msg_size=MAX_MESSAGE_BYTES, duplicate_window_s=HAZARD_MAX_VALIDITY_S),
    "LOGS": StreamSpec(name="LOGS", subjects=("log.>",), max_age_s=7 * 24 * 3600.0, max_msg_size=MAX_LOG_BATCH_BYTES),
}


def subject_token(vehicle_id: str) -> str:
    """The vehicle's id as one subject token (``.`` → ``~``); StreamError for an invalid id."""
    if not is_vehicle_id(vehicle_id):
        raise StreamError(f"invalid vehicle id {vehicle_id!r:.80}")
    return vehicle_id.replace(".", "~")


def _vehicle_of_token(token: str) -> str:
    vid = token.replace("~", ".")
    if "." in token or not is_vehicle_id(vid):
        raise StreamError(f"invalid vehicle token {token!r:.80} in subject")
    return vid


def telemetry_subject(vehicle_id: str) -> str:
    return f"tel.{subject_token(vehicle_id)}"


def event_subject(vehicle_id: str, kind: str) -> str:
    if kind not in EVENT_KINDS:
        raise StreamError(f"unknown event kind {kind!r:.40}")
    return f"evt.{subject_token(vehicle_id)}.{kind}"


def log_subject(vehicle_id: str) -> str:
    return f"log.{subject_token(vehicle_id)}"


def hazard_subject(road: str, cell: int) -> str:
    if not isinstance(road, str) or _ROAD_RE.fullmatch(road) is None:
        raise StreamError(f"invalid road id {road!r:.40}")
    if isinstance(cell, bool) or not isinstance(cell, int):
        raise StreamError(f"cell must be an int, got {cell!r:.40}")
    return f"haz.{road}.{cell}"


def vehicle_of_subject(subject: str) -> str:
    """The vehicle a ``tel.``/``evt.``/``log.`` subject names; StreamError for any other shape."""
    parts = subject.split(".")
    if parts[0] in ("tel", "log") and len(parts) == 2:
        return _vehicle_of_token(parts[1])
    if parts[0] == "evt" and len(parts) == 3 and parts[2] in EVENT_KINDS:
        return _vehicle_of_token(parts[1])
    raise StreamError(f"not a vehicle subject: {subject!r:.100}")


def cell_of(x_m: float) -> int:
    """The road cell holding longitudinal position ``x_m`` (cells are ``CELL_M`` long, cell 0 starts at 0)."""
    if not math.isfinite(x_m):
        raise StreamError(f"position must be finite, got {x_m!r}")
    return math.floor(x_m / CELL_M)


def cells_ahead(x_m: float, horizon_m: float) -> list[int]:
    """The cells from the one holding ``x_m`` through the one holding ``x_m + horizon_m``, in driving order."""
    if not math.isfinite(horizon_m) or horizon_m < 0:
        raise StreamError(f"horizon must be finite and >= 0, got {horizon_m!r}")
    first, last = cell_of(x_m), cell_of(x_m + horizon_m)
    if last - first + 1 > MAX_CELLS:
        raise StreamError(f"horizon {horizon_m} m spans more than {MAX_CELLS} cells")
    return list(range(first, last + 1))


def hazard_cells(area_cells: tuple[int, ...] | list[int], direction: str) -> tuple[int, ...]:
    """The cells a hazard whose relevance area covers ``area_cells`` is published on: the area's cells and the
    ``WATCH_CELLS`` before it in the traffic ``direction`` ("increasing" or "decreasing" x).

    A vehicle subscribes to the one cell it is in, and must hear of every hazard whose area meets its road
    ahead (its own cell through ``WATCH_CELLS`` further); such an area starts at most ``WATCH_CELLS`` cells
    ahead of it, so the vehicle's cell is one of these. The converse holds too (a vehicle in one of them has
    the area within its road ahead), so each vehicle inside gets exactly one copy and none outside gets any."""
    if not area_cells:
        raise StreamError("a hazard's relevance area has at least one cell")
    first, last = min(area_cells), max(area_cells)
    if direction == "increasing":
        return tuple(range(first - WATCH_CELLS, last + 1))
    if direction == "decreasing":
        return tuple(range(first, last + WATCH_CELLS + 1))
    raise StreamError(f"unknown traffic direction {direction!r:.40}")


def msg_id(vehicle_id: str, seq: int) -> str:
    """The JetStream ``Nats-Msg-Id`` of a vehicle message: the server drops a repeat inside its window."""
    return f"{vehicle_id}:{seq}"


def hazard_digest(data: bytes) -> bytes:
    """The identity of a hazard copy: a repetition is the same signed bytes, so the same digest (the stream's
    message id below, a vehicle's handed-out set in ``edge.stream_client``)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def hazard_msg_id(data: bytes, cell: int) -> str:
    """The ``Nats-Msg-Id`` of a signed hazard published on ``cell``: the same bytes on the same cell are one
    message to the HAZARDS stream (a repetition), another version or cell is another."""
    return f"{hazard_digest(data).hex()}:{int(cell)}"


def log_batch_msg_id(vehicle_id: str, first_seq: int, last_seq: int) -> str:
    """The ``Nats-Msg-Id`` of a log batch: its vehicle and line range, so a re-sent batch is stored once."""
    return f"{vehicle_id}:log:{first_seq}-{last_seq}"


def encode(message: Telemetry | VehicleEvent) -> bytes:
    """Compact JSON; StreamError if it exceeds ``MAX_MESSAGE_BYTES`` (a huge ``detail``)."""
    data = message.model_dump_json(exclude_none=True).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise StreamError(f"{type(message).__name__} of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _decode(cls: type[Telemetry] | type[VehicleEvent], data: bytes) -> Telemetry | VehicleEvent:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StreamError(f"{cls.__name__}: payload must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise StreamError(f"{cls.__name__}: {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return cls.model_validate_json(bytes(data))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise StreamError(f"malformed {cls.__name__}: {where}: {first.get('msg', 'invalid')}"[:300]) from None


def decode_telemetry(data: bytes, subject: str | None = None) -> Telemetry:
    """Parse and validate telemetry; with ``subject``, it must be the body's own ``tel.<vehicle>``."""
    msg = _decode(Telemetry, data)
    assert isinstance(msg, Telemetry)
    if subject is not None and subject != telemetry_subject(msg.vehicle_id):
        raise StreamError(f"subject {subject!r:.100} does not match vehicle {msg.vehicle_id!r}")
    return msg


def decode_event(data: bytes, subject: str | None = None) -> VehicleEvent:
    """Parse and validate an event; with ``subject``, it must be the body's own ``evt.<vehicle>.<kind>``."""
    msg = _decode(VehicleEvent, data)
    assert isinstance(msg, VehicleEvent)
    if subject is not None and subject != event_subject(msg.vehicle_id, msg.kind):
        raise StreamError(f"subject {subject!r:.100} does not match vehicle {msg.vehicle_id!r} kind {msg.kind!r}")
    return msg
