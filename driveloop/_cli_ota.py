"""``driveloop ota …``: staged OTA — rollouts, the fleet server, the fleet simulation, Grafana.

The release engineer registers ``release`` and ``keys`` on :data:`ota_app` from their own module.
``ota rollout …`` and ``ota vehicles …`` talk to the fleet server over HTTP(S) when ``DRIVELOOP_OTA_URL``
is set (admin token from ``DRIVELOOP_OTA_ADMIN_TOKEN``; HTTPS verified against ``DRIVELOOP_CA_FILE``
when set; plain HTTP only to loopback), otherwise directly to the local store under ``<home>/ota``, as
``local:<user>`` in the audit. ``ota serve`` takes named admin tokens from ``DRIVELOOP_OTA_ADMIN_TOKENS``
(``alice:TOKEN,ci:TOKEN``) besides the one named ``admin``.
Heavy imports (fastapi, uvicorn, sqlalchemy, grafana) happen inside the commands.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import typer

from driveloop.core.atomic import write_atomic
from driveloop.cli import app
from driveloop.core.exceptions import ConfigError, OtaError

ota_app = typer.Typer(help="Staged OTA: releases, rollouts, fleet server", no_args_is_help=True)
rollout_app = typer.Typer(help="Start, watch and steer a staged rollout.", no_args_is_help=True)
vehicles_app = typer.Typer(help="Enrolled vehicles: list, disable, enable, rotate tokens.", no_args_is_help=True)
ota_app.add_typer(rollout_app, name="rollout")
ota_app.add_typer(vehicles_app, name="vehicles")
app.add_typer(ota_app, name="ota")

ADMIN_TOKEN_ENV = "DRIVELOOP_OTA_ADMIN_TOKEN"
ADMIN_TOKENS_ENV = "DRIVELOOP_OTA_ADMIN_TOKENS"


def _admin_token(ota_dir: Path, create: bool) -> str:
    """The admin token: from the environment, else ``<home>/ota/admin_token`` (created 0600 on serve)."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        return token
    path = ota_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise ConfigError(f"no admin token: set {ADMIN_TOKEN_ENV} or run `driveloop ota serve` once")
    token = secrets.token_urlsafe(24)
    write_atomic(path, (token + "\n").encode(), mode=0o600)
    typer.echo(f"admin token written to {path}", err=True)
    return token


def _emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for k, v in data.items():
        if not isinstance(v, (dict, list)):
            typer.echo(f"{k:>24}: {v}")


def _request(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call the fleet server named by DRIVELOOP_OTA_URL with the admin token."""
    import httpx

    from driveloop.core.tls import client_verify
    from driveloop.core.tokens import check_token_url
    from driveloop.settings import load_settings

    s = load_settings()
    url = check_token_url((s.ota_url or "").rstrip("/"))
    headers = {"Authorization": f"Bearer {_admin_token(s.ota_dir, create=False)}"}
    try:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=30.0, verify=client_verify(s.ca_file))
    except httpx.HTTPError as e:
        raise OtaError(f"cannot reach the fleet server at {url}: {e}") from e
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text[:200]}
    if r.status_code >= 400:
        raise OtaError(f"fleet server refused ({r.status_code}): {data.get('error', data)}")
    return data


def _local_service() -> Any:
    import time

    from driveloop.ota.server import FleetService, released_versions
    from driveloop.settings import load_settings

    s = load_settings()
    return FleetService(_fleet_store(s), time.time, 60.0,
                        released=lambda: released_versions(s.ota_dir / "repo"))


def _fleet_store(s: Any) -> Any:
    """The fleet store the settings name: ``DRIVELOOP_FLEET_DB_URL`` (shared by server replicas), else
    the SQLite file under the data directory."""
    from driveloop.ota.store import FleetStore

    return FleetStore(s.fleet_db_url) if s.fleet_db_url else FleetStore.at(s.ota_dir)


def _local_actor() -> str:
    """Who acts through the CLI on the local store (no token involved: whoever can write the file)."""
    return f"local:{os.environ.get('USER') or 'cli'}"[:64]


def _remote() -> bool:
    from driveloop.settings import load_settings

    return bool(load_settings().ota_url)


def _latest_id(rollout_id: int | None) -> int:
    if rollout_id is not None:
        return rollout_id
    if _remote():
        rid = _request("GET", "/v1/dashboard").get("rollout") or {}
        if not rid:
            raise OtaError("no rollout yet")
        return int(rid["rollout_id"])
    found = _local_service().store.latest_rollout_id()
    if found is None:
        raise OtaError("no rollout yet")
    return int(found)


@rollout_app.command("start")
def rollout_start(
    version: str = typer.Argument(..., help="A released model version."),
    previous: str = typer.Option(..., "--previous", help="The version the fleet runs now (revert target)."),
    plan_file: Path | None = typer.Option(None, "--plan", help="JSON rollout plan; default shadow→1%→10%→50%→100%."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start a staged rollout of VERSION."""
    from driveloop.contracts.fleet import RolloutStart
    from driveloop.core.version import model_version_text

    # "3" or "v3", like `ota release`; the wire carries "3" (a bad one is a one-line ConfigError).
    version, previous = model_version_text(version, allow_prefix=True), model_version_text(previous, allow_prefix=True)
    plan = None
    if plan_file is not None:
        try:
            plan = json.loads(plan_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read plan {plan_file}: {e}") from e
    req = RolloutStart(version=version, previous_version=previous, plan=plan)
    data = _request("POST", "/v1/rollouts", req.model_dump(exclude_none=True)) if _remote() else \
        _local_service().start(req, _local_actor()).model_dump()
    _emit(data, as_json)


@rollout_app.command("status")
def rollout_status(rollout_id: int | None = typer.Argument(None, help="Default: the latest rollout."),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a rollout's stage, status and last decision."""
    rid = _latest_id(rollout_id)
    data = _request("GET", f"/v1/rollouts/{rid}") if _remote() else _local_service().status(rid).model_dump()
    _emit(data, as_json)
    if not as_json and data.get("last_decision"):
        typer.echo(f"{'last decision':>24}: {data['last_decision']['action']} — {data['last_decision']['reason']}")


def _operator(kind: str, rollout_id: int | None, reason: str, as_json: bool) -> None:
    from driveloop.contracts.fleet import OperatorRequest

    rid = _latest_id(rollout_id)
    req = OperatorRequest(reason=reason)
    data = _request("POST", f"/v1/rollouts/{rid}/{kind}", req.model_dump()) if _remote() else \
        _local_service().operate(rid, kind, req, _local_actor()).model_dump()
    _emit(data, as_json)


@rollout_app.command("pause")
def rollout_pause(rollout_id: int | None = typer.Argument(None), reason: str = typer.Option("", "--reason"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Freeze the rollout where it is (no promotion, no reverts)."""
    _operator("pause", rollout_id, reason, as_json)


@rollout_app.command("resume")
def rollout_resume(rollout_id: int | None = typer.Argument(None), reason: str = typer.Option("", "--reason"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Let a paused rollout continue."""
    _operator("resume", rollout_id, reason, as_json)


@rollout_app.command("promote")
def rollout_promote(rollout_id: int | None = typer.Argument(None), reason: str = typer.Option("", "--reason"),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Move to the next stage now, without waiting for the gate."""
    _operator("promote", rollout_id, reason, as_json)


@rollout_app.command("abort")
def rollout_abort(rollout_id: int | None = typer.Argument(None), reason: str = typer.Option("", "--reason"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop the rollout; every vehicle reverts to the previous version."""
    _operator("abort", rollout_id, reason, as_json)


@ota_app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8700, "--port", min=1, max=65535),
    eval_interval_s: float = typer.Option(60.0, "--eval-interval-s", help="Seconds between health evaluations."),
    allow_unreleased: bool = typer.Option(False, "--allow-unreleased",
                                          help="Start rollouts of versions not in the TUF repository (tests)."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (PEM)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="The certificate's private key (PEM)."),
) -> None:
    """Run the fleet server: health, update offers, rollouts, TUF files, /metrics and the dashboard."""
    import uvicorn

    from driveloop._vehicle_logs import log_search_for
    from driveloop.core.tls import plaintext_warning, server_tls
    from driveloop.core.tokens import parse_named_tokens
    from driveloop.ota.server import ServerConfig, create_app
    from driveloop.settings import load_settings

    s = load_settings()
    tls = server_tls(tls_cert, tls_key)
    named = parse_named_tokens(os.environ.get(ADMIN_TOKENS_ENV, ""))
    config = ServerConfig(s.ota_dir, _admin_token(s.ota_dir, create=True), eval_interval_s=eval_interval_s,
                          prometheus_url=s.prometheus_url, require_release=not allow_unreleased, admin_tokens=named,
                          db_url=s.fleet_db_url,  # PostgreSQL: replicas of this server share the fleet state
                          logs=log_search_for(s),  # the dashboard's logs panel reads the cloud's log index
                          live=live_source(s))  # its live panel reads the broker, when one is configured
    warning = plaintext_warning(host, bool(tls))
    if warning:
        typer.secho(warning, err=True, fg="red", bold=True)
    typer.echo(f"fleet server on {'https' if tls else 'http'}://{host}:{port}/ (data in {s.ota_dir})", err=True)
    from driveloop.core.logsetup import set_service_name

    set_service_name("fleet")  # <home>/logs/fleet.jsonl; uvicorn's own lines in the same format (log_config=None)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", log_config=None,
                **tls)  # type: ignore[arg-type]


def live_source(s: Any) -> Any:
    """The dashboard's live panel source: ``DRIVELOOP_NATS_URL`` as the service user ``DRIVELOOP_NATS_USER`` /
    ``DRIVELOOP_NATS_PASSWORD``, trusting the hazard service's public key under ``<home>/cloud/hazards``
    (without one, hazards are shown as unverifiable and dropped). None without a URL: no live panel."""
    if not s.nats_url:
        return None
    from driveloop.cloud.hazard_service import hazard_dir, public_key
    from driveloop.ota.live_feed import LiveSource

    try:
        keys: tuple[bytes, ...] = (public_key(hazard_dir(s.cloud_dir)),)
    except ConfigError as e:
        typer.secho(f"live panel: {e}; hazards will not be shown", err=True, fg="yellow")
        keys = ()
    return LiveSource(s.nats_url, os.environ.get("DRIVELOOP_NATS_USER"), os.environ.get("DRIVELOOP_NATS_PASSWORD"),
                      hazard_keys=keys)


def _vehicle_action(vehicle_id: str, action: str, as_json: bool) -> None:
    from driveloop.core.ids import check_vehicle_id

    check_vehicle_id(vehicle_id)
    if _remote():
        data = _request("POST", f"/v1/vehicles/{vehicle_id}/{action}")
    else:
        import time

        from driveloop.settings import load_settings

        store = _fleet_store(load_settings())
        token = store.vehicle_action(vehicle_id, action, time.time(), _local_actor())
        enabled = next(v["enabled"] for v in store.vehicles() if v["vehicle_id"] == vehicle_id)
        data = {"vehicle_id": vehicle_id, "enabled": enabled, "token": token}
    if as_json:
        _emit(data, True)
    else:
        typer.echo(data["token"] if data.get("token") else f"{vehicle_id}: {'enabled' if data['enabled'] else 'disabled'}")


@vehicles_app.command("disable")
def vehicles_disable(vehicle_id: str = typer.Argument(..., help="Vehicle id."),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Refuse every request of this vehicle from its next one on (unenrol; reversible with enable)."""
    _vehicle_action(vehicle_id, "disable", as_json)


@vehicles_app.command("enable")
def vehicles_enable(vehicle_id: str = typer.Argument(..., help="Vehicle id."),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Accept a disabled vehicle again (with its current token)."""
    _vehicle_action(vehicle_id, "enable", as_json)


@vehicles_app.command("rotate")
def vehicles_rotate(vehicle_id: str = typer.Argument(..., help="Vehicle id."),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Issue a new token (printed once); the old one stops working at once."""
    _vehicle_action(vehicle_id, "rotate", as_json)


@vehicles_app.command("list")
def vehicles_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Enrolled vehicles of the local store, with their state (tokens are never shown)."""
    from driveloop.settings import load_settings

    rows = _fleet_store(load_settings()).vehicles()
    if as_json:
        _emit({"vehicles": rows}, True)
        return
    for r in rows:
        typer.echo(f"{r['vehicle_id']:>24}  {'enabled' if r['enabled'] else 'DISABLED':>8}  {r['hardware_class']}")


@ota_app.command("simulate")
def simulate_cmd(
    vehicles: int = typer.Option(1000, "--vehicles", min=1),
    bad_model: bool = typer.Option(False, "--bad-model", help="The new model is worse than the fleet's."),
    bad_kind: str = typer.Option("interventions", "--bad-kind", help="interventions | crash"),
    seed: int = typer.Option(0, "--seed"),
    forgers: int = typer.Option(0, "--forgers", min=0, help="Extra vehicles that send forged health reports."),
    audit: Path | None = typer.Option(None, "--audit", help="Write the hash-chained audit log here (JSONL)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Drive a simulated fleet through a rollout with the real controller, director and audit log."""
    from driveloop.ota.simulate import SimConfig, simulate

    cfg = SimConfig(vehicles=vehicles, bad_model=bad_model, bad_kind=bad_kind, seed=seed, forgers=forgers)
    if as_json:
        result = simulate(cfg, audit)
        typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("rolling out…") as status:
        result = simulate(cfg, audit, lambda i, stage, action: status.update(f"window {i}: {stage} → {action}"))
    for d in result.decisions:
        typer.echo(f"t={d['at_s']:>7.0f}s {d['stage']:>7} {d['action']:>8}  {d['reason']}")
    _emit(result.to_dict(), False)


@ota_app.command("grafana")
def grafana_cmd(
    url: str = typer.Option(..., "--url", help="Grafana base URL."),
    token: str = typer.Option(..., "--token", help="Grafana service-account token."),
    prometheus_url: str | None = typer.Option(None, "--prometheus-url",
                                              help="Data source URL (default PROMETHEUS_URL or localhost:9090)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Provision the Prometheus data source and the rollout dashboard in Grafana (idempotent)."""
    from driveloop.ota.grafana import provision
    from driveloop.settings import load_settings

    prom = prometheus_url or load_settings().prometheus_url or "http://127.0.0.1:9090"
    _emit(provision(url, token, prom), as_json)

