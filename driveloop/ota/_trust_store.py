"""The fleet store's per-vehicle trust records (:class:`~driveloop.ota.admission.VehicleRecord`) and the
count of rejected health reports per reason. Own tables, so databases from before gain them by
``create_all``; every function runs inside the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.engine import Connection

from driveloop.ota.admission import VehicleRecord

trust_md = MetaData()
vehicle_trust = Table(
    "vehicle_trust", trust_md,
    Column("vehicle_id", String(64), primary_key=True),
    Column("assigned_rollout", Integer, nullable=True),
    Column("assigned_version", String(64), nullable=True),
    Column("confirmed_rollout", Integer, nullable=True),
    Column("confirmed_version", String(64), nullable=True),
    Column("last_window_end_s", Float, nullable=True),
)
rejected_reports = Table(
    "rejected_reports", trust_md,
    Column("reason", String(32), primary_key=True),
    Column("count", Integer, nullable=False),
)
_FIELDS = ("assigned_rollout", "assigned_version", "confirmed_rollout", "confirmed_version", "last_window_end_s")


def load_record(c: Connection, vehicle_id: str) -> VehicleRecord:
    row = c.execute(select(*(vehicle_trust.c[f] for f in _FIELDS))
                    .where(vehicle_trust.c.vehicle_id == vehicle_id)).first()
    return VehicleRecord() if row is None else VehicleRecord(*row)


def save_record(c: Connection, vehicle_id: str, **values: Any) -> None:
    if c.execute(update(vehicle_trust).where(vehicle_trust.c.vehicle_id == vehicle_id).values(**values)).rowcount == 0:
        c.execute(insert(vehicle_trust).values(vehicle_id=vehicle_id, **values))


def count_rejected(c: Connection, reason: str) -> None:
    if c.execute(update(rejected_reports).where(rejected_reports.c.reason == reason)
                 .values(count=rejected_reports.c.count + 1)).rowcount == 0:
        c.execute(insert(rejected_reports).values(reason=reason, count=1))


def rejected_counts(c: Connection) -> dict[str, int]:
    return {r: n for r, n in c.execute(select(rejected_reports.c.reason, rejected_reports.c.count))}
