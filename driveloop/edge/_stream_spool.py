"""The stream client's on-disk spool: messages the broker has not acknowledged, in publish order.

Append-only segment files (``<first index>.log``, records ``[u32 length][u32 crc32][body]``, body
``[u16 subject length][subject][u16 id length][msg id][payload]``), one fsync per appended batch, and a
``cursor`` file naming the first record not yet acknowledged (written atomically, at most every
``cursor_interval_s`` and on close: after a crash the few records acked since are replayed again, and the
broker's de-dup window and the sink's (vehicle, seq) key drop them).

Rules it keeps:
- Records come back in the order they were appended; an ack may arrive out of order, the cursor only
  moves over a contiguous acknowledged prefix.
- A torn tail (power cut mid-append) is cut off at the last whole record on load; a corrupt record ends
  its segment (nothing after it is trusted).
- The spool never exceeds ``max_bytes``: the oldest whole segment is evicted, and each record in it that
  was never acknowledged is counted in ``dropped``.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import StorageError

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<II")
_LEN = struct.Struct("<H")
_SUFFIX = ".log"


@dataclass(frozen=True)
class SpoolRecord:
    index: int
    subject: str
    msg_id: str
    data: bytes


def _body(subject: str, msg_id: str, data: bytes) -> bytes:
    s, m = subject.encode(), msg_id.encode()
    return b"".join((_LEN.pack(len(s)), s, _LEN.pack(len(m)), m, data))


def _parse(body: bytes) -> tuple[str, str, bytes]:
    n = _LEN.unpack_from(body, 0)[0]
    subject = body[2:2 + n].decode()
    pos = 2 + n
    k = _LEN.unpack_from(body, pos)[0]
    msg_id = body[pos + 2:pos + 2 + k].decode()
    return subject, msg_id, body[pos + 2 + k:]


class Spool:
    """Unacknowledged messages of one vehicle, on disk under ``directory`` and mirrored in memory."""

    def __init__(self, directory: Path, max_bytes: int = 64 << 20, segment_bytes: int | None = None,
                 cursor_interval_s: float = 0.5) -> None:
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or max(4096, min(1 << 20, self.max_bytes // 8)))
        self.cursor_interval_s = cursor_interval_s
        self.dropped = 0
        self._records: deque[SpoolRecord] = deque()
        self._acked: set[int] = set()
        self._send_next = 0  # index of the next record to hand out by next_unsent
        self._segments: list[tuple[int, Path, int]] = []  # (first index, path, bytes), oldest first
        self._fd = -1
        self._cursor_written = -1
        self._cursor_at = 0.0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as e:
            raise StorageError(f"stream spool {self.dir}: {e}") from e

    # -- loading -------------------------------------------------------------------------------------------
    def _read_cursor(self) -> int:
        try:
            return int((self.dir / "cursor").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            logger.warning("spool %s: unreadable cursor, replaying everything kept", self.dir)
            return 0

    def _load(self) -> None:
        cursor = self._read_cursor()
        files = sorted((int(p.stem), p) for p in self.dir.glob(f"*{_SUFFIX}") if p.stem.isdigit())
        next_index = cursor
        for first, path in files:
            data = path.read_bytes()
            pos, index = 0, first
            while pos + _HEAD.size <= len(data):
                length, crc = _HEAD.unpack_from(data, pos)
                body = data[pos + _HEAD.size:pos + _HEAD.size + length]
                if len(body) != length or zlib.crc32(body) != crc:
                    break
                if index >= cursor:
                    self._records.append(SpoolRecord(index, *_parse(body)))
                pos += _HEAD.size + length
                index += 1
            if pos < len(data):
                logger.warning("spool %s: cutting a torn or corrupt tail of %d bytes", path, len(data) - pos)
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
            next_index = max(next_index, index)
            if index <= cursor:  # every record acknowledged already
                path.unlink()
            else:
                self._segments.append((first, path, pos))
        self._next_index = next_index
        self._send_next = self._records[0].index if self._records else next_index
        self._cursor_written = cursor

    # -- writing -------------------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        path = self.dir / f"{self._next_index:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append((self._next_index, path, 0))

    def append(self, items: Iterable[tuple[str, str, bytes]]) -> list[SpoolRecord]:
        """Append (subject, msg id, payload) items durably (one fsync); returns their records."""
        out: list[SpoolRecord] = []
        chunks: list[bytes] = []
        try:
            for subject, mid, data in items:
                if self._fd < 0 or (self._segments and self._segments[-1][2] >= self.segment_bytes):
                    self._write(chunks)
                    chunks = []
                    if self._fd >= 0:
                        os.fsync(self._fd)
                        os.close(self._fd)
                    self._open_segment()
                body = _body(subject, mid, data)
                chunk = _HEAD.pack(len(body), zlib.crc32(body)) + body
                chunks.append(chunk)
                first, path, size = self._segments[-1]
                self._segments[-1] = (first, path, size + len(chunk))
                rec = SpoolRecord(self._next_index, subject, mid, data)
                self._next_index += 1
                self._records.append(rec)
                out.append(rec)
            self._write(chunks)
            if out:
                os.fsync(self._fd)
        except OSError as e:
            raise StorageError(f"stream spool {self.dir}: {e}") from e
        self._evict()
        return out

    def _write(self, chunks: list[bytes]) -> None:
        if chunks:
            data = b"".join(chunks)
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def _evict(self) -> None:
        while len(self._segments) > 1 and sum(s[2] for s in self._segments) > self.max_bytes:
            first, path, _ = self._segments.pop(0)
            end = self._segments[0][0]
            while self._records and self._records[0].index < end:
                rec = self._records.popleft()
                if rec.index in self._acked:
                    self._acked.discard(rec.index)
                else:
                    self.dropped += 1
            self._send_next = max(self._send_next, end)
            path.unlink(missing_ok=True)
            logger.warning("spool %s full (%d bytes): evicted %s", self.dir, self.max_bytes, path.name)

    # -- reading and acknowledging -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def next_unsent(self, limit: int) -> list[SpoolRecord]:
        """Up to ``limit`` records not yet handed out since the last :meth:`rewind`, in order."""
        if not self._records or limit <= 0:
            return []
        start = max(0, self._send_next - self._records[0].index)
        out = [r for r in islice(self._records, start, start + limit) if r.index not in self._acked]
        if out:
            self._send_next = out[-1].index + 1
        return out

    def unsent(self) -> int:
        if not self._records:
            return 0
        return max(0, self._records[-1].index + 1 - max(self._send_next, self._records[0].index))

    def rewind(self) -> None:
        """Hand out every unacknowledged record again (after a lost connection or an ack timeout)."""
        self._send_next = self._records[0].index if self._records else self._next_index

    def ack(self, index: int) -> None:
        if not self._records or index < self._records[0].index:
            return
        self._acked.add(index)
        while self._records and self._records[0].index in self._acked:
            self._acked.discard(self._records.popleft().index)
        if not self._records:
            self.persist_cursor(force=True)

    def persist_cursor(self, force: bool = False) -> None:
        """Write the first unacknowledged index (rate-limited unless ``force``); drop fully acked segments."""
        cursor = self._records[0].index if self._records else self._next_index
        now = time.monotonic()
        if cursor == self._cursor_written or (not force and now - self._cursor_at < self.cursor_interval_s):
            return
        try:
            write_atomic(self.dir / "cursor", f"{cursor}\n".encode(), mode=0o600)
            self._cursor_written, self._cursor_at = cursor, now
            while self._segments:
                first, path, _ = self._segments[0]
                end = self._segments[1][0] if len(self._segments) > 1 else self._next_index
                if end > cursor or (len(self._segments) == 1 and self._fd >= 0 and end != cursor):
                    break
                self._segments.pop(0)
                if not self._segments and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"stream spool {self.dir}: {e}") from e

    def close(self) -> None:
        self.persist_cursor(force=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
