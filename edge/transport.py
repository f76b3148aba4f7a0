"""How a vehicle talks to the cloud's ingest service: the resumable upload protocol, client side.

One Protocol (:class:`UploadTransport`), two real implementations:
- :class:`HttpTransport` — the ingest server (``driveloop cloud serve``) over HTTP with a bearer token;
- :class:`LocalTransport` — the embedded local cloud under the data directory, used when no cloud URL
  is configured. It calls the very same ``IngestService`` the server runs, so a segment is verified,
  validated, stored and cataloged the same way whichever path it takes.
A fake with injectable failures lives in ``tests/fakes/transport.py``.

Protocol (tus-like): ``start`` declares (sha256, size, name) and gets an upload id and the server's
offset (an unfinished upload of the same bytes resumes; already-cataloged bytes answer ``exists``);
``send_chunk`` appends bytes at an offset and returns the new offset; the chunk that completes the
file returns ``cataloged``. Errors: :class:`UploadError` = try again later (connection dropped,
server down); :class:`UploadRejectedError` = the server refused for good (its ``offset`` is set on a
409 offset conflict, so the caller can resync); :class:`AuthError` = credentials refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from driveloop.exceptions import (
    AuthError,
    ConfigError,
    SegmentError,
    StorageError,
    UploadError,
    UploadRejectedError,
)

if TYPE_CHECKING:
    from driveloop.cloud._ingest_service import IngestService
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.store import ObjectStore
    from driveloop.edge.triggers import TriggerSpec

logger = logging.getLogger(__name__)

STATE_OPEN = "open"
STATE_DONE = "done"
STATE_EXISTS = "exists"
STATE_FAILED = "failed"
UPLOAD_STATES = (STATE_OPEN, STATE_DONE, STATE_EXISTS, STATE_FAILED)
OFFSET_HEADER = "Upload-Offset"
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"


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


class UploadTransport(Protocol):
    """The vehicle's side of the upload protocol (see the module docstring for the rules)."""

    def start(self, sha256: str, size: int, name: str) -> UploadStatus: ...

    def offset(self, upload_id: str) -> UploadStatus: ...

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus: ...

    def campaigns(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def campaign_triggers(campaigns: list[dict[str, Any]]) -> list[TriggerSpec]:
    """Recorder triggers from ``campaigns()``: each campaign carries the TriggerSpec the cloud derived
    from it (``trigger``); TriggerSpec re-validates it on the vehicle. Malformed → ConfigError."""
    from driveloop.edge.triggers import TriggerSpec

    specs = []
    for c in campaigns:
        trigger = c.get("trigger") if isinstance(c, Mapping) else None
        if not isinstance(trigger, Mapping):
            raise ConfigError(f"campaign without a trigger: {c!r}")
        try:
            specs.append(TriggerSpec(**dict(trigger)))
        except TypeError as e:
            raise ConfigError(f"campaign trigger has unexpected fields: {e}") from e
    return specs


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    return str(body.get("error", body)) if isinstance(body, Mapping) else str(body)[:200]


class HttpTransport:
    """The ingest server over HTTP(S). ``client`` may be injected (e.g. with an httpx MockTransport)."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0, client: httpx.Client | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL must be http(s)://…, got {base_url!r}")
        if not token:
            raise ConfigError("a cloud token is required for the HTTP transport")
        self._client = client or httpx.Client(timeout=timeout_s)
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            response = self._client.request(method, f"{self._base}{path}", headers=headers, **kwargs)
        except httpx.TransportError as e:  # refused, reset, timed out, dropped mid-body
            raise UploadError(f"{method} {path}: {type(e).__name__}: {e}") from e
        if response.status_code < 400:
            return response
        text = _error_text(response)
        if response.status_code in (401, 403):
            raise AuthError(f"{method} {path}: {text}", status=response.status_code)
        if response.status_code >= 500 or response.status_code == 429:
            raise UploadError(f"{method} {path}: HTTP {response.status_code}: {text}")
        offset = response.headers.get(OFFSET_HEADER)
        raise UploadRejectedError(
            f"{method} {path}: HTTP {response.status_code}: {text}",
            status=response.status_code,
            offset=int(offset) if offset is not None and offset.isdigit() else None,
        )

    def _status(self, response: httpx.Response) -> UploadStatus:
        try:
            return UploadStatus.from_json(response.json())
        except ValueError as e:
            raise UploadError(f"server sent non-JSON reply: {response.text[:200]!r}") from e

    def start(self, sha256: str, size: int, name: str) -> UploadStatus:
        return self._status(self._request("POST", "/v1/uploads", json={"sha256": sha256, "size": size, "name": name}))

    def offset(self, upload_id: str) -> UploadStatus:
        return self._status(self._request("GET", f"/v1/uploads/{upload_id}"))

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus:
        headers = {OFFSET_HEADER: str(offset), "Content-Type": CHUNK_CONTENT_TYPE}
        return self._status(self._request("PATCH", f"/v1/uploads/{upload_id}", content=data, headers=headers))

    def campaigns(self) -> list[dict[str, Any]]:
        body = self._request("GET", "/v1/campaigns").json()
        if not isinstance(body, Mapping) or not isinstance(body.get("campaigns"), list):
            raise UploadError(f"malformed campaigns reply: {body!r}")
        return list(body["campaigns"])

    def close(self) -> None:
        self._client.close()


@contextmanager
def _as_client_errors() -> Iterator[None]:
    """What the HTTP client would see for the same refusal: a bad segment or bad request is a
    permanent UploadRejectedError (422), a storage failure is retryable (UploadError, like a 503)."""
    try:
        yield
    except (AuthError, UploadError):
        raise
    except (SegmentError, ConfigError) as e:
        raise UploadRejectedError(str(e), status=422) from e
    except StorageError as e:
        raise UploadError(f"local cloud storage failed: {e}") from e


class LocalTransport:
    """The embedded local cloud: the same IngestService as the server, called in-process as
    ``vehicle_id`` (registered on first use — the local cloud trusts its own vehicles)."""

    def __init__(self, store: ObjectStore, catalog: Catalog, vehicle_id: str, staging_dir: str | Path) -> None:
        from driveloop.cloud._ingest_service import IngestConfig, IngestService

        self.service: IngestService = IngestService(store, catalog, IngestConfig(staging_dir=Path(staging_dir)))
        self.vehicle_id = self.service.ensure_local_vehicle(vehicle_id)

    @classmethod
    def under(cls, cloud_dir: str | Path, vehicle_id: str, catalog_url: str | None = None,
              store_url: str | None = None) -> LocalTransport:
        """The local cloud in ``cloud_dir`` (catalog.db, store/, uploads/), as Settings lays it out."""
        from driveloop.cloud.catalog import Catalog
        from driveloop.cloud.store import ObjectStore

        root = Path(cloud_dir)
        catalog = Catalog(catalog_url or f"sqlite:///{(root / 'catalog.db').resolve()}")
        store = ObjectStore(store_url or str((root / "store").resolve()))
        return cls(store, catalog, vehicle_id, root / "uploads")

    def start(self, sha256: str, size: int, name: str) -> UploadStatus:
        with _as_client_errors():
            return self.service.begin(self.vehicle_id, sha256, size, name)

    def offset(self, upload_id: str) -> UploadStatus:
        with _as_client_errors():
            return self.service.status(self.vehicle_id, upload_id)

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus:
        with _as_client_errors():
            return self.service.append(self.vehicle_id, upload_id, offset, data, declared_length=len(data))

    def campaigns(self) -> list[dict[str, Any]]:
        return self.service.vehicle_campaigns()

    def close(self) -> None:
        self.service.catalog.close()


def make_transport(vehicle_id: str, cloud_dir: str | Path, cloud_url: str | None = None, token: str | None = None,
                   catalog_url: str | None = None, store_url: str | None = None) -> UploadTransport:
    """The transport settings ask for: the ingest server when ``cloud_url`` is set (needs the
    vehicle's ``token``), else the embedded local cloud in ``cloud_dir`` (no server to start)."""
    if cloud_url:
        if not token:
            raise ConfigError(f"cloud URL {cloud_url} is set but vehicle {vehicle_id} has no token "
                              "(driveloop cloud vehicles add ID prints one)")
        return HttpTransport(cloud_url, token)
    return LocalTransport.under(cloud_dir, vehicle_id, catalog_url=catalog_url, store_url=store_url)
