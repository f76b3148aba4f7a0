"""The director (Uptane-style): from the rollout state and a vehicle's cohort, what it should run.

The repository (TUF) says *what is authentic*; the director says *what this vehicle should install*.
Rules:

- no rollout → keep whatever is installed (``version`` None);
- aborted → everyone runs the previous version (every exposed vehicle reverts);
- completed → everyone runs the new version;
- running or paused → vehicles inside the current stage's cohort get the release — as
  ``shadow_version`` (runs beside, never actuates) in a shadow stage, as ``version`` otherwise; all
  others run the previous version. Pausing freezes exposure; it never reverts anyone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from driveloop.ota.cohorts import in_cohort
from driveloop.ota.controller import RolloutPlan, RolloutState, Status

__all__ = ["Assignment", "assign", "assign_fleet", "fleet_share"]


@dataclass(frozen=True)
class Assignment:
    vehicle_id: str
    version: str | None  # the model that actuates
    shadow_version: str | None  # runs beside it, outputs compared, never actuates
    cohort: str  # "canary" | "shadow" | "control" | "none"
    reason: str


def assign(state: RolloutState | None, plan: RolloutPlan | None, vehicle_id: str, salt: str = "") -> Assignment:
    """What one vehicle should run now."""
    if state is None or plan is None:
        return Assignment(vehicle_id, None, None, "none", "no rollout")
    if state.status is Status.ABORTED:
        return Assignment(vehicle_id, state.previous_version, None, "control",
                          f"rollout {state.rollout_id} aborted: revert")
    if state.status is Status.COMPLETED:
        return Assignment(vehicle_id, state.version, None, "canary", f"rollout {state.rollout_id} completed")
    stage = state.stage(plan)
    if not in_cohort(vehicle_id, stage.fraction, salt):
        return Assignment(vehicle_id, state.previous_version, None, "control", f"outside the {stage.name} cohort")
    if stage.shadow:
        return Assignment(vehicle_id, state.previous_version, state.version, "shadow",
                          f"in the {stage.name} cohort: shadow only")
    return Assignment(vehicle_id, state.version, None, "canary", f"in the {stage.name} cohort")


def assign_fleet(state: RolloutState | None, plan: RolloutPlan | None, vehicle_ids: Iterable[str],
                 salt: str = "") -> list[Assignment]:
    return [assign(state, plan, v, salt) for v in vehicle_ids]


def fleet_share(assignments: Iterable[Assignment]) -> dict[str, int]:
    """How many vehicles each cohort holds (for metrics and the dashboard)."""
    return dict(Counter(a.cohort for a in assignments))
