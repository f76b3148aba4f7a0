"""Composition for ``driveloop drive --hazards on``: broker, hazard service and one stream per vehicle; and for
the vehicles' logs over those streams (``--hazards on``, or ``DRIVELOOP_NATS_URL``) with the LOGS consumer.

Without ``DRIVELOOP_NATS_URL`` the drive starts the embedded nats-server under ``<home>/nats`` (each vehicle
gets its own credentials, the hazard service a service user) and stops it at the end, by its pid; with it,
vehicles and the service connect to that cluster as ``DRIVELOOP_NATS_USER``/``DRIVELOOP_NATS_PASSWORD``. The
hazard service (signing key under ``<home>/cloud/hazards``) runs for the drive's duration either way, and the
vehicles trust its public key. Everything started here is stopped here, in reverse order, whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

FLUSH_S = 5.0  # at the end, how long vehicles may take to get their last messages acked (then they spool)
SERVICE_USER = "hazards"
LOG_SERVICE_USER = "logs"  # the LOGS consumer's broker user (embedded broker)


def _embedded_running(nats_dir: Any) -> bool:
    """Is ``driveloop stream serve`` running on this home (its server.json names a live process)?"""
    try:
        pid = int(json.loads((nats_dir / "server.json").read_text())["pid"])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class HazardLink:
    """What a drive with a data plane holds: the streams, and the hazard path (``--hazards on``) and the log
    path (logs shipped over the stream) when each is up."""

    plane: Any  # edge.dataplane.StreamDataPlane, or None without hazards
    service: Any  # cloud.hazard_service.HazardService, or None without hazards
    streams: dict[str, Any]
    logs: Any = None  # _vehicle_logs.StreamLogLink, or None when logs do not travel on the stream

    def finish(self) -> dict[str, Any]:
        """Ship and index the last log lines, flush every vehicle's stream, then report: the plane's summary
        plus the service's counts, and the log path's."""
        out: dict[str, Any] = {}
        if self.logs is not None:
            out["log_stream"] = self.logs.finish()
        for stream in self.streams.values():
            if not stream.flush(FLUSH_S):
                logger.info("%s: %s messages not acked at the end, kept in its spool", stream.vehicle_id,
                            stream.stats().get("pending"))
        if self.plane is not None:
            out.update(self.plane.summary(), hazard_service=self.service.stats())
        return out


@contextmanager
def hazard_data_plane(settings: Any, vehicle_ids: Sequence[str], model_version: str | None,
                      full_decel_mps2: float, log_spools: Any = None) -> Iterator[HazardLink]:
    """A :class:`HazardLink` (data plane, service, streams) for these vehicles, live until the block ends;
    with ``log_spools`` (``_vehicle_logs.vehicle_log_spools``'s handler) their lines ship over the streams."""
    with drive_data_plane(settings, vehicle_ids, model_version, full_decel_mps2, True, log_spools) as link:
        assert link is not None
        yield link


@contextmanager
def drive_data_plane(settings: Any, vehicle_ids: Sequence[str], model_version: str | None, full_decel_mps2: float,
                     hazards: bool, log_spools: Any = None) -> Iterator[HazardLink | None]:
    """The drive's data plane: with ``hazards``, broker + hazard service + streams; with ``log_spools`` and
    either ``hazards`` or ``DRIVELOOP_NATS_URL``, the vehicles' log lines ship over the streams and the LOGS
    consumer indexes them. None when neither applies (no broker is started)."""
    ship_logs = log_spools is not None and (hazards or bool(settings.nats_url))
    if not hazards and not ship_logs:
        yield None
        return
    from driveloop._vehicle_logs import stream_log_shipping
    from driveloop.cloud.broker import Credentials, EmbeddedBroker
    from driveloop.cloud.hazard_service import HazardService, hazard_dir
    from driveloop.contracts.hazard import HazardVerifier
    from driveloop.edge.dataplane import StreamDataPlane
    from driveloop.core.heap import frozen_heap
    from driveloop.edge.stream_client import StreamLoop, VehicleStream

    with ExitStack() as stack:
        if settings.nats_url:
            url = settings.nats_url
            user, password = os.environ.get("DRIVELOOP_NATS_USER"), os.environ.get("DRIVELOOP_NATS_PASSWORD")
            services = {SERVICE_USER: (user, password), LOG_SERVICE_USER: (user, password)}
            vehicle_creds = {vid: (user, password) for vid in vehicle_ids}
        else:
            nats_dir = settings.nats_dir
            if _embedded_running(nats_dir):
                raise ConfigError(f"an embedded broker already serves {nats_dir} (driveloop stream serve): "
                                  "set DRIVELOOP_NATS_URL to its URL")
            nats_dir.mkdir(parents=True, exist_ok=True)
            creds = Credentials(nats_dir)
            passwords = creds.issue_vehicles(vehicle_ids)
            services = {name: (f"svc-{name}", creds.issue_service(name)) for name in (SERVICE_USER, LOG_SERVICE_USER)}
            creds.save()
            broker = stack.enter_context(EmbeddedBroker.embedded(nats_dir, creds.users))
            url = broker.url
            vehicle_creds = {vid: (vid, pw) for vid, pw in passwords.items()}
            logger.info("embedded broker %s (pid %s) for the drive", url, broker.pid)
        service = plane = None
        if hazards:
            service = stack.enter_context(HazardService(url, hazard_dir(settings.cloud_dir), *services[SERVICE_USER]))
        loop = StreamLoop("drive-stream")
        stack.callback(loop.close)
        streams = {}
        for vid in vehicle_ids:
            vuser, vpassword = vehicle_creds[vid]
            stream = VehicleStream(vid, url, settings.home / "stream", user=vuser, password=vpassword, loop=loop)
            streams[vid] = stream
            stack.callback(stream.close)
        if service is not None:
            verifier = HazardVerifier([service.signer.public_bytes()])
            plane = StreamDataPlane(streams, verifier, model_version, full_decel_mps2=full_decel_mps2)
        logs = None
        if ship_logs:
            logs = stack.enter_context(stream_log_shipping(settings, log_spools, streams, url,
                                                           *services[LOG_SERVICE_USER]))
        if plane is not None:  # the fleet's connections and the service live as long as the drive: a full
            stack.enter_context(frozen_heap())  # collection walking them would stall hazard delivery (core.heap)
        yield HazardLink(plane, service, streams, logs)
