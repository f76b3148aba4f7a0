"""Model registry commands: ``driveloop models list|show|lineage|verify``.

Read-only views of the registry under ``DRIVELOOP_HOME/registry``; every command takes ``--json``.
A REF is a version (``3`` or ``v3``), ``latest``, or a stage name meaning that stage's newest version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.core.exceptions import RegistryError

logger = logging.getLogger(__name__)

models_app = typer.Typer(help="Model registry: versions, stages, lineage.", no_args_is_help=True)
app.add_typer(models_app, name="models")

_JSON = typer.Option(False, "--json", help="Print one JSON object instead of a table.")


def _open_registry() -> Any:
    """The registry of this data directory; never creates one (a typo'd DRIVELOOP_HOME must not look empty)."""
    from driveloop.cloud.registry import Registry
    from driveloop.settings import load_settings

    root: Path = load_settings().registry_dir
    if not (root / "registry.db").is_file():
        raise RegistryError(f"no model registry at {root}: run `driveloop bootstrap` first")
    return Registry(root)


def _row(manifest: Any, stage: str) -> dict[str, Any]:
    return {
        "version": manifest.version, "name": manifest.name, "stage": stage, "parent_version": manifest.parent_version,
        "dataset_version": manifest.dataset_version, "sha256": manifest.sha256, "created_at": manifest.created_at,
        "metrics": manifest.metrics,
    }


def _table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*("-" if v is None else str(v) for v in r))
    Console().print(table)


@models_app.command("list")
def list_models(as_json: bool = _JSON) -> None:
    """Every registered version with its stage, oldest first."""
    with _open_registry() as reg:
        rows = [_row(m, stage) for m, stage in reg.list()]
    if as_json:
        typer.echo(dumps({"models": rows}))
        return
    _table("models", ["version", "name", "stage", "parent", "dataset", "sha256", "created"],
           [[r["version"], r["name"], r["stage"], r["parent_version"], r["dataset_version"], r["sha256"][:12],
             r["created_at"]] for r in rows])


@models_app.command("show")
def show(ref: str = typer.Argument(..., help="Version, 'latest' or a stage name."), as_json: bool = _JSON) -> None:
    """One version's manifest, stage, stage history and file locations."""
    with _open_registry() as reg:
        art = reg.get(ref)
        history = reg.history(art.version)
    out = {
        "stage": art.stage, "onnx_path": art.onnx_path, "manifest_path": art.manifest_path,
        "manifest": art.manifest.model_dump(),
        "history": [{"from": e.from_stage, "to": e.to_stage, "reason": e.reason, "at_s": e.at_s} for e in history],
    }
    if as_json:
        typer.echo(dumps(out))
        return
    m = art.manifest
    typer.echo(f"{m.name} v{m.version} [{art.stage}]  sha256 {m.sha256}")
    typer.echo(f"  parent: {m.parent_version or '-'}  dataset: {m.dataset_version or '-'}  created: {m.created_at}")
    typer.echo(f"  onnx: {art.onnx_path}")
    typer.echo(f"  metrics: {dumps(m.metrics)}")
    typer.echo(f"  training_run: {dumps(m.training_run)}")
    if m.lineage:
        typer.echo(f"  lineage: {dumps(m.lineage)}")
    for e in history:
        typer.echo(f"  {e.from_stage or '(new)'} -> {e.to_stage}: {e.reason}")


@models_app.command("lineage")
def lineage(ref: str = typer.Argument(..., help="Version, 'latest' or a stage name."), as_json: bool = _JSON) -> None:
    """The version, its parent, and so on back to the root model."""
    with _open_registry() as reg:
        version = reg.get(ref).version
        stages = {m.version: stage for m, stage in reg.list()}
        chain = [_row(m, stages[m.version]) | {"lineage": m.lineage, "training_run": m.training_run}
                 for m in reg.lineage(version)]
    if as_json:
        typer.echo(dumps({"version": version, "lineage": chain}))
        return
    _table(f"lineage of v{version}", ["version", "stage", "parent", "dataset", "created", "extra"],
           [[r["version"], r["stage"], r["parent_version"], r["dataset_version"], r["created_at"],
             dumps(r["lineage"]) if r["lineage"] else None] for r in chain])


@models_app.command("verify")
def verify(ref: str = typer.Argument(..., help="Version, 'latest' or a stage name."), as_json: bool = _JSON) -> None:
    """Re-hash a version's blob against its manifest (exit 4 when tampered or missing)."""
    with _open_registry() as reg:
        version = reg.get(ref).version
        sha = reg.verify(version)
    typer.echo(dumps({"version": version, "sha256": sha, "ok": True}) if as_json else f"v{version} ok ({sha})")


# --- cloud data loop: ingest server, vehicles, campaigns, segments (the backflow engineer's part) ---

cloud_app = typer.Typer(help="Cloud data loop", no_args_is_help=True)
app.add_typer(cloud_app, name="cloud")
vehicles_app = typer.Typer(help="Vehicles allowed to upload (per-vehicle tokens).", no_args_is_help=True)
campaigns_app = typer.Typer(help="Collection campaigns: create, approve, list.", no_args_is_help=True)
segments_app = typer.Typer(help="Cataloged segments.", no_args_is_help=True)
cloud_app.add_typer(vehicles_app, name="vehicles")
cloud_app.add_typer(campaigns_app, name="campaigns")
cloud_app.add_typer(segments_app, name="segments")


def _ingest_service() -> Any:
    """The cloud of this data directory (catalog + store from settings), as the server would run it."""
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.ingest import IngestConfig, IngestService
    from driveloop.cloud.store import ObjectStore
    from driveloop.settings import load_settings

    s = load_settings()
    config = IngestConfig(staging_dir=s.cloud_dir / "uploads")
    return IngestService(ObjectStore(s.resolved_store_url()), Catalog(s.resolved_catalog_url()), config)


@cloud_app.command("serve")
def cloud_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8750, help="TCP port.", min=1, max=65535),
    admin_token: str = typer.Option(None, envvar="DRIVELOOP_CLOUD_ADMIN_TOKEN", show_envvar=False,
                                    help="Enables the admin campaign API for this bearer token (named 'admin', "
                                         ">= 16 characters). More, named: DRIVELOOP_CLOUD_ADMIN_TOKENS=name:TOKEN,…"),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (PEM)."),
    tls_key: Path = typer.Option(None, "--tls-key", help="The certificate's private key (PEM)."),
) -> None:
    """Run the ingest server (resumable uploads, campaigns) over this data directory's cloud."""
    import os

    from sqlalchemy.engine import make_url

    from driveloop.cloud.ingest import build_app, serve
    from driveloop.core.tls import plaintext_warning, server_tls
    from driveloop.core.tokens import DEFAULT_ADMIN_NAME, parse_named_tokens
    from driveloop.settings import load_settings

    s = load_settings()
    tls = server_tls(tls_cert, tls_key)  # checked before anything starts
    admins = parse_named_tokens(os.environ.get("DRIVELOOP_CLOUD_ADMIN_TOKENS", ""))
    if admin_token:
        admins[DEFAULT_ADMIN_NAME] = admin_token
    from driveloop.core.logsetup import set_service_name

    set_service_name("ingest")  # <home>/logs/ingest.jsonl
    app_ = build_app(s.resolved_store_url(), s.resolved_catalog_url(), s.cloud_dir / "uploads", admin_tokens=admins)
    warning = plaintext_warning(host, bool(tls))
    if warning:
        typer.secho(warning, err=True, fg="red", bold=True)
    shown = make_url(s.resolved_catalog_url()).render_as_string(hide_password=True)  # never print a password
    typer.echo(f"driveloop ingest on {'https' if tls else 'http'}://{host}:{port} (catalog {shown})")
    serve(app_, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)


@vehicles_app.command("add")
def vehicles_add(vehicle_id: str = typer.Argument(..., help="Vehicle id, e.g. veh-0."), as_json: bool = _JSON) -> None:
    """Register a vehicle and print its upload token (shown once; only its hash is stored)."""
    import time

    from driveloop.cloud.auth import register_vehicle
    from driveloop.core.ids import check_vehicle_id

    check_vehicle_id(vehicle_id)  # before anything is created under the data directory
    svc = _ingest_service()
    token = register_vehicle(svc.catalog, vehicle_id, time.time())
    typer.echo(dumps({"vehicle": vehicle_id, "token": token}) if as_json else token)


def _set_vehicle(vehicle_id: str, action: str, as_json: bool) -> None:
    """disable / enable / rotate in the catalog the server reads on every request: effective on the
    vehicle's next request, no restart."""
    from driveloop.cloud.auth import rotate_token
    from driveloop.core.ids import check_vehicle_id

    check_vehicle_id(vehicle_id)
    catalog = _ingest_service().catalog
    token = rotate_token(catalog, vehicle_id) if action == "rotate" else None
    if action != "rotate":
        catalog.update_vehicle(vehicle_id, enabled=action == "enable")
    record = catalog.get_vehicle(vehicle_id)
    out = {"vehicle": vehicle_id, "enabled": bool(record and record.enabled), "token": token}
    if as_json:
        typer.echo(dumps(out))
    else:
        typer.echo(token if token else f"{vehicle_id}: {'enabled' if out['enabled'] else 'disabled'}")


@vehicles_app.command("disable")
def vehicles_disable(vehicle_id: str = typer.Argument(..., help="Vehicle id."), as_json: bool = _JSON) -> None:
    """Refuse the vehicle's uploads from its next request on (reversible with enable)."""
    _set_vehicle(vehicle_id, "disable", as_json)


@vehicles_app.command("enable")
def vehicles_enable(vehicle_id: str = typer.Argument(..., help="Vehicle id."), as_json: bool = _JSON) -> None:
    """Accept a disabled vehicle again (with its current token)."""
    _set_vehicle(vehicle_id, "enable", as_json)


@vehicles_app.command("rotate")
def vehicles_rotate(vehicle_id: str = typer.Argument(..., help="Vehicle id."), as_json: bool = _JSON) -> None:
    """Issue a new upload token (printed once); the old one stops working at once."""
    _set_vehicle(vehicle_id, "rotate", as_json)


@vehicles_app.command("list")
def vehicles_list(as_json: bool = _JSON) -> None:
    """Registered vehicles (tokens are never shown)."""
    rows = [{"vehicle": v.id, "enabled": v.enabled, "created_at_s": v.created_at_s} for v in _ingest_service().catalog.vehicles()]
    if as_json:
        typer.echo(dumps({"vehicles": rows}))
        return
    _table("vehicles", ["vehicle", "enabled", "created_at_s"], [list(r.values()) for r in rows])


@campaigns_app.command("create")
def campaigns_create(
    name: str = typer.Option(..., help="Campaign name (lowercase, digits, - and _)."),
    condition: str = typer.Option(..., help="Expression over signals, e.g. 'ttc < 1.5 or fallback'."),
    mode: str = typer.Option("rising_edge", help="always | rising_edge"),
    min_interval_s: float = typer.Option(5.0, help="Minimum seconds between two triggers."),
    pre_window_s: float = typer.Option(5.0, help="Seconds of data kept before a trigger."),
    post_window_s: float = typer.Option(5.0, help="Seconds of data kept after a trigger."),
    priority: int = typer.Option(3, help="1..9, higher uploads first."),
    expires_in_s: float = typer.Option(None, help="Expire this many seconds from now (default: never)."),
    as_json: bool = _JSON,
) -> None:
    """Create a campaign (state 'created'; vehicles get it once approved)."""
    import time

    spec: dict[str, Any] = {"name": name, "condition": condition, "trigger_mode": mode,
                            "min_interval_s": min_interval_s, "pre_window_s": pre_window_s,
                            "post_window_s": post_window_s, "priority": priority}
    if expires_in_s is not None:
        spec["expires_at_s"] = time.time() + expires_in_s
    created = _ingest_service().create_campaign(spec)
    typer.echo(dumps(created) if as_json else created["id"])


@campaigns_app.command("approve")
def campaigns_approve(campaign_id: str = typer.Argument(..., help="Campaign id (cmp-…)."), as_json: bool = _JSON) -> None:
    """Approve a created campaign: vehicles fetch it from now until it expires."""
    approved = _ingest_service().approve_campaign(campaign_id)
    typer.echo(dumps(approved) if as_json else f"{approved['id']} approved")


@campaigns_app.command("list")
def campaigns_list(as_json: bool = _JSON) -> None:
    """Every campaign with its state."""
    from driveloop.cloud.campaigns import to_wire

    rows = [to_wire(c) for c in _ingest_service().catalog.campaigns()]
    if as_json:
        typer.echo(dumps({"campaigns": rows}))
        return
    cols = ["id", "name", "state", "condition", "trigger_mode", "priority", "expires_at_s"]
    _table("campaigns", cols, [[r[c] for c in cols] for r in rows])


@segments_app.command("list")
def segments_list(
    vehicle: str = typer.Option(None, help="Only this vehicle."),
    scenario: str = typer.Option(None, help="Only this scenario."),
    event: str = typer.Option(None, help="Only segments with this event (e.g. fallback_activation)."),
    new: bool = typer.Option(False, "--new", help="Only segments no dataset has consumed yet."),
    as_json: bool = _JSON,
) -> None:
    """Cataloged segments, oldest first."""
    from driveloop.cloud.catalog import SegmentQuery

    query = SegmentQuery(vehicle=vehicle, scenario=scenario, event=event, unconsumed=True if new else None)
    rows = [r.to_json() for r in _ingest_service().catalog.segments(query)]
    if as_json:
        typer.echo(dumps({"segments": rows, "count": len(rows)}))
        return
    cols = ["sha256", "vehicle", "scenario", "start_s", "end_s", "n_ticks", "events", "consumed_by_dataset"]
    _table(f"segments ({len(rows)})", cols, [[str(r[c])[:16] if c == "sha256" else r[c] for c in cols] for r in rows])


@cloud_app.command("upload")
def cloud_upload(
    vehicle: str = typer.Option(..., help="Upload this vehicle's closed segments."),
    spool_dir: Path = typer.Option(None, help="Spool root (default: DRIVELOOP_HOME/spool)."),
    max_s: float = typer.Option(300.0, help="Stop after this many seconds, even if segments remain."),
    chunk_kib: int = typer.Option(256, help="Chunk size in KiB."),
    bandwidth_mbps: float = typer.Option(None, help="Bandwidth cap in megabit/s (default: none)."),
    as_json: bool = _JSON,
) -> None:
    """Upload a vehicle's spool to the configured cloud (DRIVELOOP_CLOUD_URL + token, else the
    embedded local cloud); exit 6 when segments are still pending at the end."""
    from driveloop.edge.spool import Spool
    from driveloop.wiring import transport_for
    from driveloop.edge.uploader import Uploader
    from driveloop.core.exceptions import ConfigError
    from driveloop.core.ids import check_vehicle_id
    from driveloop.settings import load_settings

    vehicle = check_vehicle_id(vehicle)  # names the uploader's state folder below
    s = load_settings()
    root = spool_dir or s.spool_dir
    if not (root / "closed").is_dir():
        raise ConfigError(f"no spool at {root} (nothing recorded yet?)")
    transport = transport_for(s)(vehicle)
    bps = None if bandwidth_mbps is None else bandwidth_mbps * 1e6
    try:
        with Uploader(Spool(root, quota_bytes=2**62), transport, s.home / "uploader" / vehicle,
                      chunk_bytes=chunk_kib * 1024, bandwidth_bps=bps, vehicle_id=vehicle) as up:
            report = up.drain(max_s)
    finally:
        transport.close()
    out = {"vehicle": vehicle, "uploaded": len(report.uploaded), "sha256": report.uploaded,
           "rejected": report.rejected, "failures": report.failures, "pending": report.pending,
           "bytes_sent": report.bytes_sent}
    if as_json:
        typer.echo(dumps(out))
    else:
        typer.echo(f"{vehicle}: uploaded {out['uploaded']}, rejected {len(report.rejected)}, "
                   f"pending {report.pending}, {report.bytes_sent} bytes sent, {report.failures} retries")
    if report.pending:
        raise typer.Exit(6)


uploads_app = typer.Typer(help="Uploads in flight on the ingest side.", no_args_is_help=True)
cloud_app.add_typer(uploads_app, name="uploads")


@uploads_app.command("list")
def uploads_list(state: str = typer.Option(None, help="open | done | failed"), as_json: bool = _JSON) -> None:
    """Uploads with their offsets and states."""
    from dataclasses import asdict

    rows = [asdict(u) for u in _ingest_service().catalog.uploads(state)]
    if as_json:
        typer.echo(dumps({"uploads": rows}))
        return
    cols = ["id", "vehicle", "name", "size", "offset", "state", "error"]
    _table(f"uploads ({len(rows)})", cols, [[r[c] for c in cols] for r in rows])


@uploads_app.command("expire")
def uploads_expire(older_than_s: float = typer.Option(7 * 86400.0, help="Idle time after which an open upload is dropped."),
                   as_json: bool = _JSON) -> None:
    """Drop open uploads (and their partial bytes) idle for longer than --older-than-s."""
    expired = _ingest_service().expire_uploads(older_than_s)
    typer.echo(dumps({"expired": expired}) if as_json else f"expired {len(expired)} uploads")
