"""The embedded local cloud as an upload transport, and the choice between it and the ingest server.

:class:`LocalTransport` calls the very same ``IngestService`` the HTTP server runs, in-process, so a
segment is verified, validated, stored and cataloged the same way whichever path it takes. The vehicle
side (``edge.transport``) owns the ``UploadTransport`` Protocol; this module implements it above the
vehicle, and :func:`make_transport` is what the CLI and the demo hand to the vehicle's uploader.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from driveloop.cloud.catalog import Catalog
from driveloop.cloud.ingest_service import IngestConfig, IngestService
from driveloop.cloud.quotas import QuotaConfig
from driveloop.cloud.store import ObjectStore
from driveloop.contracts.upload import UploadStatus
from driveloop.core.exceptions import (
    AuthError,
    ConfigError,
    SegmentError,
    StorageError,
    UploadError,
    UploadRejectedError,
)
from driveloop.edge.transport import HttpTransport, UploadTransport


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
    ``vehicle_id`` (registered on first use — the local cloud trusts its own vehicles, so no quotas)."""

    def __init__(self, store: ObjectStore, catalog: Catalog, vehicle_id: str, staging_dir: str | Path) -> None:
        config = IngestConfig(staging_dir=Path(staging_dir), quotas=QuotaConfig.unlimited())
        self.service: IngestService = IngestService(store, catalog, config)
        self.vehicle_id = self.service.ensure_local_vehicle(vehicle_id)

    @classmethod
    def under(cls, cloud_dir: str | Path, vehicle_id: str, catalog_url: str | None = None,
              store_url: str | None = None) -> LocalTransport:
        """The local cloud in ``cloud_dir`` (catalog.db, store/, uploads/), as Settings lays it out."""
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
                   catalog_url: str | None = None, store_url: str | None = None,
                   ca_file: str | Path | None = None) -> UploadTransport:
    """The transport settings ask for: the ingest server when ``cloud_url`` is set (needs the
    vehicle's ``token``; HTTPS verified against ``ca_file`` when given), else the embedded local cloud
    in ``cloud_dir`` (no server to start)."""
    if cloud_url:
        if not token:
            raise ConfigError(f"cloud URL {cloud_url} is set but vehicle {vehicle_id} has no token "
                              "(driveloop cloud vehicles add ID prints one)")
        return HttpTransport(cloud_url, token, ca_file=ca_file)
    return LocalTransport.under(cloud_dir, vehicle_id, catalog_url=catalog_url, store_url=store_url)
