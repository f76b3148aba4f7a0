"""ORM tables of the cloud catalog (private: the public API is ``cloud.catalog.Catalog``).

Portable column types only, so one schema serves SQLite and PostgreSQL. Segment events live in a child
table (not a JSON column) so "segments with an ``aeb`` event" is an indexed join on every backend.
A segment's metadata (``contracts.segment.SegmentMeta``) maps to and from its columns in one place,
``segment_row`` / ``segment_meta``; the table layout is unchanged, so old databases keep working.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from driveloop.contracts.segment import SegmentMeta


class Base(DeclarativeBase):
    pass


class SegmentRow(Base):
    __tablename__ = "segments"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    vehicle: Mapped[str] = mapped_column(String(64), index=True)
    scenario: Mapped[str] = mapped_column(String(64), index=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    start_s: Mapped[float] = mapped_column(Float, index=True)
    end_s: Mapped[float] = mapped_column(Float)
    n_ticks: Mapped[int] = mapped_column(Integer)
    has_event: Mapped[bool] = mapped_column(Boolean, index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    ingested_at_s: Mapped[float] = mapped_column(Float)
    consumed_by_dataset: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    events: Mapped[list[SegmentEventRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class SegmentEventRow(Base):
    __tablename__ = "segment_events"
    sha256: Mapped[str] = mapped_column(ForeignKey("segments.sha256"), primary_key=True)
    event: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    count: Mapped[int] = mapped_column(Integer)


def segment_row(meta: SegmentMeta, *, sha256: str, size: int, name: str | None, ingested_at_s: float,
                consumed_by_dataset: str | None) -> SegmentRow:
    """The row of a segment: its metadata's columns (events as child rows) plus catalog bookkeeping.
    The catalog does not keep ``priority``, ``recorded_at_unix_s`` or the versions (no such columns)."""
    row = SegmentRow(
        sha256=sha256, vehicle=meta.vehicle, scenario=meta.scenario, seed=meta.seed,
        model_version=meta.model_version, start_s=meta.start_s, end_s=meta.end_s, n_ticks=meta.n_ticks,
        has_event=meta.has_event, size=size, name=name, ingested_at_s=ingested_at_s,
        consumed_by_dataset=consumed_by_dataset,
    )  # fmt: skip
    row.events = [SegmentEventRow(event=k, count=v) for k, v in sorted(meta.events.items())]
    return row


def segment_meta(row: SegmentRow) -> SegmentMeta:
    """A row's metadata back; what the catalog does not keep is None (see ``SegmentMeta``)."""
    return SegmentMeta(
        vehicle=row.vehicle, scenario=row.scenario, seed=row.seed, model_version=row.model_version,
        start_s=row.start_s, end_s=row.end_s, n_ticks=row.n_ticks,
        events={e.event: e.count for e in sorted(row.events, key=lambda e: e.event)},
        has_event=row.has_event, priority=None, recorded_at_unix_s=None, obs_version=None, schema_version=None,
    )  # fmt: skip


class VehicleRow(Base):
    __tablename__ = "vehicles"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at_s: Mapped[float] = mapped_column(Float)


class UploadRow(Base):
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vehicle: Mapped[str] = mapped_column(ForeignKey("vehicles.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(255))
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at_s: Mapped[float] = mapped_column(Float)
    updated_at_s: Mapped[float] = mapped_column(Float)


class StreamEventRow(Base):
    """A vehicle event from the live stream (``contracts.stream.VehicleEvent``), keyed on (vehicle, seq):
    indexing a redelivered or replayed event again is a no-op, however late it comes."""

    __tablename__ = "stream_events"
    vehicle: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    t_s: Mapped[float] = mapped_column(Float, index=True)
    wall_ts: Mapped[float] = mapped_column(Float, index=True)
    road: Mapped[str] = mapped_column(String(32))
    x_m: Mapped[float] = mapped_column(Float)
    lane: Mapped[int] = mapped_column(Integer)
    speed_mps: Mapped[float] = mapped_column(Float)
    decel_mps2: Mapped[float] = mapped_column(Float)
    scenario: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class CampaignRow(Base):
    __tablename__ = "campaigns"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    condition: Mapped[str] = mapped_column(String(500))
    trigger_mode: Mapped[str] = mapped_column(String(16))
    min_interval_s: Mapped[float] = mapped_column(Float)
    pre_window_s: Mapped[float] = mapped_column(Float)
    post_window_s: Mapped[float] = mapped_column(Float)
    priority: Mapped[int] = mapped_column(Integer)
    expires_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    created_at_s: Mapped[float] = mapped_column(Float)
    approved_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
