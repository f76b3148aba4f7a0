"""The cloud's log index: every validated line, searchable by words and filters, kept for a retention.

Two backends behind one class, chosen by the catalog's URL (the index lives beside the catalog):

- **SQLite + FTS5** (default): ``<cloud>/logs.db``, its own file so log traffic never contends with
  the catalog's writers; an external-content FTS5 table over (message, action, logger, service), kept
  in step by triggers. A query is FTS5 syntax (``aeb OR fcw``, ``"model call" NOT hang``, ``veh*``);
  one that is not valid FTS5 is searched as its words, all required.
- **PostgreSQL** (the catalog's database): the line as ``JSONB`` plus a generated ``tsvector`` with a
  GIN index; the query goes through ``websearch_to_tsquery`` (``aeb or fcw``, ``"exact words"``, ``-word``).

Rules it keeps: one row per (vehicle, ``event.sequence``) — a resent batch is stored once and
counted as duplicates; lines are stored as validated JSON (``contracts/logline.py``), never as sent;
retention deletes by the time a line was *received* (a vehicle's wrong clock cannot keep a line
forever or delete it at once); every database failure is a StorageError, every bad query a ConfigError.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driveloop.contracts.logline import LEVEL_RANK, LogLine
from driveloop.core.exceptions import ConfigError, StorageError

__all__ = ["LogIndex", "LogQuery", "IndexResult", "DEFAULT_RETENTION_S", "index_url_for"]

DEFAULT_RETENTION_S = 14 * 86400.0
MAX_RESULTS = 10_000


@dataclass(frozen=True)
class LogQuery:
    """A search: ``text`` (may be empty: filters only), newest first, at most ``limit`` lines."""

    text: str = ""
    vehicle: str | None = None
    since_s: float | None = None
    until_s: float | None = None
    level: str | None = None  # at least this level
    rollout_id: int | None = None
    action: str | None = None
    trace_id: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.level is not None and self.level not in LEVEL_RANK:
            raise ConfigError(f"level must be one of {', '.join(LEVEL_RANK)}, got {self.level!r}")
        if not 1 <= self.limit <= MAX_RESULTS:
            raise ConfigError(f"limit must be 1..{MAX_RESULTS}, got {self.limit}")
        if len(self.text) > 1024:
            raise ConfigError("search text longer than 1024 characters")


@dataclass(frozen=True)
class IndexResult:
    accepted: int
    duplicates: int


def index_url_for(catalog_url: str) -> str:
    """The index beside a catalog: the same PostgreSQL database, or ``logs.db`` next to a SQLite file."""
    if catalog_url.startswith("postgresql"):
        return catalog_url
    if catalog_url.startswith("sqlite:///") and not catalog_url.endswith(":memory:"):
        return f"sqlite:///{Path(catalog_url.removeprefix('sqlite:///')).with_name('logs.db')}"
    raise ConfigError(f"no log index for catalog URL {catalog_url.split('://')[0]}://…")


def _row(line: LogLine, received_s: float) -> tuple[Any, ...]:
    return (line.time_s, received_s, LEVEL_RANK[line.level], line.service, line.vehicle_id, line.sequence,
            line.action, line.model_version, line.rollout_id, line.trace_id, line.logger, line.message,
            line.model_dump_json(by_alias=True, exclude_none=True))  # pydantic's own serializer: 4x json.dumps


_COLUMNS = ("ts", "received_s", "level", "service", "vehicle", "seq", "action", "model_version", "rollout_id",
            "trace_id", "logger", "message", "line")

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_lines (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, received_s REAL NOT NULL, level INTEGER NOT NULL, service TEXT NOT NULL,
  vehicle TEXT, seq INTEGER, action TEXT, model_version TEXT, rollout_id INTEGER, trace_id TEXT, logger TEXT,
  message TEXT NOT NULL, line TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS log_lines_vehicle_seq ON log_lines (vehicle, seq);
CREATE INDEX IF NOT EXISTS log_lines_ts ON log_lines (ts);
CREATE VIRTUAL TABLE IF NOT EXISTS log_fts USING fts5(message, action, logger, service,
  content='log_lines', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS log_lines_ai AFTER INSERT ON log_lines BEGIN
  INSERT INTO log_fts (rowid, message, action, logger, service)
  VALUES (new.id, new.message, new.action, new.logger, new.service);
END;
CREATE TRIGGER IF NOT EXISTS log_lines_ad AFTER DELETE ON log_lines BEGIN
  INSERT INTO log_fts (log_fts, rowid, message, action, logger, service)
  VALUES ('delete', old.id, old.message, old.action, old.logger, old.service);
END;
"""

_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS log_lines (
      id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, received_s DOUBLE PRECISION NOT NULL,
      level INTEGER NOT NULL, service TEXT NOT NULL, vehicle TEXT, seq BIGINT, action TEXT, model_version TEXT,
      rollout_id INTEGER, trace_id TEXT, logger TEXT, message TEXT NOT NULL, line JSONB NOT NULL,
      tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(message, '') || ' ' || coalesce(action, '')
        || ' ' || coalesce(logger, '') || ' ' || service)) STORED)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS log_lines_vehicle_seq ON log_lines (vehicle, seq)",
    "CREATE INDEX IF NOT EXISTS log_lines_ts ON log_lines (ts)",
    "CREATE INDEX IF NOT EXISTS log_lines_received ON log_lines (received_s)",
    "CREATE INDEX IF NOT EXISTS log_lines_tsv ON log_lines USING GIN (tsv)",
    "CREATE INDEX IF NOT EXISTS log_lines_doc ON log_lines USING GIN (line jsonb_path_ops)",
)


def _filters(q: LogQuery, param: Callable[[Any], str]) -> list[str]:
    where = []
    for column, value in (("vehicle", q.vehicle), ("rollout_id", q.rollout_id), ("action", q.action),
                          ("trace_id", q.trace_id)):
        if value is not None:
            where.append(f"l.{column} = {param(value)}")
    if q.since_s is not None:
        where.append(f"l.ts >= {param(q.since_s)}")
    if q.until_s is not None:
        where.append(f"l.ts < {param(q.until_s)}")
    if q.level is not None:
        where.append(f"l.level >= {param(LEVEL_RANK[q.level])}")
    return where


class _Sqlite:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses at most the newest lines, never the file
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the FTS index's hot pages stay in memory at 10k+ lines/s
        self.db.executescript(_SQLITE_SCHEMA)
        self.lock = threading.Lock()

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> int:
        sql = f"INSERT OR IGNORE INTO log_lines ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return max(cur.rowcount, 0)

    def search(self, q: LogQuery) -> list[str]:
        params: list[Any] = []

        def param(v: Any) -> str:
            params.append(v)
            return "?"

        sql = "SELECT l.line FROM log_lines l"
        where = []
        if q.text.strip():  # first: "?" parameters are positional
            sql += " JOIN log_fts f ON f.rowid = l.id"
            where.append(f"log_fts MATCH {param(q.text)}")
        where += _filters(q, param)
        sql += (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY l.ts DESC, l.id DESC LIMIT {q.limit}"
        with self.lock:
            try:
                return [r[0] for r in self.db.execute(sql, params)]
            except sqlite3.OperationalError as e:
                if "fts5" not in str(e) and "syntax" not in str(e):
                    raise
        words = " ".join('"' + w.replace('"', '""') + '"' for w in q.text.split())
        return self.search(LogQuery(**{**q.__dict__, "text": words})) if words != q.text else []

    def prune(self, before_s: float) -> int:
        with self.lock:
            return self.db.execute("DELETE FROM log_lines WHERE received_s < ?", (before_s,)).rowcount

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM log_lines").fetchone()[0])

    def close(self) -> None:
        self.db.close()


class _Postgres:
    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine, text

        self.text = text
        self.engine = create_engine(url, pool_pre_ping=True)
        with self.engine.begin() as c:
            for ddl in _PG_SCHEMA:
                c.execute(text(ddl))

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> int:
        cols = ", ".join(_COLUMNS)
        values = ", ".join(f":{c}" if c != "line" else "CAST(:line AS JSONB)" for c in _COLUMNS)
        sql = self.text(f"INSERT INTO log_lines ({cols}) VALUES ({values}) ON CONFLICT DO NOTHING RETURNING id")
        with self.engine.begin() as c:
            inserted = 0
            for r in rows:  # RETURNING per row: executemany cannot say which rows were new
                inserted += c.execute(sql, dict(zip(_COLUMNS, r))).first() is not None
        return inserted

    def search(self, q: LogQuery) -> list[str]:
        params: dict[str, Any] = {}

        def param(v: Any) -> str:
            name = f"p{len(params)}"
            params[name] = v
            return f":{name}"

        where = [f"l.tsv @@ websearch_to_tsquery('simple', {param(q.text)})"] if q.text.strip() else []
        where += _filters(q, param)
        sql = "SELECT l.line::text FROM log_lines l" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY l.ts DESC, l.id DESC LIMIT {q.limit}"
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(self.text(sql), params)]

    def prune(self, before_s: float) -> int:
        with self.engine.begin() as c:
            return c.execute(self.text("DELETE FROM log_lines WHERE received_s < :t"), {"t": before_s}).rowcount

    def count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(self.text("SELECT COUNT(*) FROM log_lines")).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


class LogIndex:
    """The index at ``url`` (``sqlite:///…/logs.db`` or the catalog's ``postgresql+psycopg://…``).

    ``retention_s``: lines received longer ago are deleted by :meth:`prune`, which :meth:`add` runs
    at most once per ``prune_every_s``."""

    def __init__(self, url: str, retention_s: float = DEFAULT_RETENTION_S, prune_every_s: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        if retention_s <= 0:
            raise ConfigError(f"log retention must be > 0 s, got {retention_s}")
        self.url, self.retention_s, self.prune_every_s, self.clock = url, retention_s, prune_every_s, clock
        self._last_prune = clock()
        try:
            if url.startswith("sqlite:///"):
                self._b: _Sqlite | _Postgres = _Sqlite(Path(url.removeprefix("sqlite:///")))
            elif url.startswith("postgresql"):
                self._b = _Postgres(url)
            else:
                raise ConfigError(f"the log index needs a sqlite:/// or postgresql URL, got {url.split('://')[0]}://…")
        except (sqlite3.Error, OSError) as e:
            raise StorageError(f"cannot open the log index: {e}") from e
        except ImportError as e:
            raise StorageError(f"cannot open the log index: {e}") from e
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/psycopg connection errors, wrapped at the boundary
            if isinstance(e, ConfigError):
                raise
            raise StorageError(f"cannot open the log index: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    @classmethod
    def beside(cls, catalog_url: str, **kw: Any) -> LogIndex:
        return cls(index_url_for(catalog_url), **kw)

    def add(self, lines: Sequence[LogLine]) -> IndexResult:
        """Store validated lines; a (vehicle, sequence) already held is a duplicate, not an error."""
        if not lines:
            return IndexResult(0, 0)
        now = self.clock()
        rows = [_row(line, now) for line in lines]
        try:
            inserted = self._b.insert(rows)
        except Exception as e:  # noqa: BLE001 - sqlite3/SQLAlchemy errors, wrapped at the boundary
            raise StorageError(f"log index write failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        if now - self._last_prune >= self.prune_every_s:
            self.prune()
        return IndexResult(accepted=inserted, duplicates=len(rows) - inserted)

    def search(self, query: LogQuery) -> list[dict[str, Any]]:
        """Matching lines (ECS objects), newest first."""
        try:
            return [json.loads(t) for t in self._b.search(query)]
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0]
            if "tsquery" in first or "syntax" in first:
                raise ConfigError(f"bad search query {query.text!r}: {first}") from e
            raise StorageError(f"log search failed: {type(e).__name__}: {first}") from e

    def prune(self, now_s: float | None = None) -> int:
        """Delete lines received before ``now - retention``; how many went."""
        now = self.clock() if now_s is None else now_s
        self._last_prune = now
        try:
            return self._b.prune(now - self.retention_s)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"log retention failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    def count(self) -> int:
        return self._b.count()

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> LogIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
