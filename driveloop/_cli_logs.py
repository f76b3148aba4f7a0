"""Log and trace commands: ``driveloop logs search|prune|ship|consume`` and ``driveloop trace segment``.

``logs search QUERY`` reads the cloud's log index beside the catalog (SQLite FTS5 file, or the
catalog's PostgreSQL database): ``aeb OR fcw OR watchdog``, ``"model call" NOT hang``; ``--vehicle``,
``--since`` (ISO time, Unix seconds, or an age such as ``30m``, ``2h``, ``7d``), ``--level`` (at least),
``--rollout``, ``--action``, ``--trace``. ``trace segment SHA256`` follows one recorded segment to the
models that learned from it and their rollouts (``driveloop/trace.py``).
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError, StreamError

logger = logging.getLogger(__name__)

logs_app = typer.Typer(help="Structured logs of vehicles and servers: search, retention, shipping.",
                       no_args_is_help=True)
app.add_typer(logs_app, name="logs")
trace_app = typer.Typer(help="Follow things through the loop.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")

_JSON = typer.Option(False, "--json", help="Print one JSON object instead of text.")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now_s: float) -> float:
    """``--since``: an age (``30m``, ``2h``, ``7d``), Unix seconds, or an ISO-8601 time (UTC when no zone)."""
    t = text.strip()
    m = _AGE.match(t)
    if m:
        return now_s - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if value >= 0 and value == value and value != float("inf"):
            return value
    try:
        ts = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"--since must be an age (30m, 2h, 7d), Unix seconds or an ISO time, got {text!r}") from e
    if ts.tzinfo is None:
        from datetime import UTC

        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


def _render(line: dict[str, Any]) -> str:
    where = " ".join(f"{k}={line[k]}" for k in ("vehicle.id", "model.version", "rollout.id", "fl.round", "trace.id")
                     if k in line)
    action = f"[{line['event.action']}] " if "event.action" in line else ""
    return (f"{line.get('@timestamp', '?')} {line.get('log.level', '?').upper():8} {line.get('service.name', '?')}: "
            f"{action}{line.get('message', '')}" + (f"  ({where})" if where else ""))


@logs_app.command("search")
def search(
    query: str = typer.Argument("", help="Words to find (FTS syntax: aeb OR fcw, \"exact words\", NOT x)."),
    vehicle: str | None = typer.Option(None, "--vehicle", help="Only this vehicle's lines."),
    since: str | None = typer.Option(None, "--since", help="From this time: 30m, 2h, 7d, Unix s or ISO time."),
    level: str | None = typer.Option(None, "--level", help="At least this level: debug|info|warning|error|critical."),
    rollout: int | None = typer.Option(None, "--rollout", min=1, help="Only lines of this rollout."),
    action: str | None = typer.Option(None, "--action", help="Only this event.action (aeb, fcw, watchdog…)."),
    trace: str | None = typer.Option(None, "--trace", help="Only lines of this trace id."),
    limit: int = typer.Option(100, "--limit", min=1, max=10_000),
    as_json: bool = _JSON,
) -> None:
    """Search the cloud's log index, newest first."""
    from driveloop._vehicle_logs import open_log_index
    from driveloop.cloud.logindex import LogQuery
    from driveloop.settings import load_settings

    q = LogQuery(text=query, vehicle=vehicle, since_s=None if since is None else parse_since(since, time.time()),
                 level=None if level is None else level.lower(), rollout_id=rollout, action=action,
                 trace_id=trace, limit=limit)
    with open_log_index(load_settings()) as index:
        lines = index.search(q)
    if as_json:
        typer.echo(dumps({"query": query, "count": len(lines), "lines": lines}))
        return
    for line in reversed(lines):  # oldest first on a terminal, like a log
        typer.echo(_render(line))
    typer.echo(f"{len(lines)} line(s)", err=True)


@logs_app.command("prune")
def prune(
    days: float = typer.Option(14.0, "--days", min=0.001, help="Keep lines received in the last DAYS days."),
    as_json: bool = _JSON,
) -> None:
    """Apply the retention now: delete lines received more than DAYS days ago."""
    from driveloop.cloud.logindex import LogIndex
    from driveloop.settings import load_settings

    with LogIndex.beside(load_settings().resolved_catalog_url(), retention_s=days * 86400.0) as index:
        removed = index.prune()
        left = index.count()
    if as_json:
        typer.echo(dumps({"removed": removed, "kept": left}))
    else:
        typer.echo(f"removed {removed} line(s), {left} kept")


@logs_app.command("ship")
def ship(as_json: bool = _JSON) -> None:
    """Send the vehicles' spooled log lines to the configured cloud (what `drive` does after driving)."""
    from driveloop._vehicle_logs import ship_vehicle_logs
    from driveloop.settings import load_settings

    totals = ship_vehicle_logs(load_settings())
    if as_json:
        typer.echo(dumps(totals))
        return
    typer.echo(f"{totals['accepted']} line(s) stored, {totals['duplicates']} already there, {totals['rejected']} "
               f"refused; {totals['pending']} waiting, {totals['evicted']} evicted in {totals['vehicles']} spool(s)")
    for vehicle, err in totals["errors"].items():
        typer.echo(f"  {vehicle}: {err}", err=True)


@logs_app.command("consume")
def consume(
    once: bool = typer.Option(False, "--once", help="Index what the LOGS stream holds now, then exit."),
    as_json: bool = _JSON,
) -> None:
    """Run the LOGS stream consumer: vehicles' log batches from the broker into the index (Ctrl-C/SIGTERM stops).

    The broker is DRIVELOOP_NATS_URL (as DRIVELOOP_NATS_USER) or the embedded one `driveloop stream serve` runs.
    """
    import signal
    import threading

    from driveloop._cli_stream import _broker
    from driveloop._vehicle_logs import open_log_index
    from driveloop.cloud.log_stream import LogStreamService
    from driveloop.settings import load_settings

    settings = load_settings()
    stop = threading.Event()
    if not once:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with _broker(settings) as (url, user, password), open_log_index(settings) as index, \
            LogStreamService(url, index, user, password) as service:
        if once:
            if not service.drain(60.0):
                raise StreamError("the LOGS consumer did not catch up within 60 s (see `driveloop stream status`)")
        else:
            logger.info("consuming LOGS from %s", url)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
        stats = service.stats()
    if as_json:
        typer.echo(dumps(stats))
    else:
        typer.echo(f"{stats['indexed']} line(s) indexed, {stats['duplicates']} already there, "
                   f"{stats['rejected_lines']} refused; {sum(stats['dropped_batches'].values())} batch(es) dropped")


@trace_app.command("segment")
def trace_segment(
    sha256: str = typer.Argument(..., help="The segment's sha256 (64 hex digits; a unique prefix of 8+ works)."),
    as_json: bool = _JSON,
) -> None:
    """A segment's path: recording → upload → dataset version → fine-tune → model version → rollout."""
    from driveloop.settings import load_settings
    from driveloop.trace import render_trace, trace_segment as follow

    result = follow(load_settings(), sha256)
    if as_json:
        typer.echo(dumps(result))
    else:
        typer.echo(render_trace(result))
