"""The reduced demo, end to end: real simulator, ONNX Runtime, Ray pipeline, TUF release, fleet server,
A/B updates and rollout gates — on fixtures built for one known outcome each:

- ``LOOP``: the reduced loop must validate a candidate and complete its rollout. Its routes (seed 1309)
  are chosen for that (``test_loop_fixture_routes``): the data drive starts with CCR approaches and a merge
  (v1, cloned on nominal traffic only, needs the AEB there, and the hindsight labels teach it to brake
  earlier: the held-out gate sees the candidate intervene less), and every rollout window is nominal
  traffic, so the health gates compare like with like and find nothing worse.
- the same loop, run again from an identical home, gives identical rows (the demo is replayable);
- ``BAD``: the same loop, then a deliberately bad model (its braking sign flipped) must be aborted in the
  canary stage: on the same nominal roads the canary cohort meets dense traffic, where that model accelerates
  into every slow-down and the AEB must step in, while the control cohort needs no fallback;
- a SIGKILLed loop restarts cleanly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

LOOP: dict[str, Any] = dict(iterations=1, vehicles=4, drive_s=40.0, window_s=12.0, max_windows=16, fl_rounds=1,
                            port=0, eval_duration_s=12.0, finetune_epochs=2, eval_classes=("highway", "cut-in", "ccrs"),
                            seed=1309)
BAD: dict[str, Any] = {**LOOP, "inject_bad_model": True}


def _config(**kw: Any) -> Any:
    from driveloop.demo import DemoConfig

    return DemoConfig(**{**LOOP, **kw})


def _run(config: Any, home: Path | None = None, fleet_shards: int | None = None) -> dict[str, Any]:
    """One demo run; over ``home`` when given, else over the DRIVELOOP_HOME of the environment; the fleet over
    ``fleet_shards`` cores (None: the settings' ``num_cpus``, 2 by default)."""
    from driveloop.demo import Demo
    from driveloop.settings import Settings, load_settings

    settings = Settings(home=home) if home is not None else load_settings()
    demo = Demo(settings, config, say=lambda m: None)
    demo.fleet_shards = fleet_shards
    return demo.run()


@pytest.fixture()
def demo_home(trained_home, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def loop_run(trained_home, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The ``LOOP`` demo over a fresh copy of the trained home, its fleet in 2 shards: (home, report)."""
    home = tmp_path_factory.mktemp("loop") / "home"
    shutil.copytree(trained_home, home)
    return home, _run(_config(), home, fleet_shards=2)


# Where the demo's routes come from (driveloop/_demo_fleet.py, driveloop/demo.py): vehicle i drives route seed
# seed * 1000 + i + the window's seed, which is 0 for the data drive, 100 + w for rollout window w and 99 for the
# start after the rollout; each vehicle draws its scenario from the fleet mix with that seed.
_DATA_WINDOW, _AFTER_ROLLOUT, _FIRST_ROLLOUT_WINDOW = 0, 99, 100
_FIRST_CANARY_WINDOWS = range(101, 104)  # the shadow stage takes the first window


def _first_scenario(route_seed: int) -> Any:
    from driveloop.edge.agent import VehicleAgent

    agent = VehicleAgent("premise", "mix", route_seed)
    try:
        return agent.spec
    finally:
        agent.close()


def test_loop_fixture_routes() -> None:
    """The premise of ``LOOP``: hazards in the data drive, nominal traffic in every rollout window; and of
    ``BAD``: whichever vehicles form the canary cohort, each meets dense traffic in the first canary windows."""
    from driveloop.sim.scenarios import NOMINAL_KINDS

    cfg = _config()
    routes = [cfg.seed * 1000 + i for i in range(cfg.vehicles)]
    data = {_first_scenario(r + _DATA_WINDOW).kind for r in routes}
    assert {"ccrs", "ccrm", "merge"} <= data, data
    windows = [_AFTER_ROLLOUT, *range(_FIRST_ROLLOUT_WINDOW, _FIRST_ROLLOUT_WINDOW + cfg.max_windows)]
    for w in windows:
        for r in routes:
            spec = _first_scenario(r + w)
            assert spec.kind in NOMINAL_KINDS and spec.duration_s >= cfg.window_s, (w, r, spec.name)
    for r in routes:
        assert "dense" in {_first_scenario(r + w).kind for w in _FIRST_CANARY_WINDOWS}, r


def test_reduced_loop_validates_a_candidate_and_completes_its_rollout(loop_run) -> None:
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.registry import Registry
    from driveloop.ota.release import ReleaseService

    home, report = loop_run
    (it,) = report["iterations"]
    assert it["kind"] == "loop" and it["model"] == "1"
    assert it["collisions"] == 0 and it["segments"] > 0
    # segments cataloged, and consumed by the dataset version the pipeline built
    catalog = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}")
    rows = catalog.segments()
    catalog.close()
    assert rows and {r.consumed_by_dataset for r in rows} == {it["pipeline"]["dataset_version"]}
    assert it["pipeline"]["samples"] > it["pipeline"]["hard_samples"] > 0
    # the pipeline's candidate passed the held-out gate: fewer fallback interventions than v1, no collision
    pipe = it["pipeline"]
    gate = pipe["gate"]
    assert pipe["candidate_stage"] == "validated" and gate["passed"] and gate["reasons"] == []
    assert gate["candidate"]["interventions"] < gate["baseline"]["interventions"]
    assert gate["candidate"]["collisions"] == 0
    # the demo ships the validated candidate with the fewest interventions per hour (pipeline or federated)
    validated = [(side["gate"]["candidate"]["interventions_per_hour"], side["candidate"])
                 for side in (pipe, it["federated"]) if side["candidate_stage"] == "validated"]
    assert it["candidate"] == min(validated)[1]
    releases = ReleaseService(home / "ota" / "repo", home / "ota" / "keys", Registry(home / "registry"))
    assert str(it["candidate"]) in {t.model_version for t in releases.releases()}
    # ... and its rollout went through every stage, in order, to completion: the whole fleet runs it
    assert it["rollout_outcome"] == "completed"
    timeline = it["rollout_timeline"]
    assert timeline[-1]["status"] == "completed" and timeline[-1]["decision"] == "complete"
    assert all(w["decision"] in ("hold", "promote") for w in timeline[:-1])
    order = ["shadow", "canary", "50%", "100%"]
    stages = [w["stage"] for w in timeline]
    assert stages == sorted(stages, key=order.index) and {"canary", "50%", "100%"} <= set(stages)
    assert it["fleet_versions_after"] == {str(it["candidate"]): LOOP["vehicles"]}
    assert report["final_drive"]["versions"] == {str(it["candidate"]): LOOP["vehicles"]}
    # where the iteration's time went: every stage it ran, the rollout's window drives inside the rollout, the
    # pipeline and the federated rounds side by side inside ``learn``, and the stages inside the iteration's share
    # of the whole run
    times = it["timings_s"]
    assert set(times) == {"drive", "upload", "learn", "learn.pipeline", "learn.federated", "learn.federated_gate",
                          "rollout", "rollout.drive"}
    assert all(t > 0 for t in times.values()) and times["rollout.drive"] < times["rollout"]
    assert max(times["learn.pipeline"], times["learn.federated"]) + times["learn.federated_gate"] <= times["learn"]
    whole = report["timings_s"]
    assert set(whole) == {"bootstrap", "iterations", "final_drive"}
    assert sum(t for name, t in times.items() if "." not in name) <= whole["iterations"] <= report["seconds"]
    with Registry(home / "registry") as reg:
        assert reg.get(it["candidate"]).stage == "released"
    assert (home / "demo" / "report" / "index.html").exists()
    assert json.loads((home / "demo" / "report" / "report.json").read_text())["iterations"][0]["index"] == 1


# Parts of a row that differ between two runs by design, not by chance:
# - wall-clock durations (the row's and its pipeline's ``timings_s``, and each federated round's ``wall_s`` and
#   ``median_client_s``);
# - content addresses of recordings: a segment's bytes carry the wall-clock time it was recorded
#   (SegmentMeta.recorded_at_unix_s), so its sha256, and the dataset version and training run named after
#   the segments' hashes, are new on every run (the dataset's rows themselves are the same).
def _replayable(row: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(row))
    out.pop("timings_s")
    pipe = out["pipeline"]
    for key in ("timings_s", "dataset_version"):
        pipe.pop(key)
    pipe["training"].pop("run_id")
    for rnd in out["federated"].get("round_log") or ():
        for key in ("wall_s", "median_client_s"):
            rnd.pop(key, None)
    for seg in pipe["mining"]["top_segments"]:
        seg.pop("sha256")
    return out


def _differences(a: Any, b: Any, path: str = "row") -> list[str]:
    """Where two JSON values differ, one line per leaf (so a failure names the field, not a blob)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_reduced_loop_is_reproducible(loop_run, trained_home, tmp_path) -> None:
    """The same seeds from an identical home give the same rows: drives, dataset, training, gates,
    federated round, release and rollout (run twice: the ``loop_run`` fixture, its fleet in 2 shards, one on
    each core, and this one with the whole fleet in one thread: sharding changes no vehicle's drive)."""
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    again = _run(_config(), home, fleet_shards=1)
    first = loop_run[1]
    assert len(again["iterations"]) == len(first["iterations"]) == 1
    for a, b in zip(first["iterations"], again["iterations"]):
        differences = _differences(_replayable(a), _replayable(b))
        assert not differences, "\n".join(differences)
    assert first["final_drive"] == again["final_drive"]


def test_bad_model_is_aborted_in_canary_and_the_fleet_reverts(demo_home) -> None:
    report = _run(_config(**BAD))
    bad = report["iterations"][-1]
    assert bad["kind"] == "bad-model" and bad["rollout_outcome"] == "aborted"
    timeline = bad["rollout_timeline"]
    assert timeline[-1]["stage"] == "canary" and timeline[-1]["decision"] == "abort"
    assert "interventions_per_h" in timeline[-1]["reason"]  # the AEB had to step in for it: the built-in flaw
    assert str(bad["candidate"]) not in bad["fleet_versions_after"]
    assert sum(bad["fleet_versions_after"].values()) == BAD["vehicles"]
    assert str(bad["candidate"]) not in report["final_drive"]["versions"]


_CHILD = f"""
import sys
from driveloop.demo import Demo, DemoConfig
from driveloop.settings import load_settings
cfg = DemoConfig(**{LOOP!r})
Demo(load_settings(), cfg, say=lambda m: print(m, flush=True)).run()
"""


@pytest.mark.parametrize("kill_after_lines", [4, 9])
def test_sigkilled_demo_restarts_cleanly(demo_home, kill_after_lines) -> None:
    """SIGKILL the demo after its Nth progress line (mid-drive, mid-upload or mid-pipeline), run it
    again: it completes, and the registry, catalog, OTA audit chain and TUF repository are intact."""
    import os
    import signal
    import subprocess
    import sys

    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.registry import Registry
    from driveloop.ota.store import FleetStore

    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env={**os.environ, "DRIVELOOP_HOME": str(demo_home)})
    seen = 0
    for _line in child.stdout:  # type: ignore[union-attr]
        seen += 1
        if seen >= kill_after_lines:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=600)
    assert child.returncode == -signal.SIGKILL
    report = _run(_config())
    assert report["iterations"][0]["index"] == 1 and report["iterations"][0]["collisions"] == 0
    with Registry(demo_home / "registry") as reg:
        for manifest, _stage in reg.list():
            reg.verify(manifest.version)  # every blob still matches its manifest
    catalog = Catalog(f"sqlite:///{demo_home / 'cloud' / 'catalog.db'}")
    assert catalog.segments()
    catalog.close()
    assert FleetStore.at(demo_home / "ota").verify_audit().ok


# The reduced shift (issue 18): the world is shifted from the start (``shift_after=0``: one iteration, to keep the
# suite lean), slippery roads join the mix. Its routes (seed 1309) put three of the four vehicles on a slippery
# road in the first data window (``test_shift_fixture_routes``), where the bootstrap model (cloned on dry nominal
# traffic) brakes too late for a braking lead and the AEB, told the road's friction, must step in: the detector
# sees the class far above the fleet's baseline after the first window and opens one campaign, auto-approved.
SHIFT: dict[str, Any] = {**LOOP, "shift": "slippery", "shift_after": 0, "drive_s": 60.0, "shift_windows": 2}


def test_shift_fixture_routes() -> None:
    cfg = _config(**SHIFT)
    routes = [cfg.seed * 1000 + i for i in range(cfg.vehicles)]
    first_window = [_first_scenario_in(r, "mix+slippery").kind for r in routes]
    assert first_window.count("slippery") >= 3, first_window


def _first_scenario_in(route_seed: int, world: str) -> Any:
    from driveloop.edge.agent import VehicleAgent

    agent = VehicleAgent("premise", world, route_seed)
    try:
        return agent.spec
    finally:
        agent.close()


def test_reduced_shift_is_detected_learned_and_rolled_out(trained_home, tmp_path) -> None:
    from driveloop.cloud.catalog import Catalog

    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    report = _run(_config(**SHIFT), home)
    (it,) = report["iterations"]
    assert it["world"] == "mix+slippery" and it["classes"]["slippery"]["interventions"] > 0
    shift = report["shift"]
    assert shift["environment"] == "slippery" and shift["campaign_approved"]
    # one campaign, through the campaign path, auto-approved, and the segments it collected uploaded first
    catalog = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}")
    (campaign,) = catalog.campaigns()
    collected = [r for r in catalog.segments() if "campaign.shift-slippery" in r.meta.events]
    catalog.close()
    assert campaign.id == shift["campaign_id"] and campaign.state == "approved"
    assert collected and all(r.meta.scenario.startswith("slippery") for r in collected)
    # the gate judged the new class beside the old ones; the adapted candidate shipped to the whole fleet
    gate = next(side["gate"] for side in (it["pipeline"], it["federated"]) if side.get("candidate") == it["candidate"])
    assert set(gate["classes"]) == {*LOOP["eval_classes"], "slippery"} and gate["passed"]
    assert "interventions_fall" in gate["classes"]["slippery"]["checks"]
    assert all("interventions_kept" in v["checks"] for c, v in gate["classes"].items() if c != "slippery")
    assert it["rollout_outcome"] == "completed" and shift["old_classes_ok"]
    assert report["final_drive"]["versions"] == {str(it["candidate"]): LOOP["vehicles"]}
    # timed end to end, in order; the new class intervenes less (held-out gate, and the fleet's same routes: the
    # full-size halving is bench/adaptation.py's to measure), with no collision anywhere
    assert 0 < shift["detected_after_s"] <= shift["validated_after_s"] <= shift["adapted_after_s"]
    slippery = gate["classes"]["slippery"]
    assert slippery["candidate"]["interventions_per_hour"] < slippery["baseline"]["interventions_per_hour"]
    assert shift["before_per_hour"] > 0 and shift["after_per_hour"] <= shift["before_per_hour"]
    assert it["collisions"] == 0 and report["final_drive"]["collisions"] == 0
    labels = [w["label"] for w in report["timeline"]]
    assert labels[:2] == ["data drive 1/2", "data drive 2/2"] and labels[-2:] == ["data drive 1/2", "data drive 2/2"]
    assert (home / "demo" / "report" / "adaptation_timeline.png").exists()
