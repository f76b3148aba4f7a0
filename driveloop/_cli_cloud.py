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
from driveloop.exceptions import RegistryError

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


def _ref(text: str) -> int | str:
    return int(text) if text.isdigit() else text


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
        art = reg.get(_ref(ref))
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
        version = reg.get(_ref(ref)).version
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
        version = reg.get(_ref(ref)).version
        sha = reg.verify(version)
    typer.echo(dumps({"version": version, "sha256": sha, "ok": True}) if as_json else f"v{version} ok ({sha})")
