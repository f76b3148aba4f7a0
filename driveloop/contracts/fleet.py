"""Wire contracts of the fleet server (DESIGN.md: rollout/health messages), validated at the boundary.

Vehicles send :class:`HealthReport` every health window and ask :class:`UpdateCheck`; the server
answers :class:`UpdateOffer` (what the director says the vehicle should run). Operators start and
steer rollouts with :class:`RolloutStart` / :class:`OperatorRequest` and read :class:`RolloutStatus`.
Every model is frozen and forbids unknown fields, so a typo in a client is an error, not a silent default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from driveloop.core.ids import VEHICLE_ID_PATTERN
from driveloop.core.version import MODEL_VERSION_PATTERN

VERSION_PATTERN = MODEL_VERSION_PATTERN  # a registry version's canonical text: "3", never "v3" or "03"
HARDWARE_CLASS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"

Role = Literal["active", "shadow"]
OperatorKind = Literal["pause", "resume", "promote", "abort"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShadowStats(_Wire):
    """Shadow mode: the new model ran beside the active one; its outputs were compared, never actuated."""

    compared_ticks: int = Field(ge=0)
    disagreements: int = Field(ge=0)
    mean_abs_diff: float = Field(ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounded(self) -> ShadowStats:
        if self.disagreements > self.compared_ticks:
            raise ValueError("disagreements cannot exceed compared_ticks")
        return self


class HealthReport(_Wire):
    """One vehicle's health over one window; ``seq`` increases strictly per vehicle (replay guard)."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    model_version: str = Field(pattern=VERSION_PATTERN)
    window_start_s: float = Field(ge=0.0, allow_inf_nan=False)
    window_end_s: float = Field(ge=0.0, allow_inf_nan=False)
    seq: int = Field(ge=0)
    ticks: int = Field(ge=0)
    fallback_interventions: int = Field(ge=0)
    collisions: int = Field(ge=0)
    deadline_misses: int = Field(ge=0)
    inference_p99_ms: float = Field(ge=0.0, allow_inf_nan=False)
    crashes: int = Field(ge=0)
    shadow: ShadowStats | None = None

    @model_validator(mode="after")
    def _window(self) -> HealthReport:
        if self.window_end_s <= self.window_start_s:
            raise ValueError("window_end_s must be after window_start_s")
        if self.deadline_misses > self.ticks:
            raise ValueError("deadline_misses cannot exceed ticks")
        return self

    @property
    def duration_s(self) -> float:
        return self.window_end_s - self.window_start_s


class UpdateCheck(_Wire):
    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    current_version: str | None = Field(default=None, pattern=VERSION_PATTERN)


class UpdateOffer(_Wire):
    """What the vehicle should run now. ``shadow_version`` runs beside ``version`` and never actuates."""

    vehicle_id: str
    version: str | None
    shadow_version: str | None = None
    rollout_id: int | None = None
    stage: str | None = None
    reason: str


class VehicleEnrol(_Wire):
    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    hardware_class: str = Field(default="generic", pattern=HARDWARE_CLASS_PATTERN)


class VehicleCredential(_Wire):
    vehicle_id: str
    token: str


class RolloutStart(_Wire):
    version: str = Field(pattern=VERSION_PATTERN)
    previous_version: str = Field(pattern=VERSION_PATTERN)
    plan: dict[str, Any] | None = None  # RolloutPlan.to_dict(); None → the default plan


class OperatorRequest(_Wire):
    actor: str = Field(default="operator", min_length=1, max_length=64)
    reason: str = Field(default="", max_length=500)


class StageView(_Wire):
    name: str
    fraction: float
    shadow: bool


class RolloutStatus(_Wire):
    rollout_id: int
    version: str
    previous_version: str
    status: str
    stage: str
    stage_index: int
    stages: list[StageView]
    stage_entered_s: float
    evaluations_in_stage: int
    last_decision: dict[str, Any] | None
    reason: str
