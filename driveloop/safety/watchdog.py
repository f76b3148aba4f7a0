"""Watchdog: decides whether this tick's model reply may drive the vehicle.

Faults, checked in this order (the first one found is reported):
- ``dead``: the model process is gone (``alive`` is False).
- ``deadline``: no reply by the tick's deadline, or a reply older than ``deadline_s`` (late or hung).
- ``stale``: the newest sensor frame is older than ``stale_ticks`` control periods (or from the future),
  so even a valid reply was computed from an outdated world.
- ``shape``: action/confidence is not a floating-point numpy array of the contract's shape
  (action [2] or [1, 2]; confidence [1], [1, 1] or a scalar).
- ``nan``: any NaN or infinity.
- ``range``: acceleration or steering outside the physically plausible range, or confidence outside
  [0, 1]. Plausible but beyond the actuator limits is not a fault: the limits clamp it.
Every check is on the current tick only, so a fault is detected on the tick it happens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .config import WatchdogConfig
from .types import ModelReply

CLOCK_TOLERANCE_S = 2.0**-20  # ~1 us: stamps this far in the future are rounding (a power of two: exact tests)
_ACTION_SHAPES = ((2,), (1, 2))
_CONFIDENCE_SHAPES = ((), (1,), (1, 1))


class Verdict(NamedTuple):
    """The watchdog's answer: a fault kind, or the validated [accel, steering] and confidence.

    Immutable; a NamedTuple because one is built every tick of every vehicle (cheaper than a frozen dataclass).
    """

    fault: str | None
    accel_mps2: float = 0.0
    steering_rad: float = 0.0
    confidence: float = 0.0
    detail: str = ""


def _as_floats(value: object, shapes: tuple[tuple[int, ...], ...]) -> list[float] | None:
    """The values as Python floats when ``value`` is a floating ndarray of an allowed shape, else None."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape not in shapes:
        return None
    return [float(x) for x in value.ravel().tolist()]


def check_timing(reply: ModelReply | None, now_s: float, sensor_stamp_s: float, period_s: float,
                 config: WatchdogConfig) -> Verdict | None:
    """Liveness and freshness faults, or None when the reply is alive, on time and fresh."""
    if reply is not None and not reply.alive:
        return Verdict("dead", detail="model process is dead")
    if reply is None or reply.received_at_s is None:
        return Verdict("deadline", detail="no reply by the deadline")
    age = now_s - reply.received_at_s
    if not math.isfinite(age) or age > config.deadline_s or age < -CLOCK_TOLERANCE_S:
        return Verdict("deadline", detail=f"reply age {age:.3f} s outside [0, {config.deadline_s}] s")
    sensor_age = now_s - sensor_stamp_s
    if sensor_age > config.stale_ticks * period_s + CLOCK_TOLERANCE_S or sensor_age < -CLOCK_TOLERANCE_S:
        return Verdict("stale", detail=f"sensor frame age {sensor_age:.3f} s")
    return None


def check_reply(reply: ModelReply | None, now_s: float, sensor_stamp_s: float, period_s: float,
                config: WatchdogConfig) -> Verdict:
    """Full verdict for one tick's reply (timing first, then the content)."""
    timing = check_timing(reply, now_s, sensor_stamp_s, period_s, config)
    if timing is not None:
        return timing
    assert reply is not None  # check_timing reports a missing reply
    action = _as_floats(reply.action, _ACTION_SHAPES)
    confidence = _as_floats(reply.confidence, _CONFIDENCE_SHAPES)
    if action is None or confidence is None:
        return Verdict("shape", detail=f"action {_describe(reply.action)}, confidence {_describe(reply.confidence)}")
    if not all(math.isfinite(x) for x in action + confidence):
        return Verdict("nan", detail="non-finite model output")
    accel, steer, conf = action[0], action[1], confidence[0]
    if not (config.plausible_accel_min_mps2 <= accel <= config.plausible_accel_max_mps2):
        return Verdict("range", detail=f"accel {accel:.3g} m/s^2 implausible")
    if abs(steer) > config.plausible_steer_abs_rad:
        return Verdict("range", detail=f"steering {steer:.3g} rad implausible")
    if not 0.0 <= conf <= 1.0:
        return Verdict("range", detail=f"confidence {conf:.3g} outside [0, 1]")
    return Verdict(None, accel, steer, conf)


def _describe(value: object) -> str:
    """Short, safe description of an untrusted object for log lines (never its full repr)."""
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape}:{value.dtype}"
    return type(value).__name__
