"""In-memory fake ModelRunner: deterministic outputs computed from the inputs, optional programmed faults.

Use it wherever a test needs a policy but not ONNX Runtime (control loop, fleet batching, supervisor).
The outputs are a simple, explainable controller so tests can assert on them:
accel = clip(gain * (set_speed - speed), -max_brake, max_throttle), steering = -k * lane_offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from driveloop.contracts.manifest import ModelManifest
from driveloop.contracts import observation as C
from driveloop.edge.fleet import BatchResult
from driveloop.edge.runtime import validate_batch
from driveloop.core.exceptions import ConfigError, ModelError

FAULT_KINDS = ("raise", "nan", "garbage")
_SPEED = C.EGO_FEATURES.index("speed_mps")
_SET_SPEED = C.EGO_FEATURES.index("set_speed_mps")
_LANE_OFFSET = C.EGO_FEATURES.index("lane_offset_m")


def fake_manifest(version: int = 1, *, name: str = "fake", parent_version: int | None = None) -> ModelManifest:
    """A valid manifest for a model that exists only in memory (sha256 of nothing real)."""
    c = C.io_contract()
    return ModelManifest(
        name=name, version=version, sha256=f"{version:064x}", inputs=c["inputs"], outputs=c["outputs"],
        obs_version=c["obs_version"], parent_version=parent_version, created_at="2026-01-01T00:00:00+00:00",
    )


@dataclass
class FakeRunner:
    """Deterministic ModelRunner. ``faults`` maps a 0-based call index to a fault kind in FAULT_KINDS;
    ``errors`` maps a call index to what that call raises (an ORT ``Fail``, a MemoryError…), as a session
    that fails mid-drive would."""

    version: int = 1
    gain_per_s: float = 0.5
    steer_gain_rad_per_m: float = 0.05
    max_throttle_mps2: float = 2.0
    max_brake_mps2: float = 3.0
    confidence: float = 0.9
    faults: dict[int, str] = field(default_factory=dict)
    errors: dict[int, Callable[[], BaseException]] = field(default_factory=dict)
    calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.faults.items() if v not in FAULT_KINDS}
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; use {FAULT_KINDS}")
        self._manifest = fake_manifest(self.version)

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def provider(self) -> str:
        return "FakeRunner"

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = validate_batch(batch)
        index = self.calls
        self.calls += 1
        self.batch_sizes.append(n)
        fault = self.faults.get(index)
        if index in self.errors:
            raise self.errors[index]()
        if fault == "raise":
            raise ModelError(f"FakeRunner programmed failure at call {index}")
        kin = batch["kinematics"]
        accel = np.clip(self.gain_per_s * (kin[:, _SET_SPEED] - kin[:, _SPEED]), -self.max_brake_mps2, self.max_throttle_mps2)
        steer = -self.steer_gain_rad_per_m * kin[:, _LANE_OFFSET]
        action = np.stack([accel, steer], axis=1).astype(np.float32)
        conf = np.full((n, 1), self.confidence, dtype=np.float32)
        if fault == "nan":
            action[:] = np.nan
        elif fault == "garbage":
            return np.full((n, 7), 1e30, dtype=np.float32), conf
        return action, conf


@dataclass
class StubClient:
    """An InferenceClient over a FakeRunner that reports a scripted ``latency_s`` (no clock: latency
    accounting is tested without timing) and adds ``accel_offset_by_row`` to chosen rows of each batch
    (a shadow model that disagrees with the main one on some vehicles only)."""

    runner: FakeRunner = field(default_factory=FakeRunner)
    latency_s: float = 0.001
    accel_offset_by_row: dict[int, float] = field(default_factory=dict)

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> BatchResult:
        action, conf = self.runner.run(batch)
        for row, offset in self.accel_offset_by_row.items():
            action[row, 0] += offset
        return BatchResult(action, conf, self.latency_s, alive=True)

    def inject(self, kind: str, count: int | None = 1) -> None:
        raise ConfigError("StubClient takes no faults")
