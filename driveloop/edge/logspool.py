"""The vehicle's log spool: its structured log lines on disk until the cloud has them.

One SQLite file per vehicle (``<root>/<vehicle>.db``, WAL): a line is numbered (``event.sequence``,
never reused) and stored in the transaction that numbers it, so a crash keeps every line whose
``append`` returned and loses none half-written. Lines leave only two ways:

- **acknowledged** (:meth:`LogSpool.ack`): the cloud stored them; a disconnect, however long, only
  makes the spool hold them longer;
- **evicted**, when the spool's payload bytes would pass ``cap_bytes``: DEBUG lines first, then INFO,
  then WARNING…, oldest first within a level (an AEB event outlives the chatter around it). Every
  evicted line is counted by level, in the same transaction as its deletion, and the counts persist.

The cap counts each line's UTF-8 bytes (what is shipped), not SQLite's own overhead.
:class:`VehicleLogHandler` is the logging handler that feeds the spools: a record logged while a
vehicle id is bound (``core.logfmt.log_context``) goes to that vehicle's spool.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driveloop.core.exceptions import ConfigError, StorageError
from driveloop.core.ids import check_vehicle_id
from driveloop.core.logfmt import ecs_fields, render_json

__all__ = ["LogSpool", "SpoolStats", "VehicleLogHandler", "DEFAULT_CAP_BYTES", "LEVEL_NUMBERS"]

DEFAULT_CAP_BYTES = 16 * 2**20  # ~50,000 lines: hours of a vehicle's normal logging
LEVEL_NUMBERS: Mapping[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_EVICT_CHUNK = 512
_ACK_CHUNK = 500  # sequence numbers per statement, under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (seq INTEGER PRIMARY KEY, level INTEGER NOT NULL, nbytes INTEGER NOT NULL,
                                  line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS lines_by_level ON lines (level, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolStats:
    """What the spool holds and what it lost: ``evicted`` by level name; ``next_sequence`` = lines ever
    appended."""

    lines: int
    bytes: int
    next_sequence: int
    acked_through: int | None
    evicted: dict[str, int] = field(default_factory=dict)

    @property
    def evicted_total(self) -> int:
        return sum(self.evicted.values())


class LogSpool:
    """One vehicle's spool (see the module docstring). Thread-safe; one writer process."""

    def __init__(self, path: Path | str, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        if not isinstance(cap_bytes, int) or cap_bytes <= 0:
            raise ConfigError(f"log spool cap_bytes must be a positive integer, got {cap_bytes!r}")
        self.path = Path(path)
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses at most the last commits
            self._db.executescript(_SCHEMA)
            self._bytes = int(self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM lines").fetchone()[0])
            self._next = self._counter("next_sequence")
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the log spool {self.path}: {e}") from e

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _add(self, name: str, delta: int) -> None:
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", (name, delta))

    # -- writing ---------------------------------------------------------------------------------------
    def append(self, fields: Mapping[str, Any]) -> int:
        """Number, render and store one line (ECS ``fields``); returns its sequence number."""
        return self.append_many([fields])[0]

    def append_many(self, many: Sequence[Mapping[str, Any]]) -> list[int]:
        """Store lines in one transaction, evicting what the cap requires first; their numbers."""
        level_of = LEVEL_NUMBERS
        with self._lock:
            try:
                seqs, rows = [], []
                for f in many:
                    seq = self._next + len(seqs)
                    line = render_json({**f, "event.sequence": seq})
                    n = len(line.encode("utf-8"))
                    if n > self.cap_bytes:
                        raise ConfigError(f"a log line of {n} bytes cannot fit a spool of {self.cap_bytes} bytes")
                    seqs.append(seq)
                    rows.append((seq, level_of.get(str(f.get("log.level")), 20), n, line))
                incoming = sum(r[2] for r in rows)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._evict(self._bytes + incoming - self.cap_bytes)
                    # A batch bigger than the cap: its own oldest, least important lines go too (counted).
                    rows = self._fit(rows)
                    self._db.executemany("INSERT INTO lines (seq, level, nbytes, line) VALUES (?, ?, ?, ?)", rows)
                    self._add("next_sequence", len(seqs))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    self._bytes = int(self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM lines").fetchone()[0])
                    raise
                self._bytes += sum(r[2] for r in rows)
                self._next += len(seqs)
                return seqs
            except sqlite3.Error as e:
                raise StorageError(f"log spool {self.path}: {e}") from e

    def _fit(self, rows: list[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
        room = self.cap_bytes - self._bytes
        if sum(r[2] for r in rows) <= room:
            return rows
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1], rows[i][0]))  # level, then age
        drop: set[int] = set()
        total = sum(r[2] for r in rows)
        for i in order:
            if total <= room:
                break
            drop.add(i)
            total -= rows[i][2]
            self._add(f"evicted.{_level_name(rows[i][1])}", 1)
        return [r for i, r in enumerate(rows) if i not in drop]

    def _evict(self, need: int) -> None:
        """Delete at least ``need`` bytes of stored lines: lowest level first, oldest first (in the
        caller's transaction), counting each deleted line by level."""
        for level in sorted(LEVEL_NUMBERS.values()):
            while need > 0:
                rows = self._db.execute("SELECT seq, nbytes FROM lines WHERE level = ? ORDER BY seq LIMIT ?",
                                        (level, _EVICT_CHUNK)).fetchall()
                if not rows:
                    break
                take = []
                for seq, n in rows:
                    if need <= 0:
                        break
                    take.append(seq)
                    need -= n
                    self._bytes -= n
                self._db.executemany("DELETE FROM lines WHERE seq = ?", [(s,) for s in take])
                self._add(f"evicted.{_level_name(level)}", len(take))

    # -- shipping ----------------------------------------------------------------------------------------
    def pending(self, limit: int = 1000, after: int = -1, min_level: str | None = None) -> list[tuple[int, str]]:
        """The oldest ``limit`` unacknowledged lines numbered above ``after`` (only those at ``min_level`` or
        above, when given): (sequence, JSON line)."""
        with self._lock:
            try:
                if min_level is not None:
                    return self._db.execute("SELECT seq, line FROM lines WHERE level >= ? AND seq > ? ORDER BY seq "
                                            "LIMIT ?", (LEVEL_NUMBERS[min_level], after, limit)).fetchall()
                return self._db.execute("SELECT seq, line FROM lines WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (after, limit)).fetchall()
            except sqlite3.Error as e:
                raise StorageError(f"log spool {self.path}: {e}") from e

    def ack(self, sequences: Sequence[int]) -> int:
        """The cloud holds these lines: drop them. Returns how many were still here."""
        if not sequences:
            return 0
        with self._lock:
            try:
                seqs = sorted({int(s) for s in sequences})
                self._db.execute("BEGIN IMMEDIATE")
                gone = 0
                # One statement per chunk, not per line: a shipped batch is thousands of lines, and a DELETE
                # each made acknowledging cost as much as logging them.
                for k in range(0, len(seqs), _ACK_CHUNK):
                    chunk = seqs[k:k + _ACK_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    n, nbytes = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM lines "
                                                 f"WHERE seq IN ({marks})", chunk).fetchone()
                    self._db.execute(f"DELETE FROM lines WHERE seq IN ({marks})", chunk)
                    gone += int(n)
                    self._bytes -= int(nbytes)
                top = seqs[-1]
                if top + 1 > self._counter("acked_through_plus_one"):
                    self._db.execute("INSERT INTO counters (name, value) VALUES ('acked_through_plus_one', ?) "
                                     "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (top + 1,))
                self._db.execute("COMMIT")
                return gone
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StorageError(f"log spool {self.path}: {e}") from e

    def stats(self) -> SpoolStats:
        with self._lock:
            lines = int(self._db.execute("SELECT COUNT(*) FROM lines").fetchone()[0])
            evicted = {name.removeprefix("evicted."): int(v) for name, v in
                       self._db.execute("SELECT name, value FROM counters WHERE name LIKE 'evicted.%'")}
            acked = self._counter("acked_through_plus_one")
        return SpoolStats(lines=lines, bytes=self._bytes, next_sequence=self._next,
                          acked_through=acked - 1 if acked else None, evicted=evicted)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _level_name(number: int) -> str:
    for name, n in LEVEL_NUMBERS.items():
        if n == number:
            return name
    return "info"


class VehicleLogHandler(logging.Handler):
    """Routes each record logged with a vehicle id in its context to ``<root>/<vehicle>.db``
    (spools opened on first use, each capped at ``cap_bytes``); records without one are not its
    business. A spool that fails is reported by ``logging``'s own error path, never raised into the
    control loop."""

    def __init__(self, root: Path | str, service: str = "vehicle", cap_bytes: int = DEFAULT_CAP_BYTES,
                 level: int = logging.INFO) -> None:
        super().__init__(level)
        self.root, self.service, self.cap_bytes = Path(root), service, cap_bytes
        self.spools: dict[str, LogSpool] = {}

    def spool(self, vehicle_id: str) -> LogSpool:
        sp = self.spools.get(vehicle_id)
        if sp is None:
            sp = self.spools[vehicle_id] = LogSpool(self.root / f"{check_vehicle_id(vehicle_id)}.db", self.cap_bytes)
        return sp

    def emit(self, record: logging.LogRecord) -> None:
        fields = ecs_fields(record, self.service)
        vehicle = fields.get("vehicle.id")
        if vehicle is None:
            return
        try:
            self.spool(str(vehicle)).append(fields)
        except Exception:  # noqa: BLE001 - logging must never break the loop; logging reports it on stderr
            self.handleError(record)

    def close(self) -> None:
        for sp in self.spools.values():
            sp.close()
        self.spools.clear()
        super().close()

