"""Append-only, hash-chained audit log of every rollout decision and operator action.

Each entry stores ``prev_hash`` (the previous entry's hash, ``GENESIS`` for the first) and its own
``hash`` = sha256 over the canonical JSON (sorted keys, no whitespace) of every other field. Changing,
removing, reordering or inserting any entry breaks the chain from that point on, and :func:`verify`
names the first bad entry. The chain logic is pure; :class:`JsonlAuditLog` keeps it in a file (one
entry per line, each append written whole and fsync'd); the fleet store keeps it in SQLite with the
same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from driveloop.core.exceptions import OtaError, StorageError

GENESIS = "0" * 64

__all__ = ["AuditEntry", "VerifyResult", "make_entry", "verify", "JsonlAuditLog", "GENESIS"]


def canonical(obj: Any) -> bytes:
    """The one byte form that is hashed: sorted keys, no whitespace, no NaN."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise OtaError(f"audit payload is not canonical JSON: {e}") from e


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at_s: float
    kind: str  # e.g. "start", "decision", "operator"
    actor: str
    rollout_id: int | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        del d["hash"]
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEntry:
        return cls(int(d["seq"]), float(d["at_s"]), d["kind"], d["actor"], d["rollout_id"], d["payload"],
                   d["prev_hash"], d["hash"])


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def make_entry(prev: AuditEntry | None, at_s: float, kind: str, actor: str, rollout_id: int | None,
               payload: dict[str, Any]) -> AuditEntry:
    """The next entry after ``prev`` (None → the first entry)."""
    seq = 0 if prev is None else prev.seq + 1
    prev_hash = GENESIS if prev is None else prev.hash
    body = {"seq": seq, "at_s": at_s, "kind": kind, "actor": actor, "rollout_id": rollout_id,
            "payload": payload, "prev_hash": prev_hash}
    # round-trip so the stored payload is exactly what was hashed (tuples → lists, etc.)
    body = json.loads(canonical(body))
    return AuditEntry(hash=_digest(body), **body)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad: int | None = None  # position of the first bad entry
    reason: str = ""


def verify(entries: Sequence[AuditEntry] | Iterable[AuditEntry]) -> VerifyResult:
    """Walk the chain; report the first entry whose position, link or own hash is wrong."""
    prev_hash = GENESIS
    n = 0
    for i, e in enumerate(entries):
        n = i + 1
        if e.seq != i:
            return VerifyResult(False, n, i, f"entry {i} has seq {e.seq} (removed or reordered entries)")
        if e.prev_hash != prev_hash:
            return VerifyResult(False, n, i, f"entry {i} does not link to the entry before it")
        if _digest(e.body()) != e.hash:
            return VerifyResult(False, n, i, f"entry {i} was modified (hash mismatch)")
        prev_hash = e.hash
    return VerifyResult(True, n)


class JsonlAuditLog:
    """The chain in a JSON-lines file. Appends are single whole-line writes followed by fsync."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._last: AuditEntry | None = None
        entries = self.entries()
        if entries:
            self._last = entries[-1]

    def entries(self) -> list[AuditEntry]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    raise StorageError(f"{self.path}:{lineno}: torn last entry (no newline)")
                try:
                    out.append(AuditEntry.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError) as e:
                    raise StorageError(f"{self.path}:{lineno}: unreadable audit entry: {e}") from e
        return out

    def append(self, at_s: float, kind: str, actor: str, rollout_id: int | None,
               payload: dict[str, Any]) -> AuditEntry:
        entry = make_entry(self._last, at_s, kind, actor, rollout_id, payload)
        line = canonical(entry.to_dict()) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last = entry
        return entry

    def verify(self) -> VerifyResult:
        return verify(self.entries())
