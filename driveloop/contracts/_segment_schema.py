"""Segment layout (private; the public API is ``driveloop.contracts.segment``): topics, their JSON
schemas, and the tick record with its encode/decode.

Every message is JSON (``message_encoding`` "json") described by a JSON Schema (``schema_encoding``
"jsonschema"), so ``ray.data.read_mcap`` decodes each one into a struct column and Foxglove shows it
without plugins. One control tick writes one message on each of the six per-tick topics;
``/safety/event`` carries the triggers that fired. Each message holds ``tick`` and ``t_s`` (simulation
time; the MCAP log_time is ``t_s`` in ns).

Encoding rules (why: keep a 20 s segment small while replaying the model's inputs exactly):
- ``kinematics`` and ``lidar`` are stored losslessly (every float32 value round-trips bit-exact).
- ``grid`` is compact and lossy: occupancy (channel 0, in [0, 1]) is quantised to uint8
  (``round(x * 255)``, error <= 0.002), relative speed (channel 1) to integer cm/s (error <= 0.005
  m/s; NaN -> null); both are flattened row-major to ``GRID_H * GRID_W`` integers (integers encode
  and decode several times faster than floats in JSON, and the grid is most of a tick's bytes).
- Non-finite floats are written as JSON ``null`` (strict JSON) and read back as NaN; "nothing"
  (no model output, no TTC target, no watchdog fault) is also ``null`` and reads back as None.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driveloop.contracts.observation import GRID_CHANNELS, GRID_H, GRID_W, KIN_DIM, LIDAR_CELLS
from driveloop.core.exceptions import SegmentError

SCHEMA_VERSION = 1
METADATA_NAME = "driveloop"
PROFILE = "driveloop"
SEGMENT_SUFFIX = ".mcap"
PART_SUFFIX = ".mcap.part"

TOPIC_KINEMATICS = "/sensors/kinematics"
TOPIC_LIDAR = "/sensors/lidar"
TOPIC_GRID = "/sensors/grid"
TOPIC_MODEL = "/control/model"
TOPIC_APPLIED = "/control/applied"
TOPIC_EVENT = "/safety/event"
TOPIC_STATE = "/vehicle/state"
TICK_TOPICS = (TOPIC_KINEMATICS, TOPIC_LIDAR, TOPIC_GRID, TOPIC_MODEL, TOPIC_APPLIED, TOPIC_STATE)
TOPICS = (TOPIC_KINEMATICS, TOPIC_LIDAR, TOPIC_GRID, TOPIC_MODEL, TOPIC_APPLIED, TOPIC_EVENT, TOPIC_STATE)

GRID_CELLS = GRID_H * GRID_W
OCCUPANCY_LEVELS = 255
SPEED_STEPS_PER_MPS = 100  # cm/s

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}


def _floats(n: int) -> dict[str, Any]:
    return {"type": "array", "items": _NUM, "minItems": n, "maxItems": n}


def _schema(title: str, props: dict[str, Any]) -> dict[str, Any]:
    base = {"tick": {"type": "integer", "minimum": 0}, "t_s": {"type": "number"}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "type": "object",
        "properties": {**base, **props},
        "required": ["tick", "t_s", *props],
    }


# topic -> (schema name, JSON schema). Schema names are versioned so a reader can refuse a future layout.
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    TOPIC_KINEMATICS: ("driveloop.Kinematics.v1", _schema("Ego + neighbour kinematics (edge.contract)", {
        "kinematics": _floats(KIN_DIM)})),
    TOPIC_LIDAR: ("driveloop.Lidar.v1", _schema("Lidar per angular cell, cell 0 ahead, CCW", {
        "distance_m": _floats(LIDAR_CELLS), "closing_speed_mps": _floats(LIDAR_CELLS)})),
    TOPIC_GRID: ("driveloop.Grid.v1", _schema("BEV occupancy grid, row-major [H, W]", {
        "occupancy_u8": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                         "minItems": GRID_CELLS, "maxItems": GRID_CELLS},
        "rel_speed_cmps": {"type": "array", "items": {"type": ["integer", "null"]},
                           "minItems": GRID_CELLS, "maxItems": GRID_CELLS}})),
    TOPIC_MODEL: ("driveloop.ModelOutput.v1", _schema("Raw policy output before the safety layer", {
        "action": {"type": ["array", "null"], "items": _NUM, "minItems": 2, "maxItems": 2},
        "confidence": _NUM, "latency_ms": _NUM, "valid": {"type": "boolean"}})),
    TOPIC_APPLIED: ("driveloop.Applied.v1", _schema("Command sent to the actuators and why", {
        "accel_mps2": _NUM, "steering_rad": _NUM, "source": {"enum": ["model", "fallback"]},
        "fcw": {"type": "boolean"}, "aeb": {"type": "boolean"}, "watchdog": _STR,
        "activation": {"type": "boolean"}, "reason": _STR, "ttc_s": _NUM})),
    TOPIC_EVENT: ("driveloop.Event.v1", _schema("A recording trigger fired", {
        "trigger": {"type": "string"}, "priority": {"type": "integer"},
        "pre_s": {"type": "number"}, "post_s": {"type": "number"}})),
    TOPIC_STATE: ("driveloop.VehicleState.v1", _schema("Simulator ground truth + expert action", {
        "state": {"type": "object"},
        "expert_action": {"type": ["array", "null"], "items": _NUM, "minItems": 2, "maxItems": 2}})),
}


def schema_bytes(topic: str) -> bytes:
    """The exact bytes stored in the MCAP schema record of ``topic``."""
    return json.dumps(SCHEMAS[topic][1], sort_keys=True, separators=(",", ":")).encode()


def _opt(x: float | None) -> float | None:
    """JSON-safe scalar: non-finite -> None (strict JSON has no NaN/Inf)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _float_list(a: np.ndarray) -> list[float | None]:
    """Lossless float32 -> JSON list; non-finite -> null (rare, so checked once per array)."""
    flat = np.asarray(a, dtype=np.float32).ravel()
    values: list[float | None] = list(flat.tolist())
    if np.isfinite(flat).all():
        return values
    return [v if v is not None and math.isfinite(v) else None for v in values]


def _int_list(a: np.ndarray) -> list[int | None]:
    """Float array -> rounded JSON integers (row-major); non-finite -> null."""
    flat = np.asarray(a, dtype=np.float64).ravel()
    finite = np.isfinite(flat)
    ints = np.rint(np.where(finite, flat, 0.0)).astype(np.int64).tolist()
    return ints if finite.all() else [v if ok else None for v, ok in zip(ints, finite.tolist())]


def _array(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32).reshape(shape)


def _pair(v: Any) -> list[float] | None:
    if v is None:
        return None
    out = [float(x) for x in v]
    if len(out) != 2:
        raise SegmentError(f"an action must have 2 values [accel_mps2, steering_rad], got {len(out)}")
    return out


@dataclass(frozen=True, eq=False)
class TickRecord:
    """What the control loop observed and did at one tick; the unit the recorder writes.

    ``state`` is the simulator's ground truth (``sim.world.WorldSnapshot.to_dict()``: ego, others,
    crashed), any JSON-safe dict. ``expert_action`` is the simulator's privileged expert command,
    logged as ground truth for the hindsight auto-labeler. ``ttc_s`` None means no target ahead.
    """

    t_s: float
    tick: int
    kinematics: np.ndarray
    lidar: np.ndarray
    grid: np.ndarray
    model_action: list[float] | None
    model_confidence: float | None
    model_latency_ms: float
    model_valid: bool
    applied_accel_mps2: float
    applied_steering_rad: float
    source: str = "model"
    fcw: bool = False
    aeb: bool = False
    watchdog: str | None = None
    activation: bool = False
    reason: str | None = None
    ttc_s: float | None = None
    state: dict[str, Any] = field(default_factory=dict)
    expert_action: list[float] | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.t_s) or self.tick < 0:
            raise SegmentError(f"tick {self.tick}: t_s must be finite and tick >= 0 (t_s={self.t_s})")
        for name, shape in (("kinematics", (KIN_DIM,)), ("lidar", (2, LIDAR_CELLS)),
                            ("grid", (GRID_CHANNELS, GRID_H, GRID_W))):
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                raise SegmentError(f"tick {self.tick}: {name} shape {arr.shape} != contract {shape}")
        if self.source not in ("model", "fallback"):
            raise SegmentError(f"tick {self.tick}: source must be 'model' or 'fallback', got {self.source!r}")
        if not isinstance(self.state, dict):
            raise SegmentError(f"tick {self.tick}: state must be a dict, got {type(self.state).__name__}")
        if self.ttc_s is not None and not math.isfinite(self.ttc_s):
            object.__setattr__(self, "ttc_s", None)  # inf = no target = None, one spelling only
        object.__setattr__(self, "model_action", _pair(self.model_action))
        object.__setattr__(self, "expert_action", _pair(self.expert_action))

    def signals(self) -> dict[str, float | bool]:
        """Named signals for trigger conditions (edge.triggers). Missing values are NaN/inf so that
        comparisons on them are false (``confidence < 0.3`` does not fire when there is no output)."""
        speed = self.state.get("speed_mps")  # WorldSnapshot ground truth; else the ego sensor block
        return {
            "t": float(self.t_s),
            "speed": float(speed) if isinstance(speed, (int, float)) else float(self.kinematics[0]),
            "accel": float(self.applied_accel_mps2),
            "steering": float(self.applied_steering_rad),
            "confidence": math.nan if self.model_confidence is None else float(self.model_confidence),
            "latency_ms": float(self.model_latency_ms),
            "ttc": math.inf if self.ttc_s is None else float(self.ttc_s),
            "fallback": self.source == "fallback",
            "activation": bool(self.activation),
            "fcw": bool(self.fcw),
            "aeb": bool(self.aeb),
            "watchdog": self.watchdog is not None,
            "model_valid": bool(self.model_valid),
            "collision": bool(self.state.get("crashed", False)),
        }


def encode_tick(rec: TickRecord) -> dict[str, bytes]:
    """One tick -> {topic: JSON bytes} for the six per-tick topics."""
    head = {"tick": int(rec.tick), "t_s": float(rec.t_s)}
    grid = np.asarray(rec.grid, dtype=np.float32)
    occ = np.rint(np.clip(np.nan_to_num(grid[0], nan=0.0), 0.0, 1.0) * OCCUPANCY_LEVELS).astype(np.uint8)
    lidar = np.asarray(rec.lidar, dtype=np.float32)
    payloads: dict[str, dict[str, Any]] = {
        TOPIC_KINEMATICS: {**head, "kinematics": _float_list(rec.kinematics)},
        TOPIC_LIDAR: {**head, "distance_m": _float_list(lidar[0]), "closing_speed_mps": _float_list(lidar[1])},
        TOPIC_GRID: {**head, "occupancy_u8": occ.ravel().tolist(),
                     "rel_speed_cmps": _int_list(grid[1] * SPEED_STEPS_PER_MPS)},
        TOPIC_MODEL: {**head, "action": None if rec.model_action is None else [_opt(v) for v in rec.model_action],
                      "confidence": _opt(rec.model_confidence), "latency_ms": _opt(rec.model_latency_ms),
                      "valid": bool(rec.model_valid)},
        TOPIC_APPLIED: {**head, "accel_mps2": _opt(rec.applied_accel_mps2),
                        "steering_rad": _opt(rec.applied_steering_rad), "source": rec.source,
                        "fcw": bool(rec.fcw), "aeb": bool(rec.aeb), "watchdog": rec.watchdog,
                        "activation": bool(rec.activation), "reason": rec.reason, "ttc_s": _opt(rec.ttc_s)},
        TOPIC_STATE: {**head, "state": rec.state, "expert_action": rec.expert_action},
    }
    try:
        return {t: json.dumps(p, separators=(",", ":"), allow_nan=False).encode() for t, p in payloads.items()}
    except (TypeError, ValueError) as e:
        raise SegmentError(f"tick {rec.tick}: state is not JSON-safe: {e}") from e


def decode_grid(msg: dict[str, Any]) -> np.ndarray:
    """A ``/sensors/grid`` message (e.g. a Ray ``data`` struct) -> float32 [C, H, W] grid."""
    occ = np.asarray(msg["occupancy_u8"], dtype=np.float32).reshape(GRID_H, GRID_W) / OCCUPANCY_LEVELS
    speed = _array(msg["rel_speed_cmps"], (GRID_H, GRID_W)) / SPEED_STEPS_PER_MPS
    return np.stack([occ, speed]).astype(np.float32)


def decode_tick(msgs: dict[str, dict[str, Any]]) -> TickRecord:
    """{topic: decoded JSON} for one tick -> TickRecord (grid de-quantised, see module docstring)."""
    kin, lid, grd = msgs[TOPIC_KINEMATICS], msgs[TOPIC_LIDAR], msgs[TOPIC_GRID]
    mdl, app, st = msgs[TOPIC_MODEL], msgs[TOPIC_APPLIED], msgs[TOPIC_STATE]
    action = mdl["action"]
    return TickRecord(
        t_s=float(kin["t_s"]), tick=int(kin["tick"]),
        kinematics=_array(kin["kinematics"], (KIN_DIM,)),
        lidar=np.stack([_array(lid["distance_m"], (LIDAR_CELLS,)), _array(lid["closing_speed_mps"], (LIDAR_CELLS,))]),
        grid=decode_grid(grd),
        model_action=None if action is None else [math.nan if v is None else v for v in action],
        model_confidence=mdl["confidence"],
        model_latency_ms=math.nan if mdl["latency_ms"] is None else mdl["latency_ms"],
        model_valid=bool(mdl["valid"]),
        applied_accel_mps2=math.nan if app["accel_mps2"] is None else app["accel_mps2"],
        applied_steering_rad=math.nan if app["steering_rad"] is None else app["steering_rad"],
        source=app["source"], fcw=app["fcw"], aeb=app["aeb"], watchdog=app["watchdog"],
        activation=app["activation"], reason=app["reason"], ttc_s=app["ttc_s"],
        state=st["state"], expert_action=st["expert_action"],
    )
