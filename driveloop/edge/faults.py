"""Fault injection: the table of faults a drive can inject, and ``FaultyRunner`` for in-process models.

Why one table: the model process (:mod:`~driveloop.edge.isolated`), :class:`FaultyRunner`, the fleet runner
and the vehicle's sensors all act on the same fault names (``driveloop drive --fault``). Each reads what a
fault does from its row in :data:`FAULTS` instead of comparing strings, so a new fault is one row and an
unknown name is refused with the valid ones listed (:func:`lookup`).

- kill: the model process is SIGKILLed (in-process: every call raises) — one event, not a window;
- hang: the request is never answered (in-process: blocks ``hang_s``, then raises);
- nan: NaN actions; garbage: wrong shapes and huge values;
- late: the reply comes after a delay;
- error: ONNX Runtime raises inside ``run`` (an untyped ``Fail``, not a ModelError), as a failing kernel would;
- stale: the sensors stop delivering and the last frame repeats (injected on the sensor side).

Detecting them is the safety watchdog's job; its verdict names (``driveloop.safety.FAULT_KINDS``: what it
saw, e.g. ``deadline`` for a hang) are a different vocabulary from these (what was injected).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import numpy as np

from driveloop.core.exceptions import ConfigError, ModelError

if TYPE_CHECKING:
    from driveloop.contracts.manifest import ModelManifest
    from driveloop.edge.runtime import ModelRunner

__all__ = ["FAULTS", "GARBAGE_VALUE", "MODEL_FAULTS", "SENSOR_FAULTS", "Fault", "FaultyRunner", "lookup"]

GARBAGE_VALUE = 3.0e38  # near float32 max: "huge" without being inf
Side = Literal["model", "sensor"]
Outputs = tuple[np.ndarray, np.ndarray]


def _nan(action: np.ndarray, conf: np.ndarray) -> Outputs:
    return np.full_like(action, np.nan), conf


def _garbage(action: np.ndarray, conf: np.ndarray) -> Outputs:
    n = action.shape[0]
    return np.full((n, 5), GARBAGE_VALUE, np.float32), np.full((n, 3), -GARBAGE_VALUE, np.float32)


def _ort_failure() -> Exception:
    """What ONNX Runtime raises when a kernel fails inside ``run``: untyped, not one of our errors."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    return Fail("[ONNXRuntimeError] : 1 : FAIL : injected fault: a kernel failed inside run")


@dataclass(frozen=True)
class Fault:
    """What one injectable fault does; ``side`` says who injects it (the model runner or the sensors)."""

    name: str
    side: Side
    kills: bool = False  # the model dies at once: one event, not a window of bad calls
    hangs: bool = False  # the request is never answered
    late: bool = False  # the reply comes after the runner's delay
    corrupt: Callable[[np.ndarray, np.ndarray], Outputs] | None = None  # rewrites the model's outputs
    raises: Callable[[], Exception] | None = None  # the call raises this instead of answering
    freezes_sensors: bool = False  # the sensor stack repeats its last frame


# The order is the order of the valid names in error messages.
FAULTS: Mapping[str, Fault] = MappingProxyType({f.name: f for f in (
    Fault("kill", "model", kills=True),
    Fault("hang", "model", hangs=True),
    Fault("nan", "model", corrupt=_nan),
    Fault("garbage", "model", corrupt=_garbage),
    Fault("late", "model", late=True),
    Fault("error", "model", raises=_ort_failure),
    Fault("stale", "sensor", freezes_sensors=True),
)})
MODEL_FAULTS = tuple(name for name, f in FAULTS.items() if f.side == "model")
SENSOR_FAULTS = tuple(name for name, f in FAULTS.items() if f.side == "sensor")


def lookup(name: str, side: Side | None = None) -> Fault:
    """The row of fault ``name`` (only ``side``'s faults when given); ConfigError listing the valid names."""
    row = FAULTS.get(name)
    if row is not None and (side is None or row.side == side):
        return row
    valid = [n for n, f in FAULTS.items() if side is None or f.side == side]
    what = "fault" if side is None else f"{side} fault"
    raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")


class FaultyRunner:
    """Applies the same faults to an in-process ModelRunner (no isolation: 'hang' blocks for ``hang_s``)."""

    def __init__(self, inner: ModelRunner, *, late_s: float = 0.3, hang_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner, self.late_s, self.hang_s, self._sleep = inner, late_s, hang_s, sleep
        self._fault: Fault | None = None
        self._left: int | None = 0

    def inject(self, kind: str, count: int | None = 1) -> None:
        """kill: raise for ``count`` calls (None = until clear()); others: corrupt the next ``count`` calls."""
        self._fault, self._left = lookup(kind, "model"), count

    def clear(self) -> None:
        self._fault, self._left = None, 0

    @property
    def manifest(self) -> ModelManifest:
        return self.inner.manifest

    @property
    def provider(self) -> str:
        return f"faulty:{self.inner.provider}"

    def run(self, batch: dict[str, np.ndarray]) -> Outputs:
        fault = self._fault if self._left is None or self._left > 0 else None
        if fault is not None and self._left is not None:
            self._left -= 1
        if fault is None:
            return self.inner.run(batch)
        if fault.kills:
            raise ModelError("model is dead (injected kill)")
        if fault.hangs:
            self._sleep(self.hang_s)
            raise ModelError(f"model hung for {self.hang_s}s (injected)")
        if fault.raises is not None:
            raise fault.raises()
        action, conf = self.inner.run(batch)
        if fault.late:
            self._sleep(self.late_s)
        return fault.corrupt(action, conf) if fault.corrupt is not None else (action, conf)
