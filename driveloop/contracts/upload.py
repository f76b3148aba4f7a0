"""The upload protocol's wire contract: what the ingest service answers about one upload.

Shared by the vehicle's transports (``edge.transport``) and the cloud's ingest service
(``cloud.ingest_service``), so both sides parse and build the same record.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from driveloop.core.exceptions import UploadError

STATE_OPEN = "open"
STATE_DONE = "done"
STATE_EXISTS = "exists"
STATE_FAILED = "failed"
UPLOAD_STATES = (STATE_OPEN, STATE_DONE, STATE_EXISTS, STATE_FAILED)
OFFSET_HEADER = "Upload-Offset"
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"
UPLOAD_NAME_MAX_CHARS = 255
# Unicode categories a file name shown to people and written to logs must not hold: controls (NUL, ESC,
# newlines), format characters (bidi overrides like U+202E that make "evil\u202egpj.exe" read as a
# .jpg, zero-width joiners), line/paragraph separators, surrogates, private-use and unassigned points.
_FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def is_upload_name(name: object) -> bool:
    """True for a plain file name: 1..255 characters, no path separator, not ``.``/``..``, and none of
    the invisible or control characters above (the name is cataloged, listed and logged)."""
    if not isinstance(name, str) or not 0 < len(name) <= UPLOAD_NAME_MAX_CHARS or name in (".", ".."):
        return False
    if "/" in name or "\\" in name:
        return False
    return not any(unicodedata.category(ch) in _FORBIDDEN_NAME_CATEGORIES for ch in name)


@dataclass(frozen=True)
class UploadStatus:
    """The server's view of one upload (the wire contract of every upload endpoint)."""

    upload_id: str | None
    sha256: str
    size: int
    offset: int
    state: str
    cataloged: bool = False
    error: str | None = None

    @property
    def confirmed(self) -> bool:
        """The cloud holds and has cataloged these bytes: the spool copy may be deleted."""
        return self.cataloged and self.state in (STATE_DONE, STATE_EXISTS)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: object) -> UploadStatus:
        """Parse a server reply; anything malformed is an UploadError (a broken or foreign server)."""
        if not isinstance(payload, Mapping):
            raise UploadError(f"upload status must be a JSON object, got {type(payload).__name__}")
        try:
            status = cls(
                upload_id=None if payload.get("upload_id") is None else str(payload["upload_id"]),
                sha256=str(payload["sha256"]),
                size=int(payload["size"]),
                offset=int(payload["offset"]),
                state=str(payload["state"]),
                cataloged=bool(payload.get("cataloged", False)),
                error=None if payload.get("error") is None else str(payload["error"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UploadError(f"malformed upload status {dict(payload)!r}: {e}") from e
        if status.state not in UPLOAD_STATES or not 0 <= status.offset <= status.size:
            raise UploadError(f"inconsistent upload status {status}")
        return status
