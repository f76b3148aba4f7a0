"""Wire contracts of the fleet server (DESIGN.md: rollout/health messages), validated at the boundary.

Vehicles send :class:`HealthReport` every health window and ask :class:`UpdateCheck`; the server
answers :class:`UpdateOffer` (what the director says the vehicle should run). Operators start and
steer rollouts with :class:`RolloutStart` / :class:`OperatorRequest` and read :class:`RolloutStatus`.
Every model is frozen and forbids unknown fields, so a typo in a client is an error, not a silent default.
Every number is bounded (counts per window ``MAX_COUNT``, ``seq`` below 2**63, times and rates finite) and
every string and list has a length limit, so no request can reach the database or the controller with a
value they cannot hold: a bad request is a 422, never a 500. Operators are named by their admin token,
never by the request body.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from driveloop.core.ids import VEHICLE_ID_PATTERN
from driveloop.core.version import MODEL_VERSION_PATTERN

VERSION_PATTERN = MODEL_VERSION_PATTERN  # a registry version's canonical text: "3", never "v3" or "03"
HARDWARE_CLASS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
MAX_COUNT = 10**9  # ticks or events in one health window: 3 years of 10 Hz ticks
MAX_SEQ = 2**63 - 1  # what a database integer holds
MAX_TIME_S = 1e12  # window bounds, seconds (Unix time or simulated time)
MAX_MS = 1e7  # a latency, milliseconds

Role = Literal["active", "shadow"]
OperatorKind = Literal["pause", "resume", "promote", "abort"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShadowStats(_Wire):
    """Shadow mode: the new model ran beside the active one; its outputs were compared, never actuated."""

    compared_ticks: int = Field(ge=0, le=MAX_COUNT)
    disagreements: int = Field(ge=0, le=MAX_COUNT)
    mean_abs_diff: float = Field(ge=0.0, le=1e6, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounded(self) -> ShadowStats:
        if self.disagreements > self.compared_ticks:
            raise ValueError("disagreements cannot exceed compared_ticks")
        return self


class HealthReport(_Wire):
    """One vehicle's health over one window; ``seq`` increases strictly per vehicle (replay guard)."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    model_version: str = Field(pattern=VERSION_PATTERN)
    window_start_s: float = Field(ge=0.0, le=MAX_TIME_S, allow_inf_nan=False)
    window_end_s: float = Field(ge=0.0, le=MAX_TIME_S, allow_inf_nan=False)
    seq: int = Field(ge=0, le=MAX_SEQ)
    ticks: int = Field(ge=0, le=MAX_COUNT)
    fallback_interventions: int = Field(ge=0, le=MAX_COUNT)
    collisions: int = Field(ge=0, le=MAX_COUNT)
    deadline_misses: int = Field(ge=0, le=MAX_COUNT)
    inference_p99_ms: float = Field(ge=0.0, le=MAX_MS, allow_inf_nan=False)
    crashes: int = Field(ge=0, le=MAX_COUNT)
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


class InstallConfirmation(_Wire):
    """The vehicle's updater installed and booted ``version`` (``POST /v1/installed``): health reports
    count only for the version the director assigned and the vehicle confirmed this way."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)


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


_PlanKey = Annotated[str, Field(min_length=1, max_length=64)]
_PlanScalar = (bool | Annotated[int, Field(ge=-(2**53), le=2**53)]
               | Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)] | Annotated[str, Field(max_length=64)])
_PlanStage = Annotated[dict[_PlanKey, _PlanScalar | Annotated[dict[_PlanKey, _PlanScalar], Field(max_length=64)]],
                       Field(max_length=32)]


class RolloutPlanSpec(_Wire):
    """A rollout plan as operators send it (``RolloutPlan.to_dict()``): its shape and size are bounded
    here (stages of flat fields, tolerances one level down); what the fields mean and how stages must
    be ordered is the controller's rule, checked when the rollout starts."""

    stages: list[_PlanStage] = Field(max_length=16)
    gate_rules: int | None = Field(default=None, ge=0, le=10_000)

    def to_plan_dict(self) -> dict[str, Any]:
        """The dict ``RolloutPlan.from_dict`` reads (no ``gate_rules`` key when none was given)."""
        out: dict[str, Any] = {"stages": [dict(s) for s in self.stages]}
        if self.gate_rules is not None:
            out["gate_rules"] = self.gate_rules
        return out


class RolloutStart(_Wire):
    version: str = Field(pattern=VERSION_PATTERN)
    previous_version: str = Field(pattern=VERSION_PATTERN)
    plan: RolloutPlanSpec | None = None  # RolloutPlan.to_dict(); None → the default plan


class OperatorRequest(_Wire):
    """Why an operator acts; *who* acts is the name of the admin token the request carries."""

    reason: str = Field(default="", max_length=500)


class VehicleState(_Wire):
    """An admin's view of one vehicle after ``disable``/``enable``/``rotate`` (``token``: the new one,
    after a rotation only, shown once)."""

    vehicle_id: str
    enabled: bool
    token: str | None = None


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
