"""Which health reports may steer a rollout (DESIGN.md: Health — trust none of them blindly). Pure.

A report is the vehicle's word; the server counts it only where it can check it against its own
records and its own clock (``now_s``, injected). In order, the first that holds rejects:

| reason | the report … |
|---|---|
| ``not_confirmed`` | names a version other than the one this vehicle confirmed installing, or a confirmation made under another rollout (the confirmation itself is accepted only for the version the director assigned it, :func:`confirmable`) |
| ``future_window`` | ends after ``now_s + clock_skew_s`` |
| ``overlapping_window`` | starts before the end of the vehicle's previous accepted window |
| ``window_too_long`` | spans more than ``report_interval_s + slack_s`` |

A rejected report changes no statistic; the server counts it per reason (``/metrics``), logs it and
writes it to the audit chain. With no rollout, the director assigns nothing ("keep what is installed"),
so a confirmation of any version stands, but only for reports while there is still no rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

from driveloop.contracts.fleet import HealthReport
from driveloop.core.exceptions import ConfigError

__all__ = ["AdmissionPolicy", "VehicleRecord", "REJECT_REASONS", "admit", "confirmable"]

REJECT_REASONS = ("not_confirmed", "future_window", "overlapping_window", "window_too_long")


@dataclass(frozen=True)
class AdmissionPolicy:
    report_interval_s: float = 600.0  # how often vehicles report: one window's length
    slack_s: float = 60.0  # a window may run this much longer (a late report)
    clock_skew_s: float = 5.0  # a vehicle's clock may run this much ahead of the server's

    def __post_init__(self) -> None:
        if not (self.report_interval_s > 0 and self.slack_s >= 0 and self.clock_skew_s >= 0):
            raise ConfigError(f"bad admission policy {self}")


@dataclass(frozen=True)
class VehicleRecord:
    """What the server knows of one vehicle: its assignment (at its last update check), its last
    install confirmation and the end of its last accepted health window."""

    assigned_rollout: int | None = None
    assigned_version: str | None = None
    confirmed_rollout: int | None = None
    confirmed_version: str | None = None
    last_window_end_s: float | None = None


def confirmable(record: VehicleRecord, version: str, rollout_id: int | None) -> bool:
    """A vehicle may confirm only what the director assigned it under the current rollout (or anything,
    when there is no rollout: the director then says "keep what is installed")."""
    if rollout_id is None:
        return True
    return record.assigned_rollout == rollout_id and record.assigned_version == version


def admit(report: HealthReport, record: VehicleRecord, rollout_id: int | None, now_s: float,
          policy: AdmissionPolicy) -> str | None:
    """None when the report may count, else the reason (one of :data:`REJECT_REASONS`)."""
    if report.model_version != record.confirmed_version or record.confirmed_rollout != rollout_id:
        return "not_confirmed"
    if report.window_end_s > now_s + policy.clock_skew_s:
        return "future_window"
    if record.last_window_end_s is not None and report.window_start_s < record.last_window_end_s:
        return "overlapping_window"
    if report.duration_s > policy.report_interval_s + policy.slack_s:
        return "window_too_long"
    return None
