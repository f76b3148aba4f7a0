"""``driveloop ota release`` and ``driveloop ota keys``: sign validated models into the TUF repository.

Paths come from settings: image repository ``<home>/ota/repo`` (online keys ``<home>/ota/keys``),
director repository ``<home>/ota/director`` (online keys ``<home>/ota/director-keys``), registry
``<home>/registry``. Root keys are never in an online folder: ``keys export`` → ``keys sign-root`` (on the
offline machine, in its own folder) → ``keys import-root`` (README "Signing keys: root offline").
Heavy imports (tuf, sqlalchemy) happen inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from driveloop._cli_ota import ota_app

keys_app = typer.Typer(help="TUF signing keys: show, rotate; root offline (export, sign-root, import-root).",
                       no_args_is_help=True)
ota_app.add_typer(keys_app, name="keys")

REPO_HELP = "image (signed releases) or director (per-vehicle assignments)."


def _ota_dir() -> Path:
    from driveloop.settings import load_settings

    return Path(load_settings().ota_dir)


def _service(root_threshold: int | None = None, targets_threshold: int | None = None,
             offline_root: Path | None = None) -> Any:
    from driveloop.cloud.registry import Registry
    from driveloop.ota.release import ReleaseService, RepoPolicy
    from driveloop.settings import load_settings

    settings = load_settings()
    policy = RepoPolicy(root_threshold=root_threshold or 1, targets_threshold=targets_threshold or 1)
    registry = Registry(settings.registry_dir)
    return ReleaseService(settings.ota_dir / "repo", settings.ota_dir / "keys", registry, policy,
                          offline_root=offline_root)


@ota_app.command("release")
def release(
    version: str = typer.Argument(..., help="Registry model version (3 or v3); must be validated."),
    hardware_class: str = typer.Option("any", "--hardware-class", help="cpu, cuda or any."),
    root_threshold: int = typer.Option(0, "--root-threshold", help="Root key threshold when the repository is created (default 1)."),
    targets_threshold: int = typer.Option(0, "--targets-threshold", help="Targets key threshold when the repository is created (default 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the published target as JSON."),
    exact: bool = typer.Option(False, "--exact", help="Release exactly VERSION, not its fastest validated variant."),
) -> None:
    """Sign a validated model as a TUF target and mark it released.

    By default the fastest form of VERSION that passed its gates ships: a validated compressed variant
    (`models compress`) when one exists, else VERSION itself; `--exact` releases VERSION as named.
    A repository without a root gets one signed in <home>/ota/offline-root/image (move it offline), unless
    a root was imported first (keys export / sign-root / import-root).
    """
    svc = _service(root_threshold or None, targets_threshold or None)
    choice = None
    if exact:
        info = svc.release(version, hardware_class=hardware_class)
    else:
        info, choice = svc.release_fastest(version, hardware_class=hardware_class)
    variant = None if choice is None else choice.variant
    if as_json:
        out = {
            "model_version": info.model_version, "target": info.path, "manifest_target": info.manifest_path,
            "sha256": info.sha256, "length": info.length, "hardware_class": info.hardware_class,
            "release_seq": info.release_seq, "targets_version": info.targets_version, "variant": variant,
        }
        if choice is not None:
            out["variants_considered"] = choice.considered
        typer.echo(json.dumps(out, sort_keys=True))
    else:
        form = "" if variant is None else f" ({variant['method']} variant of model {variant['parent']})"
        typer.echo(f"released model {info.model_version}{form} as {info.path} ({info.length} bytes, sha256 "
                   f"{info.sha256[:12]}…, hardware {info.hardware_class}, release #{info.release_seq}, "
                   f"targets v{info.targets_version})")


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
def rotate(
    role: str = typer.Argument(..., help="root, targets, snapshot or timestamp."),
    repo: str = typer.Option("image", "--repo", help=REPO_HELP),
    offline_root: Path | None = typer.Option(None, "--offline-root",
                                             help="Folder with the root keys (default <home>/ota/offline-root/<repo>)."),
) -> None:
    """Replace a role's keys in one step, where the offline root folder is at hand; old keys are destroyed."""
    from driveloop.ota.keys import check_role
    from driveloop.ota.offline_root import RepositoryPaths

    check_role(role)
    RepositoryPaths.of(_ota_dir(), repo)  # a bad --repo is a one-line error before anything opens
    if repo == "director":
        from driveloop.ota.director_repo import DirectorRepo

        new_ids = DirectorRepo.at(_ota_dir()).rotate_key(role, offline_root)
    else:
        new_ids = _service(offline_root=offline_root).rotate_key(role)
    typer.echo(f"rotated {repo} {role}: new key(s) {', '.join(k[:12] for k in new_ids)}")


@keys_app.command("show")
def show(
    repo: str = typer.Option("image", "--repo", help=REPO_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show each role's threshold and key ids from the current root."""
    from driveloop.ota.offline_root import keys_summary, open_repository

    rows = keys_summary(open_repository(_ota_dir(), repo))
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{repo} root v{rows[0]['root_version']} (expires {rows[0]['expires']})")
    for col in ("role", "threshold", "key ids"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["role"], str(r["threshold"]), "\n".join(r["keyids"]))
    Console().print(table)


@keys_app.command("export")
def export(
    out: Path = typer.Option(..., "--out", help="Where to write the online public keys (JSON) for sign-root."),
    repo: str = typer.Option("image", "--repo", help=REPO_HELP),
    rotate_roles: list[str] = typer.Option([], "--rotate", help="Give this online role new keys (repeatable)."),
    targets_threshold: int = typer.Option(0, "--targets-threshold", help="Targets keys and threshold of the next root."),
) -> None:
    """Offline root, step 1 (server): export the online roles' public keys, generating new ones as needed."""
    from driveloop.core.atomic import write_atomic
    from driveloop.ota.offline_root import export_keys

    doc = export_keys(_ota_dir(), repo, rotate_roles, targets_threshold or None)
    write_atomic(out, json.dumps(doc, indent=1, sort_keys=True).encode())
    typer.echo(f"exported the {repo} repository's online keys (root v{doc['root_version']}) to {out}; sign offline: "
               f"driveloop ota keys sign-root {out.name} --offline-root DIR --out root.json")


@keys_app.command("sign-root")
def sign_root(
    online_keys: Path = typer.Argument(..., help="The file written by `keys export`."),
    offline_root: Path = typer.Option(..., "--offline-root", help="The offline folder with the root keys (created if new)."),
    out: Path = typer.Option(..., "--out", help="Where to write the signed root metadata, for import-root."),
    root_threshold: int = typer.Option(0, "--root-threshold", help="Root keys and threshold (default unchanged; 1 at first)."),
    rotate_root: bool = typer.Option(False, "--rotate-root", help="Replace the root keys (old and new both sign)."),
    expires_in_days: float = typer.Option(365.0, "--expires-in-days", help="Lifetime of the new root."),
) -> None:
    """Offline root, step 2 (offline machine): sign the next root; needs no data directory."""
    from driveloop.core.atomic import write_atomic
    from driveloop.core.exceptions import ConfigError
    from driveloop.ota.offline_root import OfflineRoot

    if expires_in_days <= 0:
        raise ConfigError(f"--expires-in-days must be > 0, got {expires_in_days}")
    try:
        doc = json.loads(online_keys.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the online keys export {online_keys}: {e}") from e
    data = OfflineRoot(offline_root).sign(doc, time.time(), expires_in_days * 86400.0, root_threshold or None,
                                          rotate_root)
    write_atomic(out, data)
    version = json.loads(data)["signed"]["version"]
    typer.echo(f"signed {doc.get('repository')} root v{version} with the keys in {offline_root}; "
               f"import it on the server: driveloop ota keys import-root {out.name} --repo {doc.get('repository')}")


@keys_app.command("import-root")
def import_root_cmd(
    root_file: Path = typer.Argument(..., help="Signed root metadata from `keys sign-root`."),
    repo: str = typer.Option("image", "--repo", help=REPO_HELP),
) -> None:
    """Offline root, step 3 (server): verify the chain, install the root, re-sign the online roles."""
    from driveloop.core.exceptions import ConfigError
    from driveloop.ota.offline_root import import_root

    try:
        data = root_file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {root_file}: {e}") from e
    version = import_root(_ota_dir(), repo, data)
    typer.echo(f"imported root v{version} into the {repo} repository")
