"""Durable fleet state in SQLite (SQLAlchemy Core): rollouts, their event logs, health reports,
latest health per vehicle, hashed vehicle credentials (and which are disabled) and the audit chain.

Every mutation is one transaction, so a crash never leaves an event without its audit entry or a
health report without its vehicle's new ``last_seq``. The controller state is never stored: it is
rebuilt by replaying the event log (:func:`driveloop.ota.controller.replay`), cached per event count.
Vehicle authentication answers an unknown vehicle and a wrong token with the same error after the same
work (``BAD_CREDENTIALS``); a disabled vehicle with a right token is refused (403) on its next request.
Enrolment, disabling, enabling and token rotation are audited with the admin's name.

Replicas: several fleet servers may share one PostgreSQL database. Every write transaction first takes
one transaction-scoped advisory lock (``pg_advisory_xact_lock``), so writes from all replicas are
serialised as one process's are by ``lock``: the audit chain stays a chain, a vehicle's ``last_seq``
check holds, and a rollout decision (read state, decide, append — :meth:`FleetStore.writing`) is made
by one replica at a time and is never repeated by another that was waiting. A replica killed mid-write
loses its open transaction (PostgreSQL rolls it back and frees the lock), never a committed one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import SQLAlchemyError

from driveloop.contracts.fleet import HealthReport
from driveloop.core.exceptions import AuthError, OtaError, StaleReportError, StorageError
from driveloop.core.tokens import hash_token, new_token, verify_token
from driveloop.ota import _trust_store as trust
from driveloop.ota.admission import AdmissionPolicy, admit, confirmable
from driveloop.ota.audit import AuditEntry, VerifyResult, make_entry, verify
from driveloop.ota.controller import RolloutEvent, RolloutPlan, RolloutState, Status, plan_of, replay
from driveloop.ota.gates import CohortStats, HealthWindow, ShadowAggregate
from driveloop.ota.robust import robust_cohort, robust_shadow

logger = logging.getLogger(__name__)

BAD_CREDENTIALS = "unknown vehicle or wrong token"
_VEHICLE_ACTIONS = ("disable", "enable", "rotate")

_md = MetaData()
vehicles = Table(
    "vehicles", _md,
    Column("vehicle_id", String(64), primary_key=True),
    Column("token_sha256", String(64), nullable=False),
    Column("hardware_class", String(64), nullable=False),
    Column("enrolled_at_s", Float, nullable=False),
    Column("last_seq", Integer, nullable=True),
    Column("last_version", String(64), nullable=True),
    Column("last_report", Text, nullable=True),
)
rollouts = Table(
    "rollouts", _md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(64), nullable=False),
    Column("previous_version", String(64), nullable=False),
    Column("created_at_s", Float, nullable=False),
)
events = Table(
    "events", _md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("at_s", Float, nullable=False),
    Column("data", Text, nullable=False),
)
health = Table(
    "health", _md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, nullable=True, index=True),
    Column("stage", String(32), nullable=True),
    Column("vehicle_id", String(64), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("ticks", Integer, nullable=False),
    Column("interventions", Integer, nullable=False),
    Column("collisions", Integer, nullable=False),
    Column("deadline_misses", Integer, nullable=False),
    Column("crashes", Integer, nullable=False),
    Column("p99_tick_sum", Float, nullable=False),
    Column("shadow_ticks", Integer, nullable=False),
    Column("shadow_disagreements", Integer, nullable=False),
    Column("shadow_diff_sum", Float, nullable=False),
    Column("received_at_s", Float, nullable=False),
)
audit = Table(
    "audit", _md,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at_s", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("rollout_id", Integer, nullable=True),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
disabled_vehicles = Table(  # its own table: databases from before revocation gain it by create_all
    "disabled_vehicles", _md,
    Column("vehicle_id", String(64), primary_key=True),
    Column("disabled_at_s", Float, nullable=False),
)
update_outcomes = Table(
    "update_outcomes", _md,
    Column("outcome", String(16), primary_key=True),
    Column("count", Integer, nullable=False),
)


@dataclass(frozen=True)
class Rollout:
    state: RolloutState
    plan: RolloutPlan
    events: int


FLEET_WRITE_LOCK = 0x6472_6976_6c6f_6f70 & 0x7FFF_FFFF_FFFF_FFFF  # "drivloop": the advisory lock's key


class FleetStore:
    """The fleet server's database. Thread-safe: one lock serialises writers (SQLite has one anyway);
    across replicas on PostgreSQL, an advisory lock does the same."""

    def __init__(self, url: str, admission: AdmissionPolicy | None = None) -> None:
        self.url = url
        self.admission = admission or AdmissionPolicy()
        try:
            self.engine = create_engine(url, connect_args={"check_same_thread": False} if url.startswith("sqlite")
                                        else {})
            if url.startswith("sqlite"):
                event.listen(self.engine, "connect", _sqlite_pragmas)
            _md.create_all(self.engine)
            trust.trust_md.create_all(self.engine)
        except SQLAlchemyError as e:
            raise StorageError(f"cannot open the fleet store {url}: {e}") from e
        self.lock = threading.RLock()
        self._cache: dict[int, Rollout] = {}
        self._shared = self.engine.dialect.name == "postgresql"  # replicas may share it

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """One write transaction, exclusive among this process's threads and every replica's (PostgreSQL
        advisory lock, released at commit or rollback — also when the process dies)."""
        with self.lock, self.engine.begin() as c:
            if self._shared:
                c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": FLEET_WRITE_LOCK})
            yield c

    @classmethod
    def at(cls, ota_dir: Path, admission: AdmissionPolicy | None = None) -> FleetStore:
        """The default SQLite file ``<home>/ota/fleet.db``."""
        ota_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{(ota_dir / 'fleet.db').resolve()}", admission)

    # ---- vehicles -------------------------------------------------------------------------------
    def enrol(self, vehicle_id: str, hardware_class: str, now_s: float, actor: str = "local") -> str:
        """Register a vehicle and return its token (shown once; only its sha256 is stored)."""
        token = new_token()
        try:
            with self.writing() as c:
                c.execute(insert(vehicles).values(vehicle_id=vehicle_id, token_sha256=hash_token(token),
                                                  hardware_class=hardware_class, enrolled_at_s=now_s))
                self._audit(c, now_s, "vehicle", actor, None, {"action": "enrol", "vehicle_id": vehicle_id})
        except SAIntegrityError as e:
            raise OtaError(f"vehicle {vehicle_id} is already enrolled") from e
        return token

    def authenticate(self, vehicle_id: str, token: str | None) -> None:
        """Raise AuthError unless ``token`` is this enabled vehicle's (constant-time comparison; an
        unknown vehicle costs the same and reads the same as a wrong token)."""
        with self.engine.connect() as c:
            row = c.execute(select(vehicles.c.token_sha256, disabled_vehicles.c.vehicle_id)
                            .select_from(vehicles.outerjoin(disabled_vehicles,
                                                            disabled_vehicles.c.vehicle_id == vehicles.c.vehicle_id))
                            .where(vehicles.c.vehicle_id == vehicle_id)).first()
        ok = verify_token(token, row[0] if row is not None else None)
        if row is None or not ok:
            raise AuthError(BAD_CREDENTIALS, status=401)
        if row[1] is not None:
            raise AuthError(f"vehicle {vehicle_id} is disabled", status=403)

    def vehicle_action(self, vehicle_id: str, action: str, now_s: float, actor: str) -> str | None:
        """``disable`` (every request refused from the next one on), ``enable``, or ``rotate`` (a new
        token; the old one stops working at once; returned, shown once). Audited. Raises OtaError for an
        unknown vehicle or action."""
        if action not in _VEHICLE_ACTIONS:
            raise OtaError(f"unknown vehicle action {action!r} ({', '.join(_VEHICLE_ACTIONS)})")
        token = new_token() if action == "rotate" else None
        with self.writing() as c:
            if c.execute(select(vehicles.c.vehicle_id).where(vehicles.c.vehicle_id == vehicle_id)).first() is None:
                raise OtaError(f"unknown vehicle {vehicle_id}")
            off = c.execute(select(disabled_vehicles.c.vehicle_id)
                            .where(disabled_vehicles.c.vehicle_id == vehicle_id)).first() is not None
            if action == "disable" and not off:
                c.execute(insert(disabled_vehicles).values(vehicle_id=vehicle_id, disabled_at_s=now_s))
            elif action == "enable":
                c.execute(delete(disabled_vehicles).where(disabled_vehicles.c.vehicle_id == vehicle_id))
            elif token is not None:
                c.execute(update(vehicles).where(vehicles.c.vehicle_id == vehicle_id)
                          .values(token_sha256=hash_token(token)))
            self._audit(c, now_s, "vehicle", actor, None, {"action": action, "vehicle_id": vehicle_id})
        logger.warning("vehicle %s: %s by %s", vehicle_id, action, actor)
        return token

    def vehicles(self) -> list[dict[str, Any]]:
        """Enrolled vehicles with their class, state and last reported version (never tokens)."""
        with self.engine.connect() as c:
            off = {r[0] for r in c.execute(select(disabled_vehicles.c.vehicle_id))}
            rows = c.execute(select(vehicles.c.vehicle_id, vehicles.c.hardware_class, vehicles.c.enrolled_at_s,
                                    vehicles.c.last_version).order_by(vehicles.c.vehicle_id))
            return [{"vehicle_id": v, "hardware_class": h, "enrolled_at_s": t, "last_version": lv,
                     "enabled": v not in off} for v, h, t, lv in rows]

    def vehicle_ids(self) -> list[str]:
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(select(vehicles.c.vehicle_id).order_by(vehicles.c.vehicle_id))]

    def fleet_versions(self) -> dict[str, int]:
        """How many vehicles last reported each model version ("unknown": never reported)."""
        with self.engine.connect() as c:
            rows = c.execute(select(vehicles.c.last_version, func.count()).group_by(vehicles.c.last_version))
            return {(v or "unknown"): n for v, n in rows}

    # ---- health ---------------------------------------------------------------------------------
    def record_assignment(self, vehicle_id: str, rollout_id: int | None, version: str | None) -> None:
        """What the director just assigned this vehicle (its update check): what it may confirm."""
        with self.writing() as c:
            trust.save_record(c, vehicle_id, assigned_rollout=rollout_id, assigned_version=version)

    def confirm_install(self, vehicle_id: str, version: str, rollout_id: int | None, now_s: float) -> None:
        """The vehicle's updater installed and booted ``version``; refused (OtaError) unless the director
        assigned it that version under this rollout (:func:`~driveloop.ota.admission.confirmable`)."""
        with self.writing() as c:
            if not confirmable(trust.load_record(c, vehicle_id), version, rollout_id):
                self._audit(c, now_s, "install_refused", vehicle_id, rollout_id, {"version": version})
                raise OtaError(f"vehicle {vehicle_id} was not assigned version {version}")
            trust.save_record(c, vehicle_id, confirmed_rollout=rollout_id, confirmed_version=version)

    def rejected_reports(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return trust.rejected_counts(c)

    def record_health(self, report: HealthReport, rollout: Rollout | None, now_s: float) -> tuple[str | None, str | None]:
        """Admit a report (:func:`~driveloop.ota.admission.admit`) and store it, tagged with the rollout's
        current stage. Returns (the reason it was rejected, counted and audited; or None, and the update
        outcome it shows — "success", "failure", "revert" — when the vehicle changed model)."""
        s = report.shadow
        with self.writing() as c:
            row = c.execute(select(vehicles.c.last_seq, vehicles.c.last_version)
                            .where(vehicles.c.vehicle_id == report.vehicle_id)).first()
            if row is None:
                raise AuthError(BAD_CREDENTIALS, status=401)
            last_seq, last_version = row
            if last_seq is not None and report.seq <= last_seq:
                raise StaleReportError(f"health report seq {report.seq} from {report.vehicle_id} is not after "
                                       f"the last accepted seq {last_seq}")
            rid = rollout.state.rollout_id if rollout else None
            reason = admit(report, trust.load_record(c, report.vehicle_id), rid, now_s, self.admission)
            if reason is not None:
                trust.count_rejected(c, reason)
                self._audit(c, now_s, "health_rejected", report.vehicle_id, rid,
                            {"reason": reason, "seq": report.seq, "model_version": report.model_version,
                             "window_start_s": report.window_start_s, "window_end_s": report.window_end_s})
                return reason, None
            c.execute(insert(health).values(
                rollout_id=rid,
                stage=rollout.state.stage(rollout.plan).name if rollout else None,
                vehicle_id=report.vehicle_id, model_version=report.model_version, seq=report.seq,
                seconds=report.duration_s, ticks=report.ticks, interventions=report.fallback_interventions,
                collisions=report.collisions, deadline_misses=report.deadline_misses, crashes=report.crashes,
                p99_tick_sum=report.inference_p99_ms * report.ticks,
                shadow_ticks=s.compared_ticks if s else 0, shadow_disagreements=s.disagreements if s else 0,
                shadow_diff_sum=s.mean_abs_diff * s.compared_ticks if s else 0.0, received_at_s=now_s))
            c.execute(update(vehicles).where(vehicles.c.vehicle_id == report.vehicle_id).values(
                last_seq=report.seq, last_version=report.model_version, last_report=report.model_dump_json()))
            trust.save_record(c, report.vehicle_id, last_window_end_s=report.window_end_s)
            outcome = _update_outcome(last_version, report.model_version, rollout)
            if outcome:
                _bump(c, outcome)
        return None, outcome

    def update_outcomes(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {o: n for o, n in c.execute(select(update_outcomes.c.outcome, update_outcomes.c.count))}

    def stage_window(self, rollout: Rollout) -> HealthWindow:
        """Aggregate the reports received during the rollout's current stage, per vehicle and by cohort,
        each vehicle's weight bounded (:mod:`driveloop.ota.robust`)."""
        st = rollout.state
        h = health.c
        cols = [func.count(), func.sum(h.seconds), func.sum(h.ticks), func.sum(h.interventions),
                func.sum(h.collisions), func.sum(h.deadline_misses), func.sum(h.crashes), func.sum(h.p99_tick_sum)]
        where = (h.rollout_id == st.rollout_id) & (h.stage == st.stage(rollout.plan).name)
        with self.engine.connect() as c:
            def cohort(version: str) -> CohortStats:
                rows = c.execute(select(*cols).where(where & (h.model_version == version)).group_by(h.vehicle_id))
                return robust_cohort([CohortStats(1, int(r[0]), float(r[1]) / 3600.0, *(int(x) for x in r[2:7]),
                                                  float(r[7])) for r in rows])

            sh = c.execute(select(func.sum(h.shadow_ticks), func.sum(h.shadow_disagreements), func.sum(h.shadow_diff_sum))
                           .where(where & (h.model_version == st.previous_version) & (h.shadow_ticks > 0))
                           .group_by(h.vehicle_id))
            return HealthWindow(cohort(st.version), cohort(st.previous_version),
                                robust_shadow([ShadowAggregate(1, int(t), int(d), float(x)) for t, d, x in sh]))

    # ---- rollouts and events --------------------------------------------------------------------
    def create_rollout(self, version: str, previous_version: str, plan: RolloutPlan, now_s: float,
                       actor: str) -> int:
        with self.writing() as c:
            latest = self._latest_id(c)
            if latest is not None and self._load(c, latest).state.active:
                raise OtaError(f"rollout {latest} is still active; finish or abort it first")
            res = c.execute(insert(rollouts).values(version=version, previous_version=previous_version,
                                                    created_at_s=now_s))
            if res.inserted_primary_key is None:
                raise StorageError("the database returned no id for the new rollout")
            rid = int(res.inserted_primary_key[0])
            ev = RolloutEvent("start", now_s, {"rollout_id": rid, "version": version,
                                               "previous_version": previous_version, "plan": plan.to_dict()})
            replay([ev])  # validates before anything is written
            self._append(c, rid, ev, "start", actor, {"version": version, "previous_version": previous_version})
        return rid

    def append_event(self, rollout_id: int, event: RolloutEvent, audit_kind: str, actor: str,
                     audit_payload: dict[str, Any]) -> None:
        """Write an event and its audit entry in one transaction."""
        with self.writing() as c:
            self._append(c, rollout_id, event, audit_kind, actor, audit_payload)

    def _append(self, c: Connection, rollout_id: int, event: RolloutEvent, audit_kind: str, actor: str,
                payload: dict[str, Any]) -> None:
        c.execute(insert(events).values(rollout_id=rollout_id, kind=event.kind, at_s=event.at_s,
                                        data=json.dumps(event.data, sort_keys=True)))
        self._audit(c, event.at_s, audit_kind, actor, rollout_id, payload)

    @staticmethod
    def _audit(c: Connection, at_s: float, kind: str, actor: str, rollout_id: int | None,
               payload: dict[str, Any]) -> None:
        last = c.execute(select(audit).order_by(audit.c.seq.desc()).limit(1)).mappings().first()
        prev = _entry(last) if last else None
        e = make_entry(prev, at_s, kind, actor, rollout_id, payload)
        c.execute(insert(audit).values(seq=e.seq, at_s=e.at_s, kind=e.kind, actor=e.actor, rollout_id=e.rollout_id,
                                       payload=json.dumps(e.payload, sort_keys=True), prev_hash=e.prev_hash,
                                       hash=e.hash))

    def _latest_id(self, c: Connection) -> int | None:
        return c.execute(select(func.max(rollouts.c.id))).scalar()

    def latest_rollout_id(self) -> int | None:
        with self.engine.connect() as c:
            return self._latest_id(c)

    def events(self, rollout_id: int) -> list[RolloutEvent]:
        with self.engine.connect() as c:
            return self._events(c, rollout_id)

    @staticmethod
    def _events(c: Connection, rollout_id: int) -> list[RolloutEvent]:
        rows = c.execute(select(events.c.kind, events.c.at_s, events.c.data).where(events.c.rollout_id == rollout_id)
                         .order_by(events.c.id))
        return [RolloutEvent(k, float(t), json.loads(d)) for k, t, d in rows]

    def _load(self, c: Connection, rollout_id: int) -> Rollout:
        n = c.execute(select(func.count()).where(events.c.rollout_id == rollout_id)).scalar() or 0
        cached = self._cache.get(rollout_id)
        if cached is not None and cached.events == n:
            return cached
        evs = self._events(c, rollout_id)
        if not evs:
            raise OtaError(f"no rollout {rollout_id}")
        r = Rollout(replay(evs), plan_of(evs), len(evs))
        self._cache[rollout_id] = r
        return r

    def load(self, rollout_id: int) -> Rollout:
        """The rollout's state, rebuilt by replaying its event log."""
        with self.engine.connect() as c:
            return self._load(c, rollout_id)

    def latest(self) -> Rollout | None:
        rid = self.latest_rollout_id()
        return None if rid is None else self.load(rid)

    def latest_in(self, c: Connection) -> Rollout | None:
        """The latest rollout as ``c`` sees it (inside :meth:`writing`: what no other replica can change
        before ``c`` commits)."""
        rid = self._latest_id(c)
        return None if rid is None else self._load(c, rid)

    def load_in(self, c: Connection, rollout_id: int) -> Rollout:
        return self._load(c, rollout_id)

    def append_in(self, c: Connection, rollout_id: int, event: RolloutEvent, audit_kind: str, actor: str,
                  audit_payload: dict[str, Any]) -> None:
        """Append an event and its audit entry inside the caller's :meth:`writing` transaction."""
        self._append(c, rollout_id, event, audit_kind, actor, audit_payload)

    # ---- audit ----------------------------------------------------------------------------------
    def audit_entries(self, rollout_id: int | None = None) -> list[AuditEntry]:
        q = select(audit).order_by(audit.c.seq)
        if rollout_id is not None:
            q = q.where(audit.c.rollout_id == rollout_id)
        with self.engine.connect() as c:
            return [_entry(m) for m in c.execute(q).mappings()]

    def verify_audit(self) -> VerifyResult:
        return verify(self.audit_entries())


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    """WAL: readers never block the writer, and a commit is one fsync of the log."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _entry(m: Any) -> AuditEntry:
    return AuditEntry(m["seq"], m["at_s"], m["kind"], m["actor"], m["rollout_id"], json.loads(m["payload"]),
                      m["prev_hash"], m["hash"])


def _bump(c: Connection, outcome: str) -> None:
    if c.execute(update(update_outcomes).where(update_outcomes.c.outcome == outcome)
                 .values(count=update_outcomes.c.count + 1)).rowcount == 0:
        c.execute(insert(update_outcomes).values(outcome=outcome, count=1))


def _update_outcome(last: str | None, now: str, rollout: Rollout | None) -> str | None:
    """Read an update's outcome off the versions a vehicle reports: previous → new is a success;
    new → previous is a revert after an abort, otherwise the vehicle's own A/B fallback (a failure)."""
    if rollout is None or last is None or last == now:
        return None
    st = rollout.state
    if last == st.previous_version and now == st.version:
        return "success"
    if last == st.version and now == st.previous_version:
        return "revert" if st.status is Status.ABORTED else "failure"
    return None
