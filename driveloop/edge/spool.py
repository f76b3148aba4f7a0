"""The vehicle's on-disk segment spool, with a disk quota that keeps event data longest.

Layout under ``root``::

    open/        <opened_ns>-<vehicle>.mcap.part      being written (append-only); never uploaded
    closed/      <opened_ns>-<vehicle>-p<priority>.mcap  finalized, fsynced, ready to upload
    quarantine/  leftovers of a crash (a .part whose writer died), kept for forensics

There is no separate index: everything the spool needs (vehicle, age, priority) is in the file
name, and a file only enters closed/ by an atomic ``os.replace`` after it was fsynced. So the spool
is as crash-proof as the file system: after a power cut, closed/ holds only whole segments and the
state is simply what is on disk. Details (events, scenario, seed…) are in each segment's metadata.

Priority 0 is routine data; 1..9 are event segments (the highest trigger priority that touched
them). ``closed_segments()`` lists upload order: highest priority first, then oldest. When usage
exceeds the quota the spool evicts quarantine first, then routine segments (oldest first), and only
then event segments (lowest priority, oldest first). Open segments are never evicted.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from driveloop.core.atomic import fsync_dir
from driveloop.contracts.segment import PART_SUFFIX, SEGMENT_SUFFIX
from driveloop.core.exceptions import ConfigError, StorageError
from driveloop.core.ids import VEHICLE_ID_REGEX, check_vehicle_id

logger = logging.getLogger(__name__)

# The vehicle id may itself contain "-" (and even "-p1"): the anchored "-p<digit>.mcap" tail decides.
# A name whose id breaks the rule (e.g. "..") is not a segment: it never reaches a path or an upload.
_CLOSED_RE = re.compile(rf"^(?P<opened_ns>\d{{19}})-(?P<vehicle>{VEHICLE_ID_REGEX})-p(?P<priority>\d)\.mcap$")
MAX_PRIORITY = 9


@dataclass(frozen=True)
class SpoolEntry:
    """A closed segment as the spool sees it (from its file name and size)."""

    path: Path
    segment_id: str  # "<opened_ns>-<vehicle>": stable when the priority (file name suffix) changes
    vehicle: str
    opened_ns: int
    priority: int
    size_bytes: int

    @property
    def has_event(self) -> bool:
        return self.priority > 0


class Spool:
    """Segments on disk between the recorder and the uploader, bounded by ``quota_bytes``."""

    def __init__(self, root: str | os.PathLike[str], quota_bytes: int) -> None:
        if not isinstance(quota_bytes, int) or quota_bytes <= 0:
            raise ConfigError(f"spool quota_bytes must be a positive integer, got {quota_bytes!r}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.open_dir = self.root / "open"
        self.closed_dir = self.root / "closed"
        self.quarantine_dir = self.root / "quarantine"
        try:
            for d in (self.open_dir, self.closed_dir, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create spool at {self.root}: {e}") from e

    # ------------------------------------------------------------------ naming
    def part_path(self, vehicle: str, opened_ns: int) -> Path:
        """Where a recorder writes a new segment."""
        return self.open_dir / f"{opened_ns:019d}-{check_vehicle_id(vehicle)}{PART_SUFFIX}"

    def closed_path(self, vehicle: str, opened_ns: int, priority: int) -> Path:
        if not 0 <= priority <= MAX_PRIORITY:
            raise ConfigError(f"segment priority must be in 0..{MAX_PRIORITY}, got {priority}")
        return self.closed_dir / f"{opened_ns:019d}-{check_vehicle_id(vehicle)}-p{priority}{SEGMENT_SUFFIX}"

    # ------------------------------------------------------------------ listing
    def _entries(self) -> list[SpoolEntry]:
        out = []
        for p in self.closed_dir.iterdir():
            m = _CLOSED_RE.match(p.name)
            if m is None:
                continue
            try:
                size = p.stat().st_size
            except FileNotFoundError:  # removed by the uploader while we listed
                continue
            out.append(SpoolEntry(p, f"{m['opened_ns']}-{m['vehicle']}", m["vehicle"],
                                  int(m["opened_ns"]), int(m["priority"]), size))
        return out

    def closed_segments(self) -> list[SpoolEntry]:
        """Upload order: event segments first (highest priority first), then oldest first."""
        return sorted(self._entries(), key=lambda e: (-e.priority, e.opened_ns, e.segment_id))

    def open_parts(self, vehicle: str | None = None) -> list[Path]:
        parts = sorted(self.open_dir.glob(f"*{PART_SUFFIX}"))
        return [p for p in parts if vehicle is None or p.name[20:-len(PART_SUFFIX)] == vehicle]

    def usage_bytes(self) -> int:
        """Bytes held in open/, closed/ and quarantine/."""
        total = 0
        for d in (self.open_dir, self.closed_dir, self.quarantine_dir):
            for p in d.iterdir():
                try:
                    total += p.stat().st_size
                except FileNotFoundError:
                    continue
        return total

    # ------------------------------------------------------------------ changes
    def add_closed(self, part: Path, vehicle: str, opened_ns: int, priority: int) -> tuple[Path, list[Path]]:
        """Atomically publish a finalized, fsynced ``part`` into closed/, then enforce the quota.
        Returns the closed path and the paths evicted to make room."""
        dest = self.closed_path(vehicle, opened_ns, priority)
        try:
            os.replace(part, dest)
            fsync_dir(self.closed_dir)
            fsync_dir(self.open_dir)
        except OSError as e:
            raise StorageError(f"cannot publish segment {part} -> {dest}: {e}") from e
        return dest, self.enforce_quota()

    def promote(self, path: Path, priority: int) -> Path:
        """Raise a closed segment's priority (a later event's pre-window reaches into it)."""
        entry = self._find(Path(path))
        if entry is None or entry.priority >= priority:
            return entry.path if entry is not None else Path(path)
        dest = self.closed_path(entry.vehicle, entry.opened_ns, priority)
        try:
            os.replace(entry.path, dest)
            fsync_dir(self.closed_dir)
        except FileNotFoundError:  # uploaded and removed meanwhile: nothing left to promote
            return Path(path)
        except OSError as e:
            raise StorageError(f"cannot promote {entry.path}: {e}") from e
        logger.info("promoted %s to priority %d", entry.segment_id, priority)
        return dest

    def remove(self, path: Path) -> bool:
        """Delete a closed segment (the uploader calls this after the server confirmed its sha256).
        Finds it even if it was promoted (renamed) since it was listed. False if already gone."""
        entry = self._find(Path(path))
        if entry is None:
            return False
        try:
            entry.path.unlink()
            fsync_dir(self.closed_dir)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(f"cannot remove {entry.path}: {e}") from e
        return True

    @staticmethod
    def part_opened_ns(part: Path) -> int:
        """The open time encoded in a .part name (see ``part_path``)."""
        return int(part.name[:19])

    def quarantine(self, part: Path) -> Path:
        """Move one leftover .part file (its writer died) to quarantine/, durably."""
        dest = self.quarantine_dir / part.name
        try:
            os.replace(part, dest)
            fsync_dir(self.quarantine_dir)
            fsync_dir(self.open_dir)
        except OSError as e:
            raise StorageError(f"cannot quarantine {part}: {e}") from e
        logger.warning("quarantined unfinished segment from a previous crash: %s", dest)
        return dest

    def quarantine_parts(self, vehicle: str) -> list[Path]:
        """Quarantine all of ``vehicle``'s leftover .part files. Only the given vehicle's: other
        recorders sharing this spool may be writing theirs right now."""
        return [self.quarantine(p) for p in self.open_parts(check_vehicle_id(vehicle))]

    def enforce_quota(self) -> list[Path]:
        """Evict until usage <= quota: quarantine, then routine oldest-first, then events by
        (priority, age). Returns what was deleted."""
        usage = self.usage_bytes()
        if usage <= self.quota_bytes:
            return []
        victims: list[tuple[Path, int]] = []
        for p in sorted(self.quarantine_dir.iterdir()):
            try:
                victims.append((p, p.stat().st_size))
            except FileNotFoundError:
                continue
        victims += [(e.path, e.size_bytes) for e in sorted(self._entries(), key=lambda e: (e.priority, e.opened_ns))]
        evicted = []
        for p, size in victims:
            if usage <= self.quota_bytes:
                break
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(f"cannot evict {p}: {e}") from e
            usage -= size
            evicted.append(p)
            logger.warning("spool over quota (%d B): evicted %s", self.quota_bytes, p.name)
        fsync_dir(self.closed_dir)
        return evicted

    def _find(self, path: Path) -> SpoolEntry | None:
        m = _CLOSED_RE.match(path.name)
        if m is None:
            return None
        seg_id = f"{m['opened_ns']}-{m['vehicle']}"
        return next((e for e in self._entries() if e.segment_id == seg_id), None)
