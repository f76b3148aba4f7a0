"""Drain a shared spool to the cloud: one uploader per vehicle, as the ingest side requires.

The caller hands in ``transport_for(vehicle_id)`` (the composition layer picks the ingest server or
the embedded local cloud: ``driveloop.wiring``), so the vehicle never imports the cloud. Event
segments go first (the uploader's queue order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driveloop.edge.spool import Spool
from driveloop.edge.transport import UploadTransport
from driveloop.edge.uploader import Uploader, UploadReport

logger = logging.getLogger(__name__)

SPOOL_QUOTA_BYTES = 2 * 2**30
DRAIN_BUDGET_S = 600.0


def upload_spool_dir(spool_dir: Path, state_dir: Path, transport_for: Callable[[str], UploadTransport],
                     quota_bytes: int = SPOOL_QUOTA_BYTES) -> dict[str, Any]:
    """Upload every closed segment in ``spool_dir``; returns counts for the CLI summary."""
    spool = Spool(spool_dir, quota_bytes)
    vehicles = sorted({e.vehicle for e in spool.closed_segments()})
    total = UploadReport()
    for vehicle in vehicles:
        transport = transport_for(vehicle)
        uploader = Uploader(spool, transport, state_dir / vehicle, vehicle_id=vehicle)
        try:
            total.merge(uploader.drain(DRAIN_BUDGET_S))
        finally:
            uploader.close()
            transport.close()
    logger.info("uploaded %d segments (%d bytes) from %d vehicles", len(total.uploaded), total.bytes_sent,
                len(vehicles))
    return {"vehicles": len(vehicles), "uploaded": len(total.uploaded), "rejected": len(total.rejected),
            "bytes_sent": total.bytes_sent, "pending": total.pending}

