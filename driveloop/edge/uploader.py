"""Uploads closed segments from the vehicle's spool to the cloud, exactly once, whatever happens.

Rules it keeps:
- The queue is a SQLite journal in ``state_dir`` (synchronous=FULL): it survives SIGKILL and reboot,
  and after a restart the uploader asks the server for its offset and resumes where the bytes stopped.
- Event segments go before routine ones (the spool's order: priority, then age; re-read every pass,
  so a segment promoted by a later event moves up).
- Chunked, resumable; a 409 offset conflict resyncs to the server's offset instead of resending.
- Connection failures pause the whole uploader (the link is down for every segment, not just one)
  with jittered exponential backoff (``rng``, ``clock`` and ``sleep`` are injected); permanent
  refusals (corrupt, wrong hash, too big) are recorded and never retried.
- A segment leaves the spool ONLY after the server confirmed it cataloged exactly our sha256; the
  journal records the confirmation before the file is deleted, so a crash in between just deletes it
  on the next pass.
- Optional bandwidth cap (token bucket, bits per second).
- One uploader per state_dir at a time (an flock the kernel drops if the process dies).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from driveloop.edge.spool import Spool, SpoolEntry
from driveloop.contracts.upload import UploadStatus
from driveloop.edge.transport import UploadTransport
from driveloop.core.exceptions import ConfigError, UploadError, UploadRejectedError
from driveloop.core.ids import check_vehicle_id

logger = logging.getLogger(__name__)

PENDING, DONE, REJECTED = "pending", "done", "rejected"
MAX_RESYNCS = 8  # consecutive 409s on one segment before treating it as a transient failure

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    segment_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, priority INTEGER NOT NULL,
    opened_ns INTEGER NOT NULL, state TEXT NOT NULL, upload_id TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
)"""


@dataclass(frozen=True)
class BackoffPolicy:
    """Retry delay after the n-th consecutive failure: ``min(max, base * 2**(n-1))`` scaled by a
    uniform jitter in ``[1 - jitter, 1]`` so a fleet coming back online does not retry in lockstep."""

    base_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.max_s and math.isfinite(self.max_s)) or not 0 <= self.jitter <= 1:
            raise ConfigError(f"bad backoff policy {self}")

    def delay_s(self, failures: int, rng: random.Random) -> float:
        raw = min(self.max_s, self.base_s * 2.0 ** max(0, failures - 1))
        return raw * rng.uniform(1.0 - self.jitter, 1.0)


class TokenBucket:
    """Bandwidth cap: ``rate_bps`` bits per second with a burst of ``burst_bytes``; pure (``now_s``)."""

    def __init__(self, rate_bps: float, burst_bytes: int, now_s: float) -> None:
        if not (math.isfinite(rate_bps) and rate_bps > 0) or burst_bytes < 1:
            raise ConfigError(f"bandwidth cap needs rate_bps > 0 and burst_bytes >= 1, got {rate_bps}, {burst_bytes}")
        self.rate_bytes_per_s = rate_bps / 8.0
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._t = now_s

    def reserve(self, n_bytes: int, now_s: float) -> float:
        """Take ``n_bytes`` (going into debt if needed); returns how long to wait before sending."""
        self._tokens = min(self.burst_bytes, self._tokens + (now_s - self._t) * self.rate_bytes_per_s)
        self._t = now_s
        self._tokens -= n_bytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s


@dataclass
class UploadReport:
    """What one ``run_once``/``drain`` did. ``bytes_sent`` counts every byte handed to the transport."""

    uploaded: list[str] = field(default_factory=list)  # sha256 confirmed by the server
    rejected: list[str] = field(default_factory=list)  # segment ids refused for good
    bytes_sent: int = 0
    failures: int = 0
    pending: int = 0

    def merge(self, other: UploadReport) -> None:
        """Add another report's counts (e.g. several vehicles' uploaders: pending adds up too)."""
        self.uploaded += other.uploaded
        self.rejected += other.rejected
        self.bytes_sent += other.bytes_sent
        self.failures += other.failures
        self.pending += other.pending


@dataclass(frozen=True)
class _Item:
    segment_id: str
    sha256: str
    size: int
    upload_id: str | None
    attempts: int


class Uploader:
    """Drains a spool through an UploadTransport (see the module rules). The cloud accepts a segment
    only from the vehicle that recorded it, so when several vehicles share a spool, run one uploader
    per vehicle (``vehicle_id``, its own ``state_dir`` and transport)."""

    def __init__(self, spool: Spool, transport: UploadTransport, state_dir: str | Path,
                 chunk_bytes: int = 256 * 1024, bandwidth_bps: float | None = None,
                 vehicle_id: str | None = None,
                 rng: random.Random | None = None, backoff: BackoffPolicy | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        if chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.spool, self.transport, self.chunk_bytes = spool, transport, chunk_bytes
        # Checked before state_dir is touched: callers name that folder after the id.
        self.vehicle_id = None if vehicle_id is None else check_vehicle_id(vehicle_id)
        self.rng = rng or random.Random()
        self.backoff = backoff or BackoffPolicy()
        self.clock, self.sleep = clock, sleep
        self.bucket = None if bandwidth_bps is None else TokenBucket(bandwidth_bps, chunk_bytes, clock())
        self._failures = 0  # consecutive transport failures
        self.resume_at_s = -math.inf  # no attempt before this time (backoff)
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(state / "uploader.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise ConfigError(f"another uploader is running on {state}") from e
        self._db = sqlite3.connect(state / "uploader.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- journal -----------------------------------------------------------------------------
    def _set(self, segment_id: str, **values: object) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        self._db.execute(f"UPDATE queue SET {cols} WHERE segment_id = ?", (*values.values(), segment_id))

    def _sync(self) -> dict[str, SpoolEntry]:
        """Journal every closed segment once; finish deletions a crash interrupted; forget rows whose
        file left the spool (uploaded and deleted, or evicted). Even if a row is forgotten too early,
        nothing is lost: the segment is declared again and the server answers ``exists``."""
        entries = {e.segment_id: e for e in self.spool.closed_segments()
                   if self.vehicle_id is None or e.vehicle == self.vehicle_id}
        states = dict(self._db.execute("SELECT segment_id, state FROM queue").fetchall())
        for seg_id, entry in entries.items():
            state = states.get(seg_id)
            if state is None:
                self._enqueue(entry)
            elif state == DONE:
                self.spool.remove(entry.path)  # confirmed earlier, deletion was cut short
            elif state == PENDING:
                self._set(seg_id, priority=entry.priority)
        for seg_id in [s for s in states if s not in entries]:  # keeps the journal as small as the spool
            if states[seg_id] == PENDING:
                logger.warning("segment %s left the spool before upload (evicted?)", seg_id)
            self._db.execute("DELETE FROM queue WHERE segment_id = ?", (seg_id,))
        return entries

    def _enqueue(self, entry: SpoolEntry) -> None:
        """Journal a segment by its sha256. No MCAP validation here: the recorder validated it before
        publishing, the cloud validates it again at its trust boundary, and the vehicle's CPU is
        for driving. (A file damaged on disk since is refused by the cloud and kept, not lost.)"""
        try:
            with open(entry.path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return  # promoted (renamed) or evicted while we looked; the next pass sees its new name
        self._db.execute(
            "INSERT OR IGNORE INTO queue (segment_id, sha256, size, priority, opened_ns, state)"
            " VALUES (?, ?, ?, ?, ?, ?)", (entry.segment_id, sha, size, entry.priority, entry.opened_ns, PENDING))

    def pending_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM queue WHERE state = ?", (PENDING,)).fetchone()[0])

    def _next(self) -> _Item | None:
        row = self._db.execute(
            "SELECT segment_id, sha256, size, upload_id, attempts FROM queue WHERE state = ?"
            " ORDER BY priority DESC, opened_ns ASC LIMIT 1", (PENDING,)).fetchone()
        return None if row is None else _Item(*row)

    # -- uploading ---------------------------------------------------------------------------
    def run_once(self) -> UploadReport:
        """Upload the most urgent ready segment (one attempt). AuthError propagates: retrying
        with refused credentials cannot help, someone must fix the configuration."""
        report = UploadReport()
        entries = self._sync()
        item = self._next() if self.clock() >= self.resume_at_s else None
        if item is not None:
            self._attempt(item, entries[item.segment_id], report)
        report.pending = self.pending_count()
        return report

    def drain(self, max_s: float) -> UploadReport:
        """Upload until the queue is empty or ``max_s`` passed, sleeping through backoff waits."""
        deadline = self.clock() + max_s
        total = UploadReport()
        while True:
            step = self.run_once()
            total.merge(step)
            total.pending = step.pending  # a snapshot of this queue, not a sum over passes
            now = self.clock()
            if total.pending == 0 or now >= deadline:
                return total
            if self.resume_at_s > now:
                self.sleep(min(self.resume_at_s, deadline) - now)

    def _attempt(self, item: _Item, entry: SpoolEntry, report: UploadReport) -> None:
        try:
            status = self._upload(item, entry, report)
        except UploadRejectedError as e:
            logger.error("cloud refused segment %s for good: %s", item.segment_id, e)
            self._set(item.segment_id, state=REJECTED, last_error=str(e))
            report.rejected.append(item.segment_id)
            return
        except UploadError as e:
            self._failures += 1
            delay = self.backoff.delay_s(self._failures, self.rng)
            self.resume_at_s = self.clock() + delay
            logger.info("upload of %s failed (%s); retry #%d in %.1fs", item.segment_id, e, self._failures, delay)
            self._set(item.segment_id, attempts=item.attempts + 1, last_error=str(e))
            report.failures += 1
            return
        self._failures = 0
        if status.sha256 != item.sha256:
            raise UploadError(f"server confirmed {status.sha256} for {item.segment_id}, expected {item.sha256}")
        self._set(item.segment_id, state=DONE, attempts=0, last_error=None)
        self.spool.remove(entry.path)
        report.uploaded.append(item.sha256)
        logger.info("uploaded %s (%s, %d bytes)", item.segment_id, item.sha256[:12], item.size)

    def _resume(self, item: _Item) -> UploadStatus:
        """Where the server stands on this segment: ask about our upload id, else (re)declare it."""
        if item.upload_id is not None:
            try:
                status = self.transport.offset(item.upload_id)
                if status.state != "failed" and status.sha256 == item.sha256:
                    return status
            except UploadRejectedError as e:
                if e.status != 404:  # the server forgot the upload: declare again below
                    raise
        status = self.transport.start(item.sha256, item.size, f"{item.segment_id}.mcap")
        self._set(item.segment_id, upload_id=status.upload_id)
        return status

    def _upload(self, item: _Item, entry: SpoolEntry, report: UploadReport) -> UploadStatus:
        status = self._resume(item)
        resyncs = 0
        while not status.confirmed:
            if status.upload_id is None:
                raise UploadError(f"server gave no upload id for {item.segment_id}: {status}")
            data = self._read(entry, status.offset)
            self._throttle(len(data))
            report.bytes_sent += len(data)
            try:
                status = self.transport.send_chunk(status.upload_id, status.offset, data)
            except UploadRejectedError as e:
                if e.status != 409 or e.offset is None:
                    raise
                if resyncs >= MAX_RESYNCS:  # e.g. another request still holds the upload: later
                    raise UploadError(f"offset conflict on {item.segment_id} persists: {e}") from e
                resyncs += 1
                status = UploadStatus(status.upload_id, item.sha256, item.size, e.offset, "open")
        return status

    def _read(self, entry: SpoolEntry, offset: int) -> bytes:
        """``chunk_bytes`` at ``offset``; follows the segment if the spool renamed (promoted) it.
        At the end of the file this is b"" — sending it asks the server to finalize again."""
        for candidate in (entry.path, *[e.path for e in self.spool.closed_segments() if e.segment_id == entry.segment_id]):
            try:
                with open(candidate, "rb") as f:
                    f.seek(offset)
                    return f.read(self.chunk_bytes)
            except FileNotFoundError:
                continue
        raise UploadRejectedError(f"segment {entry.segment_id} vanished from the spool", status=410)

    def _throttle(self, n_bytes: int) -> None:
        if self.bucket is not None:
            wait = self.bucket.reserve(n_bytes, self.clock())
            if wait > 0:
                self.sleep(wait)
