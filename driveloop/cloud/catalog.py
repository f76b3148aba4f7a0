"""The cloud catalog (SQLAlchemy 2): which segments exist, who may upload, uploads in flight, campaigns.

SQLite file by default, PostgreSQL (or any SQLAlchemy URL) for scale-out; the same code runs on both
(portable types only; events live in a child table rather than a JSON column so "segments with a
``aeb`` event" is a plain indexed join everywhere).
Rules it keeps:
- A segment row is written once, keyed by its sha256: cataloging the same bytes twice is a no-op,
  so a retried upload can never make a segment land twice.
- Finishing an upload and cataloging its segment is one transaction.
- ``consumed_by_dataset`` is set once, by the pipeline, after a dataset version built from the
  segment exists; "new" segments are exactly the unconsumed ones.
- Every database failure surfaces as StorageError.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, create_engine, event, exists, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from driveloop.cloud._catalog_schema import (
    Base,
    CampaignRow,
    SegmentEventRow,
    SegmentRow,
    StreamEventRow,
    UploadRow,
    VehicleRow,
    segment_meta,
    segment_row,
)
from driveloop.cloud.campaigns import Campaign, CampaignSpec
from driveloop.contracts.segment import SegmentInfo, SegmentMeta
from driveloop.core.exceptions import ConfigError, StorageError

logger = logging.getLogger(__name__)

UPLOAD_OPEN = "open"
UPLOAD_DONE = "done"
UPLOAD_FAILED = "failed"


@dataclass(frozen=True)
class SegmentRecord:
    """One cataloged segment: its metadata (``meta``, the contract's one definition; read back from
    the database it lacks what the catalog does not keep, see ``SegmentMeta``) plus cloud bookkeeping."""

    sha256: str
    meta: SegmentMeta
    size: int
    ingested_at_s: float
    name: str | None = None
    consumed_by_dataset: str | None = None

    @classmethod
    def from_info(cls, info: SegmentInfo, ingested_at_s: float, name: str | None = None) -> SegmentRecord:
        """Build from a validated ``SegmentInfo``."""
        return cls(sha256=info.sha256, meta=info.meta, size=int(info.size), ingested_at_s=float(ingested_at_s),
                   name=name)

    def to_json(self) -> dict[str, Any]:
        """The flat JSON row reports print (``cloud segments list --json``); keys as they always were."""
        m = self.meta
        return {
            "sha256": self.sha256, "vehicle": m.vehicle, "scenario": m.scenario, "seed": m.seed,
            "model_version": m.model_version, "start_s": m.start_s, "end_s": m.end_s, "n_ticks": m.n_ticks,
            "events": dict(m.events), "has_event": m.has_event, "size": self.size,
            "ingested_at_s": self.ingested_at_s, "name": self.name, "consumed_by_dataset": self.consumed_by_dataset,
        }  # fmt: skip


@dataclass(frozen=True)
class VehicleRecord:
    id: str
    token_hash: str
    enabled: bool
    created_at_s: float


@dataclass(frozen=True)
class UploadRecord:
    id: str
    vehicle: str
    sha256: str
    size: int
    name: str
    offset: int
    state: str
    created_at_s: float
    updated_at_s: float
    error: str | None = None


@dataclass(frozen=True)
class SegmentQuery:
    """Filters for :meth:`Catalog.segments`; None means "any". Times select overlapping segments."""

    vehicle: str | None = None
    scenario: str | None = None
    model_version: str | None = None
    event: str | None = None
    has_event: bool | None = None
    from_s: float | None = None
    until_s: float | None = None
    unconsumed: bool | None = None
    limit: int | None = None
    live_events_first: bool = False  # segments a live stream event falls in come first (stream_events)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class StreamEventRecord:
    """One indexed live-stream event (``contracts.stream.VehicleEvent``'s columns); key (vehicle, seq)."""

    vehicle: str
    seq: int
    kind: str
    t_s: float
    wall_ts: float
    road: str
    x_m: float
    lane: int
    speed_mps: float
    decel_mps2: float
    scenario: str
    model_version: str | None = None
    trace_id: str | None = None


_STREAM_EVENT_FIELDS = tuple(StreamEventRecord.__dataclass_fields__)


def _segment_record(row: SegmentRow) -> SegmentRecord:
    return SegmentRecord(
        sha256=row.sha256, meta=segment_meta(row), size=row.size, ingested_at_s=row.ingested_at_s, name=row.name,
        consumed_by_dataset=row.consumed_by_dataset,
    )  # fmt: skip


def _upload_record(row: UploadRow) -> UploadRecord:
    return UploadRecord(
        id=row.id, vehicle=row.vehicle, sha256=row.sha256, size=row.size, name=row.name,
        offset=row.offset, state=row.state, created_at_s=row.created_at_s,
        updated_at_s=row.updated_at_s, error=row.error,
    )  # fmt: skip


def _campaign_record(row: CampaignRow) -> Campaign:
    spec = CampaignSpec(
        name=row.name, condition=row.condition, trigger_mode=row.trigger_mode,
        min_interval_s=row.min_interval_s, pre_window_s=row.pre_window_s,
        post_window_s=row.post_window_s, priority=row.priority, expires_at_s=row.expires_at_s,
    )  # fmt: skip
    return Campaign(row.id, spec, row.state, row.created_at_s, row.approved_at_s)


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StorageError(f"not a database URL: {url!r}") from e
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create_engine(url, connect_args={"timeout": 30})
        except ArgumentError as e:
            first = str(e).splitlines()[0]
            raise StorageError(f"cannot open catalog {parsed.render_as_string(hide_password=True)}: {first}") from e

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the ingest writer
            cur.execute("PRAGMA synchronous=FULL")  # a cataloged segment survives a power cut
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as e:
        raise StorageError(f"cannot open catalog {parsed.render_as_string(hide_password=True)}: {e}") from e


class Catalog:
    """The catalog database at ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://…``)."""

    def __init__(self, url: str) -> None:
        self._engine = _engine(url)
        self.url = self._engine.url.render_as_string(hide_password=True)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            Base.metadata.create_all(self._engine)
        except SQLAlchemyError as e:
            raise StorageError(f"cannot open catalog {self.url}: {e}") from e

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except StorageError:
            raise
        except SQLAlchemyError as e:
            raise StorageError(f"catalog {self.url}: {e}") from e

    # -- segments ----------------------------------------------------------------------------
    def add_segment(self, record: SegmentRecord) -> bool:
        """Catalog a segment; False (and nothing changed) if its sha256 is already cataloged."""
        try:
            with self._session() as s:
                if s.get(SegmentRow, record.sha256) is not None:
                    return False
                s.add(self._segment_row(record))
            return True
        except StorageError as e:
            if isinstance(e.__cause__, IntegrityError):  # a concurrent insert of the same bytes won
                return False
            raise

    @staticmethod
    def _segment_row(r: SegmentRecord) -> SegmentRow:
        return segment_row(r.meta, sha256=r.sha256, size=r.size, name=r.name, ingested_at_s=r.ingested_at_s,
                           consumed_by_dataset=r.consumed_by_dataset)

    def get_segment(self, sha256: str) -> SegmentRecord | None:
        with self._session() as s:
            row = s.get(SegmentRow, sha256)
            return None if row is None else _segment_record(row)

    def has_segment(self, sha256: str) -> bool:
        with self._session() as s:
            return s.get(SegmentRow, sha256) is not None

    def segments(self, query: SegmentQuery | None = None) -> list[SegmentRecord]:
        """Segments matching every given filter, oldest first (start time, then sha256)."""
        q = query or SegmentQuery()
        stmt = select(SegmentRow)
        if q.vehicle is not None:
            stmt = stmt.where(SegmentRow.vehicle == q.vehicle)
        if q.scenario is not None:
            stmt = stmt.where(SegmentRow.scenario == q.scenario)
        if q.model_version is not None:
            stmt = stmt.where(SegmentRow.model_version == q.model_version)
        if q.has_event is not None:
            stmt = stmt.where(SegmentRow.has_event == q.has_event)
        if q.from_s is not None:
            stmt = stmt.where(SegmentRow.end_s >= q.from_s)
        if q.until_s is not None:
            stmt = stmt.where(SegmentRow.start_s <= q.until_s)
        if q.unconsumed is not None:
            consumed = SegmentRow.consumed_by_dataset
            stmt = stmt.where(consumed.is_(None) if q.unconsumed else consumed.is_not(None))
        if q.event is not None:
            stmt = stmt.where(
                SegmentRow.sha256.in_(
                    select(SegmentEventRow.sha256).where(SegmentEventRow.event == q.event, SegmentEventRow.count > 0)
                )
            )
        order: list[Any] = []
        if q.live_events_first:  # a segment that holds a live event of its vehicle and scenario first
            live = exists().where(StreamEventRow.vehicle == SegmentRow.vehicle,
                                  StreamEventRow.scenario == SegmentRow.scenario,
                                  StreamEventRow.t_s >= SegmentRow.start_s, StreamEventRow.t_s <= SegmentRow.end_s)
            order.append(case((live, 0), else_=1))
        stmt = stmt.order_by(*order, SegmentRow.start_s, SegmentRow.vehicle, SegmentRow.seed, SegmentRow.sha256)  # stable, not by hash
        if q.limit is not None:
            stmt = stmt.limit(q.limit)
        with self._session() as s:
            return [_segment_record(r) for r in s.scalars(stmt)]

    def new_segments(self, limit: int | None = None) -> list[SegmentRecord]:
        """Segments no dataset version has consumed yet (the pipeline's input); those holding a live
        stream event come first, so a limited pipeline run learns from them before routine data."""
        return self.segments(SegmentQuery(unconsumed=True, limit=limit, live_events_first=True))

    def mark_consumed(self, sha256s: Iterable[str], dataset_version: str) -> int:
        """Record that ``dataset_version`` consumed these segments; returns how many were new to it.
        A segment already consumed by an earlier dataset keeps its first consumer."""
        if not dataset_version:
            raise ConfigError("dataset_version must be non-empty")
        shas = sorted(set(sha256s))
        if not shas:
            return 0
        with self._session() as s:
            known = set(s.scalars(select(SegmentRow.sha256).where(SegmentRow.sha256.in_(shas))))
            missing = set(shas) - known
            if missing:
                raise StorageError(f"cannot mark unknown segments consumed: {sorted(missing)[:3]}")
            result = s.execute(
                update(SegmentRow)
                .where(SegmentRow.sha256.in_(shas), SegmentRow.consumed_by_dataset.is_(None))
                .values(consumed_by_dataset=dataset_version)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    # -- live stream events (cloud.stream_sinks) ---------------------------------------------
    def add_stream_events(self, records: Iterable[StreamEventRecord]) -> int:
        """Index events; one whose (vehicle, seq) is already indexed is skipped. Returns how many were new."""
        by_key = {(r.vehicle, r.seq): r for r in records}
        if not by_key:
            return 0
        with self._session() as s:
            known: set[tuple[str, int]] = set()
            for vehicle in {v for v, _ in by_key}:
                seqs = [q for v, q in by_key if v == vehicle]
                rows = s.execute(select(StreamEventRow.seq).where(StreamEventRow.vehicle == vehicle,
                                                                   StreamEventRow.seq.in_(seqs)))
                known.update((vehicle, q) for (q,) in rows)
            new = [r for k, r in by_key.items() if k not in known]
            s.add_all(StreamEventRow(**{f: getattr(r, f) for f in _STREAM_EVENT_FIELDS}) for r in new)
            return len(new)

    def stream_events(self, *, vehicle: str | None = None, kind: str | None = None, from_s: float | None = None,
                      until_s: float | None = None, since_wall_ts: float | None = None,
                      limit: int | None = None) -> list[StreamEventRecord]:
        """Indexed events matching every given filter (times: the vehicle's ``t_s``), by vehicle then seq."""
        stmt = select(StreamEventRow)
        for column, value in ((StreamEventRow.vehicle, vehicle), (StreamEventRow.kind, kind)):
            if value is not None:
                stmt = stmt.where(column == value)
        if from_s is not None:
            stmt = stmt.where(StreamEventRow.t_s >= from_s)
        if until_s is not None:
            stmt = stmt.where(StreamEventRow.t_s <= until_s)
        if since_wall_ts is not None:
            stmt = stmt.where(StreamEventRow.wall_ts >= since_wall_ts)
        stmt = stmt.order_by(StreamEventRow.vehicle, StreamEventRow.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._session() as s:
            return [StreamEventRecord(**{f: getattr(r, f) for f in _STREAM_EVENT_FIELDS}) for r in s.scalars(stmt)]

    # -- vehicles ----------------------------------------------------------------------------
    def add_vehicle(self, vehicle_id: str, token_hash: str, now_s: float) -> VehicleRecord:
        with self._session() as s:
            if s.get(VehicleRow, vehicle_id) is not None:
                raise ConfigError(f"vehicle {vehicle_id!r} is already registered (rotate its token instead)")
            row = VehicleRow(id=vehicle_id, token_hash=token_hash, enabled=True, created_at_s=float(now_s))
            s.add(row)
            return VehicleRecord(row.id, row.token_hash, row.enabled, row.created_at_s)

    def get_vehicle(self, vehicle_id: str) -> VehicleRecord | None:
        with self._session() as s:
            row = s.get(VehicleRow, vehicle_id)
            return None if row is None else VehicleRecord(row.id, row.token_hash, row.enabled, row.created_at_s)

    def vehicles(self) -> list[VehicleRecord]:
        with self._session() as s:
            rows = s.scalars(select(VehicleRow).order_by(VehicleRow.id))
            return [VehicleRecord(r.id, r.token_hash, r.enabled, r.created_at_s) for r in rows]

    def update_vehicle(self, vehicle_id: str, *, token_hash: str | None = None, enabled: bool | None = None) -> None:
        with self._session() as s:
            row = s.get(VehicleRow, vehicle_id)
            if row is None:
                raise ConfigError(f"unknown vehicle {vehicle_id!r}")
            if token_hash is not None:
                row.token_hash = token_hash
            if enabled is not None:
                row.enabled = enabled

    # -- uploads -----------------------------------------------------------------------------
    def create_upload(self, upload_id: str, vehicle: str, sha256: str, size: int, name: str, now_s: float) -> UploadRecord:
        with self._session() as s:
            row = UploadRow(
                id=upload_id, vehicle=vehicle, sha256=sha256, size=size, name=name, offset=0,
                state=UPLOAD_OPEN, created_at_s=float(now_s), updated_at_s=float(now_s),
            )  # fmt: skip
            s.add(row)
            s.flush()
            return _upload_record(row)

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self._session() as s:
            row = s.get(UploadRow, upload_id)
            return None if row is None else _upload_record(row)

    def open_upload(self, vehicle: str, sha256: str) -> UploadRecord | None:
        """The vehicle's unfinished upload of these bytes, if any (so a restart resumes it)."""
        stmt = (
            select(UploadRow)
            .where(UploadRow.vehicle == vehicle, UploadRow.sha256 == sha256, UploadRow.state == UPLOAD_OPEN)
            .order_by(UploadRow.created_at_s.desc())
            .limit(1)
        )
        with self._session() as s:
            row = s.scalars(stmt).first()
            return None if row is None else _upload_record(row)

    def uploads(self, state: str | None = None, vehicle: str | None = None) -> list[UploadRecord]:
        stmt = select(UploadRow).order_by(UploadRow.created_at_s, UploadRow.id)
        if state is not None:
            stmt = stmt.where(UploadRow.state == state)
        if vehicle is not None:
            stmt = stmt.where(UploadRow.vehicle == vehicle)
        with self._session() as s:
            return [_upload_record(r) for r in s.scalars(stmt)]

    def set_upload_offset(self, upload_id: str, offset: int, now_s: float) -> None:
        with self._session() as s:
            s.execute(update(UploadRow).where(UploadRow.id == upload_id).values(offset=offset, updated_at_s=float(now_s)))

    def fail_upload(self, upload_id: str, error: str, now_s: float) -> None:
        with self._session() as s:
            s.execute(
                update(UploadRow)
                .where(UploadRow.id == upload_id)
                .values(state=UPLOAD_FAILED, error=error[:500], updated_at_s=float(now_s))
            )

    def complete_upload(self, upload_id: str, record: SegmentRecord, now_s: float) -> bool:
        """Mark the upload done and catalog its segment in one transaction; False if the segment was
        already cataloged (by another upload of the same bytes)."""
        with self._session() as s:
            s.execute(
                update(UploadRow)
                .where(UploadRow.id == upload_id)
                .values(state=UPLOAD_DONE, offset=record.size, updated_at_s=float(now_s))
            )
            if s.get(SegmentRow, record.sha256) is not None:
                return False
            s.add(self._segment_row(record))
            return True

    # -- campaigns ---------------------------------------------------------------------------
    def save_campaign(self, campaign: Campaign) -> None:
        """Insert or update a campaign (the lifecycle rules live in cloud.campaigns)."""
        sp = campaign.spec
        values = {
            "name": sp.name, "condition": sp.condition, "trigger_mode": sp.trigger_mode,
            "min_interval_s": sp.min_interval_s, "pre_window_s": sp.pre_window_s,
            "post_window_s": sp.post_window_s, "priority": sp.priority, "expires_at_s": sp.expires_at_s,
            "state": campaign.state, "created_at_s": campaign.created_at_s, "approved_at_s": campaign.approved_at_s,
        }  # fmt: skip
        with self._session() as s:
            row = s.get(CampaignRow, campaign.id)
            if row is None:
                s.add(CampaignRow(id=campaign.id, **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)

    def get_campaign(self, campaign_id: str) -> Campaign | None:
        with self._session() as s:
            row = s.get(CampaignRow, campaign_id)
            return None if row is None else _campaign_record(row)

    def campaigns(self, state: str | None = None) -> list[Campaign]:
        stmt = select(CampaignRow).order_by(CampaignRow.created_at_s, CampaignRow.id)
        if state is not None:
            stmt = stmt.where(CampaignRow.state == state)
        with self._session() as s:
            return [_campaign_record(r) for r in s.scalars(stmt)]
