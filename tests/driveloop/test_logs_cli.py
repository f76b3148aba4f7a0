"""``driveloop drive`` then ``driveloop logs search``: the drive's safety activations come back with
vehicle, model version and trace id — exactly the onsets its recorded segments show; every line the
drive wrote validates against the log schema; ``trace segment`` follows a segment to its rollout."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jsonschema
import pytest

from driveloop.cli import main
from driveloop.contracts.logline import log_line_schema

pytestmark = pytest.mark.slow


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _recorded_onsets(home: Path) -> list[tuple[str, str]]:
    """(vehicle, action) of every aeb/fcw/watchdog onset in the uploaded segments, tick by tick."""
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import read_ticks

    store = ObjectStore(home / "cloud" / "store")
    catalog = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}")
    try:
        records = sorted(catalog.segments(), key=lambda r: (r.meta.vehicle, r.meta.start_s))
    finally:
        catalog.close()
    onsets: list[tuple[str, str]] = []
    previous: dict[str, tuple[bool, bool, str | None]] = {}
    for rec in records:
        path = home / f"seg-{rec.sha256}.mcap"
        with store.open(rec.sha256) as src:
            path.write_bytes(src.read())
        for t in read_ticks(path):
            aeb, fcw, wd = previous.get(rec.meta.vehicle, (False, False, None))
            if t.aeb and not aeb:
                onsets.append((rec.meta.vehicle, "aeb"))
            if t.fcw and not fcw:
                onsets.append((rec.meta.vehicle, "fcw"))
            if t.watchdog is not None and t.watchdog != wd:
                onsets.append((rec.meta.vehicle, "watchdog"))
            previous[rec.meta.vehicle] = (t.aeb, t.fcw, t.watchdog)
    return onsets


def test_drive_then_search_returns_its_safety_activations(home: Path, capsys) -> None:
    # A closing-in target at 50 km/h (AEB, FCW) and a model that hangs at 12 s (watchdog).
    code, out, _ = _run(capsys, "drive", "--scenario", "ccrs-50", "--vehicles", "2", "--duration", "20",
                        "--fault", "hang", "--fault-at", "12", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["logs"]["errors"] == {} and summary["logs"]["pending"] == 0
    code, out, _ = _run(capsys, "logs", "search", "aeb OR fcw OR watchdog", "--json", "--limit", "1000")
    assert code == 0
    found = json.loads(out)["lines"]
    events = [x for x in found if "event.action" in x]
    expected = _recorded_onsets(home)
    assert {a for _, a in expected} == {"aeb", "fcw", "watchdog"}  # the fixture's premise
    assert sorted((x["vehicle.id"], x["event.action"]) for x in events) == sorted(expected)
    traces = {}
    for x in events:
        assert x["model.version"] == str(summary["model"])
        assert len(x["trace.id"]) == 32 and len(x["span.id"]) == 16
        traces.setdefault(x["vehicle.id"], set()).add(x["trace.id"])
    assert sorted(traces) == ["veh000", "veh001"]
    assert all(len(t) == 1 for t in traces.values()) and traces["veh000"] != traces["veh001"]
    # Filters: one vehicle, at least a level, a time window.
    _, out, _ = _run(capsys, "logs", "search", "watchdog", "--vehicle", "veh001", "--since", "1h", "--json")
    assert {x["vehicle.id"] for x in json.loads(out)["lines"]} == {"veh001"}
    _, out, _ = _run(capsys, "logs", "search", "aeb", "--since", str(time.time() + 3600), "--json")
    assert json.loads(out)["count"] == 0
    # Every line this drive logged (the command's file, the index) is a valid line.
    schema = log_line_schema()
    for f in (home / "logs").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            jsonschema.validate(json.loads(line), schema)
    for x in found:
        jsonschema.validate(x, schema)


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("logs", "search", "x", "--level", "loud"), 2, "level must be one of"),
    (("logs", "search", "x", "--since", "yesterday"), 2, "--since must be"),
    (("trace", "segment", "not-hex"), 2, "sha256"),
    (("trace", "segment", "ab" * 32), 5, "no catalog"),
])
def test_bad_input_is_one_line(home: Path, capsys, args: tuple[str, ...], code: int, needle: str) -> None:
    rc, _, err = _run(capsys, *args)
    assert rc == code and needle in err and len(err.strip().splitlines()) == 1


def test_trace_segment_follows_it_to_the_rollout(home: Path, capsys, tmp_path: Path) -> None:
    """Real stores, linked as the pipeline and the fleet server link them: an uploaded segment, a
    dataset version built from it, a model fine-tuned on that dataset (and one fine-tuned from that
    model), and a rollout of the first."""
    import numpy as np

    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.datasets import ARRAY_SPECS, DatasetManifest, DatasetStore
    from driveloop.cloud.registry import Registry
    from driveloop.ota.controller import RolloutPlan, StageSpec
    from driveloop.ota.store import FleetStore

    code, out, _ = _run(capsys, "drive", "--scenario", "highway", "--vehicles", "1", "--duration", "3", "--json")
    assert code == 0 and json.loads(out)["upload"]["uploaded"] == 1
    catalog = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}")
    (seg,) = catalog.segments()
    manifest = DatasetManifest(segments=(seg.sha256,), label_version="t", code_version="t", base_model_version=1)
    arrays = {name: np.zeros((2, *spec[0]), dtype=spec[1]) for name, spec in ARRAY_SPECS.items()}
    ds = DatasetStore(home / "cloud" / "datasets").write(manifest, arrays, {"samples": 2})
    assert catalog.mark_consumed([seg.sha256], ds.version) == 1
    catalog.close()
    with Registry(home / "registry") as reg:
        base = reg.get(1)
        onnx = tmp_path / "m.onnx"
        shutil.copy(base.onnx_path, onnx)
        tuned = reg.register(onnx, parent_version=1, dataset_version=ds.version, training_run={"kind": "test"})
        reg.set_stage(tuned.version, "validated", "test gate")
        later = reg.register(onnx, parent_version=tuned.version, training_run={"kind": "test"})
    store = FleetStore.at(home / "ota")
    plan = RolloutPlan((StageSpec("canary", 0.5, False, 0.0, 1), StageSpec("all", 1.0, False, 0.0, 1)))
    rid = store.create_rollout(str(tuned.version), "1", plan, time.time(), "test")
    store.engine.dispose()
    code, out, _ = _run(capsys, "trace", "segment", seg.sha256[:12], "--json")
    assert code == 0
    t = json.loads(out)
    assert t["sha256"] == seg.sha256 and t["ends_at"] == "rollout"
    steps = [s["step"] for s in t["steps"]]
    assert steps == ["recording", "upload", "dataset", "fine-tune", "descendant", "rollout"]
    by = {s["step"]: s for s in t["steps"]}
    assert by["recording"]["vehicle"] == "veh000" and by["recording"]["model_version"] == "1"
    assert by["dataset"]["version"] == ds.version and by["dataset"]["contains_segment"] is True
    assert by["fine-tune"]["model_version"] == tuned.version and by["fine-tune"]["stage"] == "validated"
    assert by["descendant"]["model_version"] == later.version
    assert (by["rollout"]["rollout_id"], by["rollout"]["model_version"], by["rollout"]["status"]) == \
        (rid, str(tuned.version), "running")
    assert t["models"] == [tuned.version, later.version]
    code, out, _ = _run(capsys, "trace", "segment", seg.sha256)
    assert code == 0 and f"rollout {rid} of v{tuned.version}: running" in out
