"""Composition of the layers for the CLI and the demo: the settings pick the implementations.

Lower layers own the interfaces (the vehicle's ``UploadTransport``); this module, in the top layer,
is where a vehicle is handed the ingest server over HTTP (``DRIVELOOP_CLOUD_URL`` + token) or the
embedded local cloud under the data directory (no server to start).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driveloop.edge.transport import UploadTransport
from driveloop.settings import Settings

if TYPE_CHECKING:
    from driveloop.edge.runtime import ModelRuntime


def transport_for(settings: Settings) -> Callable[[str], UploadTransport]:
    """``vehicle_id -> transport`` as the settings configure the cloud."""
    from driveloop.cloud.local_transport import make_transport

    def make(vehicle_id: str) -> UploadTransport:
        return make_transport(vehicle_id, settings.cloud_dir, settings.cloud_url, settings.cloud_token,
                              settings.catalog_url, settings.store_url, ca_file=settings.ca_file)

    return make


def upload_spool(settings: Settings) -> dict[str, Any]:
    """Drain the shared spool to the configured cloud; counts for the CLI summary."""
    from driveloop.edge.upload_job import upload_spool_dir

    return upload_spool_dir(settings.spool_dir, settings.home / "uploader", transport_for(settings))


def fetch_campaigns(settings: Settings, vehicle_id: str) -> list[Any]:
    """The configured cloud's approved campaigns, as recorder triggers."""
    from driveloop.edge.drive import fetch_campaigns as fetch

    return fetch(transport_for(settings)(vehicle_id))


def load_runtime(registry_root: Path | str, ref: int | str = "released", device: str = "auto") -> ModelRuntime:
    """Open the registry at ``registry_root`` and load ``ref`` (version, 'latest' or a stage), verified."""
    from driveloop.cloud.registry import Registry
    from driveloop.edge.runtime import ModelRuntime

    with Registry(registry_root) as reg:
        artifact = reg.get(ref)
    return ModelRuntime(artifact.onnx_path, artifact.manifest, device=device)
