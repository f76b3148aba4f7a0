"""The supervisor's inputs and outputs: what the control loop hands in each tick and what it gets back.

Inputs are validated on construction: a non-finite clock, speed or track value is a bug in the caller
(the control loop or perception), reported as ``SafetyError`` rather than silently driven on. The model
reply, by contrast, is untrusted by design and checked by the watchdog, never here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from driveloop.core.exceptions import SafetyError

FAULT_KINDS = ("dead", "deadline", "stale", "shape", "nan", "range")
Source = Literal["model", "fallback"]


@runtime_checkable
class Track(Protocol):
    """The forward object in the ego lane (edge perception filters other lanes out)."""

    @property
    def gap_m(self) -> float: ...

    @property
    def closing_speed_mps(self) -> float: ...  # + when the gap shrinks

    @property
    def lead_speed_mps(self) -> float: ...


@runtime_checkable
class SideTrack(Track, Protocol):
    """An object ahead beside the ego's lane corridor: a Track plus where it is across the ego's lane."""

    @property
    def lane_offset_m(self) -> float: ...  # its centre from the ego lane's centre, + left

    @property
    def lateral_speed_mps(self) -> float: ...  # its speed across the lane, + to the left


@dataclass(frozen=True)
class TrackData:
    """A plain Track (and SideTrack), for tests, replays and callers without their own type."""

    gap_m: float
    closing_speed_mps: float
    lead_speed_mps: float
    lane_offset_m: float = 0.0
    lateral_speed_mps: float = 0.0


_TRACK_FIELDS = ("gap_m", "closing_speed_mps", "lead_speed_mps")
_SIDE_FIELDS = (*_TRACK_FIELDS, "lane_offset_m", "lateral_speed_mps")


@dataclass(frozen=True)
class ModelReply:
    """What came back from the model this tick; ``action`` and ``confidence`` are untrusted objects.

    ``received_at_s`` is None when no reply arrived by the tick's deadline; ``alive`` is False when the
    model process is dead.
    """

    action: object
    confidence: object
    received_at_s: float | None
    alive: bool = True


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SafetyError(f"supervisor input {name}={value!r} must be a finite number")
    return float(value)


MIN_ROAD_FRICTION = 0.05  # ice is ~0.1; below this no braking rule makes sense
MAX_ADVISORY_DISTANCE_M = 1e6  # farther than any relevance area: a bigger number is a caller's bug
MAX_ADVISORY_TIME_GAP_S = 10.0
MAX_ADVISORY_SPEED_MPS = 100.0


def _bounded(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise SafetyError(f"advisory {name}={value!r} must be a finite number in [{low:g}, {high:g}]")
    return float(value)


@dataclass(frozen=True)
class Advisory:
    """A road hazard ``distance_m`` ahead: be at most at ``speed_mps`` there, and/or keep ``time_gap_s`` to the
    lead (``safety/advisory.py`` turns it into a cap). Validated: it comes from the vehicle's hazard filter."""

    distance_m: float
    speed_mps: float | None = None
    time_gap_s: float | None = None

    def __post_init__(self) -> None:
        _bounded("distance_m", self.distance_m, 0.0, MAX_ADVISORY_DISTANCE_M)
        if self.speed_mps is None and self.time_gap_s is None:
            raise SafetyError("an advisory needs a speed, a time gap or both")
        if self.speed_mps is not None:
            _bounded("speed_mps", self.speed_mps, 0.0, MAX_ADVISORY_SPEED_MPS)
        if self.time_gap_s is not None:
            _bounded("time_gap_s", self.time_gap_s, 0.0, MAX_ADVISORY_TIME_GAP_S)


@dataclass(frozen=True)
class SupervisorInputs:
    """One tick's inputs. ``sensor_stamp_s`` is the time of the newest fresh sensor frame; ``neighbours`` are
    the objects ahead beside the lane corridor (the AEB brakes for one that cuts in); ``advisory`` is a road
    hazard ahead that may only make the command more careful (``safety/advisory.py``)."""

    now_s: float
    ego_speed_mps: float
    ego_accel_mps2: float
    lane_offset_m: float
    heading_rel_rad: float
    track: Track | None
    sensor_stamp_s: float
    reply: ModelReply | None
    model_enabled: bool = True
    neighbours: tuple[SideTrack, ...] = ()
    advisory: Advisory | None = None
    road_friction: float = 1.0  # the vehicle's estimate of the road's friction coefficient (aeb.friction_scale)

    def __post_init__(self) -> None:
        for name in ("now_s", "ego_speed_mps", "ego_accel_mps2", "lane_offset_m", "heading_rel_rad", "sensor_stamp_s"):
            _finite(name, getattr(self, name))
        if self.track is not None:
            for name in _TRACK_FIELDS:
                _finite(f"track.{name}", getattr(self.track, name, None))
        for i, side in enumerate(self.neighbours):
            for name in _SIDE_FIELDS:
                _finite(f"neighbours[{i}].{name}", getattr(side, name, None))
        if not (isinstance(self.road_friction, (int, float)) and not isinstance(self.road_friction, bool)
                and MIN_ROAD_FRICTION <= self.road_friction <= 1.0):
            raise SafetyError(f"supervisor input road_friction={self.road_friction!r} must be in "
                              f"[{MIN_ROAD_FRICTION}, 1] (1: dry road)")
        if self.reply is not None and not isinstance(self.reply, ModelReply):
            raise SafetyError(f"supervisor input reply must be a ModelReply or None, got {type(self.reply).__name__}")
        if self.advisory is not None and not isinstance(self.advisory, Advisory):
            raise SafetyError(f"supervisor input advisory must be an Advisory or None, got {type(self.advisory).__name__}")


class Decision(NamedTuple):
    """The command for the actuators and why. ``parts`` are named numbers for logs and metrics.

    Immutable; a NamedTuple because one is built every tick of every vehicle (3x cheaper than a
    frozen dataclass). ``parts`` has no default: a shared default dict would be shared by all.
    """

    accel_mps2: float
    steering_rad: float
    source: Source
    fcw: bool
    aeb: bool
    watchdog: str | None
    activation: bool
    reason: str | None
    parts: dict[str, float]
