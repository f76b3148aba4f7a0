"""The ingest logic shared by the HTTP server (cloud.ingest) and the embedded LocalTransport.

Resumable uploads: bytes land in ``<staging_dir>/<upload id>.part``, appended and fsynced; the file's
length IS the server's offset (a crash between the write and the catalog update can't make them
disagree), and bytes of a chunk cut off mid-body are kept, so a resumed upload never resends them.
When the last byte arrives the upload is finalized, in this order, and refused as a whole at the
first failure (partial deleted, upload marked failed, catalog and store untouched):
sha256 of the received bytes == declared → ``validate_segment_bytes`` (finalized MCAP, our schema) →
segment's vehicle == uploader → store content-addressed → catalog (one transaction with the upload's
``done``). If cataloging fails after the store wrote a new object, the object is removed again.
Per-vehicle quotas (open uploads, staged bytes, bytes per hour) and the automatic expiry of stale
uploads are the rules of ``cloud.quotas``; this service feeds them the catalog's view and the clock.
The checks run on the bytes read once from staging (python-tuf style: verify bytes, then do I/O);
this service does the staging, store and catalog around them.

Replicas: several ingest servers may serve one catalog (PostgreSQL), one object store and one staging
directory (a shared filesystem). A request's hold on an upload is then a thread lock *and* an ``flock``
on ``<upload id>.lock`` beside the partial file (:class:`UploadLock`), so two replicas never append to
the same upload at once and a vehicle may resume on any replica; a new upload's quota check takes the
staging directory's ``.declare.lock`` the same way. The per-vehicle byte budget stays per replica.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from driveloop.cloud import campaigns as campaign_rules
from driveloop.cloud.auth import authenticate, bearer_token, check_admin
from driveloop.cloud.catalog import UPLOAD_DONE, UPLOAD_FAILED, UPLOAD_OPEN, Catalog, SegmentRecord, UploadRecord
from driveloop.cloud.quotas import ByteBudget, OpenUpload, QuotaConfig, check_new_upload
from driveloop.cloud.store import ObjectStore, is_sha256
from driveloop.contracts.segment import SegmentInfo, validate_segment_bytes
from driveloop.contracts.upload import STATE_EXISTS, UPLOAD_NAME_MAX_CHARS, UploadStatus, is_upload_name
from driveloop.core.exceptions import AuthError, ConfigError, SegmentError, StorageError, UploadRejectedError
from driveloop.core.ids import check_vehicle_id
from driveloop.core.tokens import DEFAULT_ADMIN_NAME, AdminTokens, hash_token, new_token

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = UPLOAD_NAME_MAX_CHARS


@dataclass(frozen=True)
class IngestConfig:
    """Limits of the ingest service. ``admin_tokens`` ({name: sha256 of the token}) enable the admin
    campaign API, and the name is what the log records; ``admin_token_hash`` is the token named
    ``admin``. Without any, those endpoints answer 403. ``quotas``: per-vehicle limits."""

    staging_dir: Path
    max_segment_bytes: int = 64 * 2**20  # a 20 s segment is ~1 MB; far larger is not a segment
    max_chunk_bytes: int = 8 * 2**20
    admin_token_hash: str | None = None
    busy_wait_s: float = 2.0  # how long a request waits for another one on the same upload
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    admin_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "staging_dir", Path(self.staging_dir))
        if self.max_segment_bytes < 1 or self.max_chunk_bytes < 1:
            raise ConfigError("max_segment_bytes and max_chunk_bytes must be >= 1")
        if not 0 <= self.busy_wait_s <= 60:
            raise ConfigError(f"busy_wait_s must be in [0, 60], got {self.busy_wait_s}")
        if self.admin_token_hash is not None and not is_sha256(self.admin_token_hash):
            raise ConfigError("admin_token_hash must be a lowercase sha256 hex digest")
        if not all(is_sha256(h) for h in self.admin_tokens.values()):
            raise ConfigError("admin_tokens must map names to lowercase sha256 hex digests")

    def admins(self) -> AdminTokens:
        """Every admin token by name (``admin_token_hash`` under ``admin``)."""
        legacy = {} if self.admin_token_hash is None else {DEFAULT_ADMIN_NAME: self.admin_token_hash}
        return AdminTokens({**legacy, **self.admin_tokens})


@dataclass
class IngestStats:
    """Counters for /metrics and the exactly-once test: every body byte that reached the service."""

    bytes_received: int = 0
    segments_cataloged: int = 0
    uploads_rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)


def _status(up: UploadRecord, offset: int | None = None) -> UploadStatus:
    return UploadStatus(
        upload_id=up.id, sha256=up.sha256, size=up.size, offset=up.offset if offset is None else offset,
        state=up.state, cataloged=up.state == UPLOAD_DONE, error=up.error,
    )  # fmt: skip


class UploadLock:
    """One upload held by one request, across threads (a lock) and processes sharing the staging directory
    (``flock`` on ``path``: released by the kernel if the holder dies, so a killed replica frees it)."""

    def __init__(self, path: Path) -> None:
        self._thread = threading.Lock()
        self._path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        deadline = time.monotonic() + (timeout if timeout >= 0 else float("inf"))
        if not (self._thread.acquire(True, timeout) if blocking else self._thread.acquire(False)):
            return False
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            self._thread.release()
            raise
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if not blocking or time.monotonic() >= deadline:
                    os.close(fd)
                    self._thread.release()
                    return False
                time.sleep(0.01)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread.release()

    def locked(self) -> bool:
        return self._thread.locked()

    def __enter__(self) -> UploadLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ChunkWriter:
    """Appends one request body to an upload; ``close()`` makes it durable and finalizes a complete
    upload. Holds the upload's lock from creation to close, so two requests never interleave."""

    def __init__(self, service: IngestService, up: UploadRecord, part: Path, lock: UploadLock) -> None:
        self._service, self._up, self._part, self._lock = service, up, part, lock
        self._file = open(part, "ab")
        self._offset = self._file.tell()
        self._written = 0

    @property
    def offset(self) -> int:
        return self._offset + self._written

    def write(self, data: bytes) -> None:
        """Append; a body crossing the chunk limit or the declared size is cut exactly there (the
        bytes before the cut are kept, as for a dropped connection) and refused with 413."""
        self._service.stats.add(bytes_received=len(data))
        limit = self._service.config.max_chunk_bytes
        room = min(self._up.size - self.offset, limit - self._written)
        if len(data) > room:
            self._file.write(data[:room])
            self._written += room
            reason = f"chunk larger than {limit} bytes" if self._written >= limit else \
                f"chunk runs past the declared size {self._up.size}"
            raise UploadRejectedError(reason, status=413, offset=self.offset)
        self._file.write(data)
        self._written += len(data)

    def close(self) -> UploadStatus:
        """Flush + fsync what arrived (even from a dropped request), then finalize if complete."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            now = self._service.clock()
            self._service.budget.charge(self._up.vehicle, self._written, now)
            self._service.catalog.set_upload_offset(self._up.id, self.offset, now)
            if self.offset == self._up.size:
                return self._service._finalize(self._up, self._part)
            return _status(self._up, self.offset)
        finally:
            if not self._file.closed:
                self._file.close()
            self._lock.release()


class IngestService:
    """Upload, validation and campaign logic behind ``/v1`` (HTTP) and LocalTransport (in-process)."""

    def __init__(self, store: ObjectStore, catalog: Catalog, config: IngestConfig,
                 clock: Callable[[], float] = time.time,
                 validator: Callable[[bytes], SegmentInfo] = validate_segment_bytes) -> None:
        self.store, self.catalog, self.config, self.clock = store, catalog, config, clock
        self._validate = validator
        self.stats = IngestStats()
        self._locks: dict[str, UploadLock] = {}
        self._locks_guard = threading.Lock()
        self._admins = config.admins()
        self.budget = ByteBudget(config.quotas.max_bytes_per_hour)
        # quota check + new upload row: one at a time, across replicas sharing the staging directory
        self._declare_lock = UploadLock(config.staging_dir / ".declare.lock")
        self._next_expiry_s = -float("inf")
        config.staging_dir.mkdir(parents=True, exist_ok=True)

    # -- identity ----------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        """The vehicle id behind an ``Authorization`` header (AuthError 401/403 otherwise)."""
        return authenticate(self.catalog, bearer_token(authorization)).id

    def check_admin(self, authorization: str | None) -> str:
        """The name of the admin token in ``authorization`` (AuthError otherwise)."""
        return check_admin(bearer_token(authorization), self._admins)

    def ensure_local_vehicle(self, vehicle_id: str) -> str:
        """Register a vehicle of the embedded local cloud (no token ever leaves the process)."""
        check_vehicle_id(vehicle_id)
        if self.catalog.get_vehicle(vehicle_id) is None:
            try:
                self.catalog.add_vehicle(vehicle_id, hash_token(new_token()), self.clock())
            except ConfigError:  # another local process registered it first
                pass
        return vehicle_id

    # -- uploads -----------------------------------------------------------------------------
    def _part(self, upload_id: str) -> Path:
        return self.config.staging_dir / f"{upload_id}.part"

    def _received(self, up: UploadRecord) -> int:
        part = self._part(up.id)
        return min(part.stat().st_size, up.size) if part.exists() else 0

    def _owned(self, vehicle: str, upload_id: str) -> UploadRecord:
        up = self.catalog.get_upload(upload_id)
        if up is None:
            raise UploadRejectedError(f"unknown upload {upload_id!r}", status=404)
        if up.vehicle != vehicle:
            raise AuthError(f"upload {upload_id} belongs to another vehicle", status=403)
        return up

    def begin(self, vehicle: str, sha256: str, size: int, name: str) -> UploadStatus:
        """Declare an upload: resumes this vehicle's open upload of the same bytes, short-circuits
        bytes already cataloged (``exists``), otherwise opens a new one at offset 0."""
        if not isinstance(sha256, str) or not is_sha256(sha256):
            raise UploadRejectedError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}", status=422)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UploadRejectedError(f"size must be a positive integer, got {size!r}", status=422)
        if size > self.config.max_segment_bytes:
            raise UploadRejectedError(f"segment of {size} bytes exceeds {self.config.max_segment_bytes}", status=413)
        if not is_upload_name(name):
            raise UploadRejectedError(f"name must be a plain file name (<= {MAX_NAME_CHARS} chars, no path "
                                      "separator, control or bidi-override characters)", status=422)
        known = self.catalog.get_segment(sha256)
        if known is not None:
            if known.size != size:
                raise UploadRejectedError(f"{sha256} is cataloged with size {known.size}, not {size}", status=422)
            return UploadStatus(None, sha256, size, size, STATE_EXISTS, cataloged=True)
        self._expire_if_due()
        up = self.catalog.open_upload(vehicle, sha256)
        if up is not None and up.size == size:
            logger.info("vehicle %s resumes upload %s of %s", vehicle, up.id, name)
            return _status(up, self._received(up))
        with self._declare_lock:
            now = self.clock()
            held = [OpenUpload(u.size, u.updated_at_s) for u in self.catalog.uploads(UPLOAD_OPEN, vehicle=vehicle)]
            check_new_upload(self.config.quotas, held, size, now)
            up = self.catalog.create_upload(uuid.uuid4().hex, vehicle, sha256, size, name, now)
        logger.info("vehicle %s opened upload %s of %s (%d bytes)", vehicle, up.id, name, size)
        return _status(up, 0)

    def status(self, vehicle: str, upload_id: str) -> UploadStatus:
        up = self._owned(vehicle, upload_id)
        return _status(up, up.size if up.state == UPLOAD_DONE else self._received(up))

    def _settled(self, vehicle: str, upload_id: str) -> UploadRecord | UploadStatus:
        """The upload if bytes may still be appended; its final status if it is done (a retry whose
        first reply was lost); 422 if it failed."""
        up = self._owned(vehicle, upload_id)
        if up.state == UPLOAD_DONE:
            return _status(up, up.size)
        if up.state == UPLOAD_FAILED:
            raise UploadRejectedError(f"upload {upload_id} failed: {up.error}", status=422)
        return up

    def open_chunk(self, vehicle: str, upload_id: str, offset: int, declared_length: int | None) -> ChunkWriter | UploadStatus:
        """Start appending at ``offset`` (wrong offset → 409 with the server's). If another request
        still holds the upload (typically the one whose connection just dropped, not yet noticed),
        wait up to ``busy_wait_s`` for it rather than answer with an offset about to change."""
        up = self._settled(vehicle, upload_id)
        if isinstance(up, UploadStatus):
            return up
        if declared_length is not None:
            if declared_length > self.config.max_chunk_bytes:
                raise UploadRejectedError(f"chunk larger than {self.config.max_chunk_bytes} bytes", status=413)
            if offset + declared_length > up.size:
                raise UploadRejectedError(f"chunk runs past the declared size {up.size}", status=413)
        self.budget.admit(vehicle, declared_length or 1, self.clock())
        lock = self._lock_of(upload_id)
        if not lock.acquire(timeout=self.config.busy_wait_s):
            raise UploadRejectedError(f"upload {upload_id} is busy", status=409, offset=self._received(up))
        try:
            up = self._settled(vehicle, upload_id)  # the request we waited for may have finished it
            if isinstance(up, UploadStatus):
                lock.release()
                return up
            received = self._received(up)
            if offset != received:
                raise UploadRejectedError(f"offset {offset} != server offset {received}", status=409, offset=received)
            return ChunkWriter(self, up, self._part(up.id), lock)
        except BaseException:
            lock.release()
            raise

    def uploads_in_flight(self) -> int:
        """Requests currently appending to an upload (for /metrics, and to let tests settle)."""
        with self._locks_guard:
            return sum(lock.locked() for lock in self._locks.values())

    def append(self, vehicle: str, upload_id: str, offset: int, data: bytes,
               declared_length: int | None = None) -> UploadStatus:
        """Append one whole chunk (the in-process path; the server streams through ChunkWriter)."""
        writer = self.open_chunk(vehicle, upload_id, offset, declared_length)
        if isinstance(writer, UploadStatus):
            return writer
        try:
            writer.write(data)
        finally:
            status = writer.close()
        return status

    def expire_uploads(self, max_age_s: float) -> list[str]:
        """Give up on open uploads untouched for ``max_age_s`` (a vehicle that never came back):
        partial bytes deleted, upload marked failed. A vehicle returning later declares again and
        starts over. Uploads receiving bytes right now are left alone. Returns the expired ids."""
        if not max_age_s > 0:
            raise ConfigError(f"max_age_s must be > 0, got {max_age_s}")
        now, expired = self.clock(), []
        for up in self.catalog.uploads(state=UPLOAD_OPEN):
            if now - up.updated_at_s < max_age_s:
                continue
            lock = self._lock_of(up.id)
            if not lock.acquire(blocking=False):
                continue
            try:
                self._part(up.id).unlink(missing_ok=True)
                self.catalog.fail_upload(up.id, f"expired after {max_age_s:.0f}s without progress", now)
                expired.append(up.id)
            finally:
                lock.release()
                self._forget_lock(up.id)
        if expired:
            logger.info("expired %d stale uploads", len(expired))
        return expired

    def _expire_if_due(self) -> None:
        """The automatic sweep for stale uploads, run by declarations once per quota expiry period."""
        stale_s = self.config.quotas.stale_upload_s
        now = self.clock()
        if stale_s is None or now < self._next_expiry_s:
            return
        self._next_expiry_s = now + self.config.quotas.expiry_period_s
        self.expire_uploads(stale_s)

    def _lock_of(self, upload_id: str) -> UploadLock:
        with self._locks_guard:
            return self._locks.setdefault(upload_id, UploadLock(self.config.staging_dir / f"{upload_id}.lock"))

    def _forget_lock(self, upload_id: str) -> None:
        """A finished upload takes no more bytes (requests stop at its state, checked again once they
        hold the lock), so drop its lock and lock file; the holder releases its own as usual."""
        with self._locks_guard:
            self._locks.pop(upload_id, None)
        (self.config.staging_dir / f"{upload_id}.lock").unlink(missing_ok=True)

    def _reject(self, up: UploadRecord, part: Path, error: Exception) -> None:
        part.unlink(missing_ok=True)
        self._forget_lock(up.id)
        self.catalog.fail_upload(up.id, str(error), self.clock())
        self.stats.add(uploads_rejected=1)
        logger.warning("rejected upload %s (%s) from %s: %s", up.id, up.name, up.vehicle, error)

    def _finalize(self, up: UploadRecord, part: Path) -> UploadStatus:
        data = part.read_bytes()  # at most max_segment_bytes (checked when the upload was declared)
        sha = hashlib.sha256(data).hexdigest()
        try:
            if sha != up.sha256:
                raise UploadRejectedError(f"sha256 of received bytes is {sha}, declared {up.sha256}", status=422)
            info = self._validate(data)
            if info.meta.vehicle != up.vehicle:
                raise AuthError(f"segment was recorded by {info.meta.vehicle!r}, uploaded by {up.vehicle!r}",
                                status=403)
        except SegmentError as e:  # the bytes' error names no path: name the upload
            refused = SegmentError(f"segment {up.name} refused: {e}")
            self._reject(up, part, refused)
            raise refused from e
        except (UploadRejectedError, AuthError) as e:
            self._reject(up, part, e)
            raise
        existed = self.store.exists(sha)
        self.store.put_file(part, expected_sha256=sha)
        record = SegmentRecord.from_info(info, ingested_at_s=self.clock(), name=up.name)
        record = replace(record, sha256=sha, size=up.size)  # what we hashed, not what the file claims
        try:
            new = self.catalog.complete_upload(up.id, record, self.clock())
        except StorageError:
            if not existed:
                self.store.delete(sha)
            raise
        part.unlink(missing_ok=True)
        self._forget_lock(up.id)
        if new:
            self.stats.add(segments_cataloged=1)
        logger.info("cataloged %s (%s) from %s", sha, up.name, up.vehicle)
        return UploadStatus(up.id, sha, up.size, up.size, UPLOAD_DONE, cataloged=True)

    # -- campaigns ---------------------------------------------------------------------------
    def vehicle_campaigns(self) -> list[dict[str, Any]]:
        """Approved, unexpired campaigns, most urgent first, as vehicles receive them."""
        now = self.clock()
        return [campaign_rules.to_wire(c) for c in campaign_rules.active_campaigns(self.catalog.campaigns(), now)]

    def create_campaign(self, payload: object, actor: str = "local") -> dict[str, Any]:
        """``actor``: the admin token's name (over HTTP) or ``local`` (the CLI on the catalog itself)."""
        campaign = campaign_rules.new_campaign(campaign_rules.spec_from_json(payload), self.clock())
        self.catalog.save_campaign(campaign)
        logger.info("created campaign %s (%s) by %s", campaign.id, campaign.spec.name, actor)
        return campaign_rules.to_wire(campaign)

    def approve_campaign(self, campaign_id: str, actor: str = "local") -> dict[str, Any]:
        campaign = self.catalog.get_campaign(campaign_id)
        if campaign is None:
            raise UploadRejectedError(f"unknown campaign {campaign_id!r}", status=404)
        approved = campaign_rules.approve(campaign, self.clock())
        self.catalog.save_campaign(approved)
        logger.info("approved campaign %s (%s) by %s", approved.id, approved.spec.name, actor)
        return campaign_rules.to_wire(approved)
