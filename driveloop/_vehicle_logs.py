"""Composition of the log path for the CLI and the demo: vehicles' log spools under the data
directory, shipped to the cloud the settings name, and the cloud's log index.

- ``<home>/logspool/<vehicle>.db``: each simulated vehicle's spool (``edge/logspool.py``), fed while a
  drive runs (:func:`vehicle_log_spools`);
- shipping (:func:`ship_vehicle_logs`): over HTTPS to the ingest server when ``DRIVELOOP_CLOUD_URL`` is
  set (a vehicle token speaks only for its own vehicle: other vehicles' spools wait for their own
  token), else into the embedded local cloud's index, through the same ``LogIngest`` the server runs;
- the index (:func:`open_log_index`): beside the catalog (``<home>/cloud/logs.db``, or the catalog's
  PostgreSQL database);
- while a drive has a data plane (``--hazards on``, or ``DRIVELOOP_NATS_URL``), the spools ship through the
  vehicles' streams as the drive runs (:func:`stream_log_shipping`), and the LOGS consumer feeds the index;
  whatever is left at the end (the broker away) follows over HTTPS / into the local cloud afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driveloop.core.ids import is_vehicle_id
from driveloop.settings import Settings

__all__ = ["spool_root", "vehicle_log_spools", "ship_vehicle_logs", "open_log_index", "log_sink_for",
           "log_search_for", "stream_log_shipping", "StreamLogLink"]

LOG_FLUSH_S = 10.0  # at a drive's end: time for the last batches to be acked, then for the consumer to index them

logger = logging.getLogger(__name__)


def spool_root(settings: Settings) -> Path:
    return Path(settings.home) / "logspool"


@contextmanager
def vehicle_log_spools(settings: Settings, level: int = logging.INFO) -> Iterator[Any]:
    """While inside, every line logged in a vehicle's context also goes to that vehicle's spool."""
    from driveloop.edge.logspool import VehicleLogHandler

    handler = VehicleLogHandler(spool_root(settings), service="vehicle", level=level)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        previous, root.level = root.level, level
    else:
        previous = None
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
        if previous is not None:
            root.setLevel(previous)


def open_log_index(settings: Settings) -> Any:
    from driveloop.cloud.logindex import LogIndex

    return LogIndex.beside(settings.resolved_catalog_url())


def log_search_for(settings: Settings) -> Any:
    """The log index as the fleet server's dashboard reads it (``ota.server.LogSearch``)."""
    from driveloop.cloud.logindex import LogQuery

    index = open_log_index(settings)

    def search(text: str, vehicle: str | None, level: str | None, rollout_id: int | None,
               limit: int) -> list[dict[str, Any]]:
        return index.search(LogQuery(text=text, vehicle=vehicle, level=level, rollout_id=rollout_id, limit=limit))

    return search


def log_sink_for(settings: Settings, vehicle_id: str, index: Any = None) -> Any:
    """The sink for ``vehicle_id``'s lines, or None when the configured cloud holds no token for it."""
    if settings.cloud_url:
        from driveloop.edge.logship import HttpLogSink

        token = settings.cloud_token or ""
        if token.rpartition(".")[0] != vehicle_id:
            return None
        return HttpLogSink(settings.cloud_url, token, ca_file=settings.ca_file)
    from driveloop.cloud.log_ingest import LocalLogSink, LogIngest

    return LocalLogSink(LogIngest(index if index is not None else open_log_index(settings)))


def ship_vehicle_logs(settings: Settings) -> dict[str, Any]:
    """Drain every vehicle spool under the data directory; the totals for the command's summary."""
    from driveloop.edge.logship import LogShipper
    from driveloop.edge.logspool import LogSpool

    root = spool_root(settings)
    totals: dict[str, Any] = {"vehicles": 0, "sent": 0, "accepted": 0, "duplicates": 0, "rejected": 0,
                              "pending": 0, "evicted": 0, "errors": {}}
    paths = sorted(p for p in root.glob("*.db") if is_vehicle_id(p.stem)) if root.is_dir() else []
    if not paths:
        return totals
    index = None if settings.cloud_url else open_log_index(settings)
    try:
        for path in paths:
            vehicle = path.stem
            spool = LogSpool(path)
            try:
                sink = log_sink_for(settings, vehicle, index)
                if sink is None:
                    totals["errors"][vehicle] = "no cloud token for this vehicle: its lines stay in its spool"
                else:
                    try:
                        result = LogShipper(vehicle, spool, sink).ship()
                    finally:
                        if settings.cloud_url:
                            sink.close()
                    for key in ("sent", "accepted", "duplicates", "rejected"):
                        totals[key] += getattr(result, key)
                    if result.error is not None:
                        totals["errors"][vehicle] = result.error
                st = spool.stats()
                totals["pending"] += st.lines
                totals["evicted"] += st.evicted_total
                totals["vehicles"] += 1
            finally:
                spool.close()
    finally:
        if index is not None:
            index.close()
    return totals


@dataclass
class StreamLogLink:
    """A drive's log path over the stream: each vehicle's shipper (pumped while it drives) and the LOGS
    consumer feeding the index."""

    shippers: Mapping[str, Any]  # vehicle -> edge.logstream.StreamLogShipper
    pump: Any  # edge.logstream.StreamLogPump
    service: Any  # cloud.log_stream.LogStreamService

    def finish(self, timeout_s: float = LOG_FLUSH_S) -> dict[str, Any]:
        """Ship what the spools still hold, wait for the consumer to index it; the summary of both ends."""
        self.pump.stop()
        totals = self.pump.totals
        deadline = time.monotonic() + timeout_s
        waiting = dict(self.shippers)
        errors: dict[str, str] = {}
        while waiting:
            for vid, shipper in list(waiting.items()):
                step = shipper.pump()
                for key in ("batches", "sent", "accepted", "duplicates", "rejected"):
                    setattr(totals, key, getattr(totals, key) + getattr(step, key))
                if step.error and step.rejected:
                    errors[vid] = step.error
                if not shipper.in_flight() and not shipper.spool.pending(1):
                    del waiting[vid]
            if waiting and time.monotonic() >= deadline:
                for vid, shipper in waiting.items():
                    errors[vid] = (f"{shipper.spool.stats().lines} line(s) not acknowledged by the broker within "
                                   f"{timeout_s:g} s: kept in the spool")
                break
            time.sleep(0.01)
        indexed = self.service.drain(max(1.0, deadline - time.monotonic()))
        shipped = totals.to_dict()
        shipped.pop("error")
        return {"shipped": shipped, "errors": errors, "all_indexed": indexed, "consumer": self.service.stats()}


@contextmanager
def stream_log_shipping(settings: Settings, handler: Any, streams: Mapping[str, Any], url: str, user: str | None,
                        password: str | None) -> Iterator[StreamLogLink]:
    """Ship ``handler``'s spools (``vehicle_log_spools``) through ``streams`` (vehicle -> VehicleStream) while
    the block runs, with the LOGS consumer (as ``user``) indexing them beside the catalog."""
    from driveloop.cloud.log_stream import LogStreamService
    from driveloop.edge.logstream import StreamLogPump, StreamLogShipper

    with ExitStack() as stack:
        index = open_log_index(settings)
        stack.callback(index.close)
        service = stack.enter_context(LogStreamService(url, index, user, password))
        shippers = {}
        for vid, stream in streams.items():
            with handler.lock:  # the handler opens spools lazily from logging's threads, under this lock
                spool = handler.spool(vid)
            shippers[vid] = StreamLogShipper(vid, spool, stream)
        pump = StreamLogPump(list(shippers.values())).start()
        stack.callback(pump.stop)
        yield StreamLogLink(shippers, pump, service)
