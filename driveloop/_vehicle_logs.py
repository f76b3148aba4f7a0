"""Composition of the log path for the CLI and the demo: vehicles' log spools under the data
directory, shipped to the cloud the settings name, and the cloud's log index.

- ``<home>/logspool/<vehicle>.db``: each simulated vehicle's spool (``edge/logspool.py``), fed while a
  drive runs (:func:`vehicle_log_spools`);
- shipping (:func:`ship_vehicle_logs`): over HTTPS to the ingest server when ``DRIVELOOP_CLOUD_URL`` is
  set (a vehicle token speaks only for its own vehicle: other vehicles' spools wait for their own
  token), else into the embedded local cloud's index, through the same ``LogIngest`` the server runs;
- the index (:func:`open_log_index`): beside the catalog (``<home>/cloud/logs.db``, or the catalog's
  PostgreSQL database).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from driveloop.core.ids import is_vehicle_id
from driveloop.settings import Settings

__all__ = ["spool_root", "vehicle_log_spools", "ship_vehicle_logs", "open_log_index", "log_sink_for",
           "log_search_for"]

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
