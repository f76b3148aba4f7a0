"""``driveloop ota release`` and ``driveloop ota keys``: sign validated models into the TUF repository.

Paths come from settings: repository ``<home>/ota/repo``, keys ``<home>/ota/keys``, registry
``<home>/registry``. Heavy imports (tuf, sqlalchemy) happen inside the commands.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from driveloop._cli_ota import ota_app

keys_app = typer.Typer(help="TUF signing keys: show, rotate.", no_args_is_help=True)
ota_app.add_typer(keys_app, name="keys")


def _service(root_threshold: int | None = None) -> Any:
    from driveloop.cloud.registry import Registry
    from driveloop.ota.release import RepoPolicy
    from driveloop.ota.release import ReleaseService
    from driveloop.settings import load_settings

    settings = load_settings()
    policy = RepoPolicy(root_threshold=root_threshold) if root_threshold else RepoPolicy()
    registry = Registry(settings.registry_dir)
    return ReleaseService(settings.ota_dir / "repo", settings.ota_dir / "keys", registry, policy)


@ota_app.command("release")
def release(
    version: str = typer.Argument(..., help="Registry model version (3 or v3); must be validated."),
    hardware_class: str = typer.Option("any", "--hardware-class", help="cpu, cuda or any."),
    root_threshold: int = typer.Option(0, "--root-threshold", help="Root key threshold when the repository is created (default 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the published target as JSON."),
) -> None:
    """Sign a validated model as a TUF target and mark it released."""
    svc = _service(root_threshold or None)
    info = svc.release(version, hardware_class=hardware_class)
    if as_json:
        typer.echo(json.dumps({
            "model_version": info.model_version, "target": info.path, "manifest_target": info.manifest_path,
            "sha256": info.sha256, "length": info.length, "hardware_class": info.hardware_class,
            "release_seq": info.release_seq, "targets_version": info.targets_version,
        }, sort_keys=True))
    else:
        typer.echo(f"released model {info.model_version} as {info.path} ({info.length} bytes, sha256 {info.sha256[:12]}…, "
                   f"hardware {info.hardware_class}, release #{info.release_seq}, targets v{info.targets_version})")


@ota_app.command("refresh-timestamp")
def refresh_timestamp(
    expires_in_s: float = typer.Option(86400.0, "--expires-in-s", help="Lifetime of the new timestamp, seconds."),
) -> None:
    """Re-sign the TUF timestamp (run periodically: vehicles reject an expired one as a freeze attack)."""
    from datetime import UTC, datetime, timedelta

    from driveloop.core.exceptions import ConfigError

    if expires_in_s <= 0:
        raise ConfigError(f"--expires-in-s must be > 0, got {expires_in_s}")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=expires_in_s)
    version = _service().refresh_timestamp(expires)
    typer.echo(f"timestamp v{version} expires {expires.isoformat()}")


@keys_app.command("rotate")
def rotate(role: str = typer.Argument(..., help="root, targets, snapshot or timestamp.")) -> None:
    """Replace a role's keys; the old ones are revoked and destroyed, root is re-signed."""
    from driveloop.ota.keys import check_role

    check_role(role)
    new_ids = _service().rotate_key(role)
    typer.echo(f"rotated {role}: new key(s) {', '.join(k[:12] for k in new_ids)}")


@keys_app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show each role's threshold and key ids from the current root."""
    rows = _service().keys_summary()
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"TUF root v{rows[0]['root_version']} (expires {rows[0]['expires']})")
    for col in ("role", "threshold", "key ids"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["role"], str(r["threshold"]), "\n".join(r["keyids"]))
    Console().print(table)
