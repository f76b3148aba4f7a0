"""ORM tables of the cloud catalog (private: the public API is ``cloud.catalog.Catalog``).

Portable column types only, so one schema serves SQLite and PostgreSQL. Segment events live in a child
table (not a JSON column) so "segments with an ``aeb`` event" is an indexed join on every backend.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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
