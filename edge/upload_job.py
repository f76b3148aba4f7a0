"""Drain a shared spool to the cloud: one uploader per vehicle, as the ingest side requires.

With no cloud URL configured the transport is the embedded local cloud under the data directory
(no server to start); with one, each vehicle needs its token (``DRIVELOOP_CLOUD_TOKEN`` serves a
single-vehicle setup). Event segments go first (the uploader's queue order).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from driveloop.edge.spool import Spool
from driveloop.edge.transport import make_transport
from driveloop.edge.uploader import Uploader, UploadReport

logger = logging.getLogger(__name__)

SPOOL_QUOTA_BYTES = 2 * 2**30
DRAIN_BUDGET_S = 600.0


def upload_spool_dir(spool_dir: Path, cloud_dir: Path, state_dir: Path, cloud_url: str | None = None,
                     token: str | None = None, catalog_url: str | None = None, store_url: str | None = None,
                     quota_bytes: int = SPOOL_QUOTA_BYTES) -> dict[str, Any]:
    """Upload every closed segment in ``spool_dir``; returns counts for the CLI summary."""
    spool = Spool(spool_dir, quota_bytes)
    vehicles = sorted({e.vehicle for e in spool.closed_segments()})
    total = UploadReport()
    for vehicle in vehicles:
        transport = make_transport(vehicle, cloud_dir, cloud_url, token, catalog_url, store_url)
        uploader = Uploader(spool, transport, state_dir / vehicle, vehicle_id=vehicle)
        try:
            total.merge(uploader.drain(DRAIN_BUDGET_S))
        finally:
            uploader.close()
            close = getattr(transport, "close", None)
            if close is not None:
                close()
    logger.info("uploaded %d segments (%d bytes) from %d vehicles", len(total.uploaded), total.bytes_sent,
                len(vehicles))
    return {"vehicles": len(vehicles), "uploaded": len(total.uploaded), "rejected": len(total.rejected),
            "bytes_sent": total.bytes_sent, "pending": total.pending}


def upload_spool(settings: Any) -> dict[str, Any]:
    """``upload_spool_dir`` with the paths and URLs of the settings."""
    return upload_spool_dir(settings.spool_dir, settings.cloud_dir, settings.home / "uploader", settings.cloud_url,
                            settings.cloud_token, settings.catalog_url, settings.store_url)
