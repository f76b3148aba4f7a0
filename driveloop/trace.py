"""Follow one recorded segment through the loop: recording → upload → dataset version → fine-tune →
model version → rollout (``driveloop trace segment SHA256``).

Nothing new is recorded for this: each hop is a link one component already keeps, read here in the
top layer (the only one that may see both the cloud and the fleet server):

| hop | link | kept by |
|---|---|---|
| recording | segment metadata (vehicle, model that drove, scenario, seed, events) | the MCAP file, in the catalog |
| upload | ``ingested_at_s`` of the catalog row | ``cloud/catalog.py`` |
| dataset version | ``consumed_by_dataset`` of the row; the dataset manifest lists the segment | ``cloud/datasets.py`` |
| fine-tune → model | a registry manifest whose ``dataset_version`` is that dataset | ``cloud/registry.py`` |
| later models | manifests whose ``parent_version`` chain reaches that model | ``cloud/registry.py`` |
| rollout | fleet-server rollouts of any of those versions, with their outcome | ``ota/store.py`` |

A hop that is missing is reported as where the path ends (``ends_at``), not as an error: a segment
still waiting for the pipeline is a normal state.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driveloop.core.exceptions import ConfigError, DriveloopError, StorageError
from driveloop.settings import Settings

__all__ = ["trace_segment", "render_trace"]

_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _check_ref(ref: str) -> str:
    ref = ref.strip().lower()
    if not _HEX.match(ref):
        raise ConfigError(f"a segment is named by its sha256 (8 to 64 hex digits), got {ref[:80]!r}")
    return ref


def _find_segment(catalog: Any, ref: str) -> Any:
    if len(ref) == 64:
        rec = catalog.get_segment(ref)
        matches = [rec] if rec is not None else []
    else:
        matches = [r for r in catalog.segments() if r.sha256.startswith(ref)]
    if not matches:
        raise StorageError(f"no segment {ref} in the catalog")
    if len(matches) > 1:
        raise ConfigError(f"segment prefix {ref} is ambiguous ({len(matches)} segments): give more digits")
    return matches[0]


def _dataset(settings: Settings, version: str, sha: str) -> dict[str, Any]:
    from driveloop.cloud.datasets import DatasetStore

    root = Path(settings.cloud_dir) / "datasets"
    out: dict[str, Any] = {"step": "dataset", "version": version}
    if not root.is_dir():
        return {**out, "found": False}
    try:
        ds = DatasetStore(root).open(version)
    except StorageError as e:
        return {**out, "found": False, "error": str(e)}
    m = ds.manifest
    return {**out, "found": True, "contains_segment": sha in m.segments, "segments": len(m.segments),
            "base_model_version": m.base_model_version, "label_version": m.label_version, "samples": ds.samples}


def _models(settings: Settings, dataset_version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(models fine-tuned on the dataset, their descendants), each with its stage history."""
    from driveloop.cloud.registry import Registry

    if not (Path(settings.registry_dir) / "registry.db").is_file():
        return [], []
    with Registry(settings.registry_dir) as reg:
        listed = reg.list()
        direct = [m.version for m, _ in listed if m.dataset_version == dataset_version]
        children: dict[int, list[int]] = {}
        for m, _ in listed:
            if m.parent_version is not None:
                children.setdefault(m.parent_version, []).append(m.version)
        later, frontier = [], list(direct)
        while frontier:
            nxt = [c for v in frontier for c in children.get(v, []) if c not in direct and c not in later]
            later += nxt
            frontier = nxt
        stage = {m.version: s for m, s in listed}
        manifests = {m.version: m for m, _ in listed}

        def row(v: int, step: str) -> dict[str, Any]:
            m = manifests[v]
            return {"step": step, "model_version": v, "stage": stage[v], "parent_version": m.parent_version,
                    "dataset_version": m.dataset_version, "training_run": m.training_run, "created_at": m.created_at,
                    "history": [{"to": e.to_stage, "at": _iso(e.at_s), "reason": e.reason} for e in reg.history(v)]}

        return [row(v, "fine-tune") for v in direct], [row(v, "descendant") for v in sorted(later)]


def _rollouts(settings: Settings, versions: set[str]) -> list[dict[str, Any]]:
    from driveloop.ota.store import FleetStore

    if not versions or not (Path(settings.ota_dir) / "fleet.db").is_file():
        return []
    store = FleetStore.at(Path(settings.ota_dir))
    try:
        out = []
        latest = store.latest_rollout_id() or 0
        for rid in range(1, latest + 1):
            r = store.load(rid)
            st = r.state
            if st.version in versions:
                out.append({"step": "rollout", "rollout_id": rid, "model_version": st.version,
                            "previous_version": st.previous_version, "status": str(st.status.value),
                            "stage": r.plan.stages[st.stage_index].name, "reason": st.reason})
        return out
    finally:
        store.engine.dispose()


def trace_segment(settings: Settings, ref: str) -> dict[str, Any]:
    """The segment's path as far as it goes (see the module docstring)."""
    from driveloop.cloud.catalog import Catalog

    ref = _check_ref(ref)
    catalog_url = settings.resolved_catalog_url()
    if catalog_url.startswith("sqlite:///") and not Path(catalog_url.removeprefix("sqlite:///")).is_file():
        raise StorageError(f"no catalog at {catalog_url.removeprefix('sqlite:///')}: nothing was uploaded yet")
    catalog = Catalog(catalog_url)
    try:
        rec = _find_segment(catalog, ref)
    finally:
        catalog.close()
    meta = rec.meta
    steps: list[dict[str, Any]] = [
        {"step": "recording", "vehicle": meta.vehicle, "model_version": meta.model_version, "scenario": meta.scenario,
         "seed": meta.seed, "start_s": meta.start_s, "end_s": meta.end_s, "events": dict(meta.events)},
        {"step": "upload", "ingested_at": _iso(rec.ingested_at_s), "name": rec.name, "size": rec.size},
    ]
    result: dict[str, Any] = {"sha256": rec.sha256, "steps": steps, "ends_at": "upload", "models": []}
    if rec.consumed_by_dataset is None:
        return result
    try:
        ds = _dataset(settings, rec.consumed_by_dataset, rec.sha256)
        steps.append(ds)
        result["ends_at"] = "dataset"
        direct, later = _models(settings, rec.consumed_by_dataset)
        steps.extend(direct)
        if direct:
            result["ends_at"] = "model"
        steps.extend(later)
        versions = {str(m["model_version"]) for m in direct + later}
        result["models"] = sorted(int(v) for v in versions)
        rollouts = _rollouts(settings, versions)
        steps.extend(rollouts)
        if rollouts:
            result["ends_at"] = "rollout"
    except DriveloopError as e:  # a store further along is unreadable: report how far the path is known
        result["error"] = str(e)
    return result


def render_trace(result: dict[str, Any]) -> str:
    """The path as a few readable lines."""
    lines = [f"segment {result['sha256']}"]
    for s in result["steps"]:
        step = s["step"]
        if step == "recording":
            events = ", ".join(f"{k}×{v}" for k, v in s["events"].items()) or "no events"
            text = f"recorded by {s['vehicle']} on model v{s['model_version']} ({s['scenario']}, seed {s['seed']}): {events}"
        elif step == "upload":
            text = f"uploaded {s['ingested_at']} ({s['size']} bytes)"
        elif step == "dataset":
            text = (f"dataset {s['version']}: {s.get('segments', '?')} segments, {s.get('samples', '?')} samples"
                    if s.get("found") else f"dataset {s['version']} (not on disk)")
        elif step in ("fine-tune", "descendant"):
            verb = "fine-tuned into" if step == "fine-tune" else "then"
            text = f"{verb} model v{s['model_version']} (from v{s['parent_version']}), now {s['stage']}"
        else:
            text = f"rollout {s['rollout_id']} of v{s['model_version']}: {s['status']} at stage {s['stage']}"
        lines.append(f"  → {step:10} {text}")
    lines.append(f"  (the path ends at: {result['ends_at']})")
    if "error" in result:
        lines.append(f"  ({result['error']})")
    return "\n".join(lines)
