"""The reduced demo, end to end: real simulator, ONNX Runtime, Ray pipeline, TUF release, fleet server,
A/B updates and rollout gates — asserting the loop's outputs, then a deliberately bad model's abort."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def demo_home(trained_home, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    return home


def _config(**kw):
    from driveloop.demo import DemoConfig

    base = dict(iterations=1, vehicles=4, drive_s=20.0, window_s=12.0, max_windows=10, fl_rounds=1, port=0,
                eval_duration_s=12.0, finetune_epochs=2, eval_classes=("highway", "cut-in", "ccrs"))
    base.update(kw)
    return DemoConfig(**base)


def _run(config):
    from driveloop.demo import Demo
    from driveloop.settings import load_settings

    return Demo(load_settings(), config, say=lambda m: None).run()


def test_reduced_demo_closes_the_loop(demo_home) -> None:
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.registry import Registry
    from driveloop.ota.release import ReleaseService

    report = _run(_config())
    it = report["iterations"][0]
    assert it["collisions"] == 0 and it["segments"] > 0
    # segments cataloged, and consumed by the dataset version the pipeline built
    catalog = Catalog(f"sqlite:///{demo_home / 'cloud' / 'catalog.db'}")
    rows = catalog.segments()
    catalog.close()
    assert rows and any(r.consumed_by_dataset for r in rows)
    assert it["pipeline"]["dataset_version"] and it["pipeline"]["samples"] > 0
    # a candidate was gated (validated or rejected, with the gate's numbers)
    cand = it["pipeline"]["candidate"]
    assert cand is not None and it["pipeline"]["gate"]["baseline"] and it["pipeline"]["gate"]["candidate"]
    with Registry(demo_home / "registry") as reg:
        stage = dict((m.version, st) for m, st in reg.list())[cand]
    assert stage in ("validated", "rejected", "released")
    if it["candidate"] is not None:  # a validated candidate was signed and rolled out with live gates
        releases = ReleaseService(demo_home / "ota" / "repo", demo_home / "ota" / "keys", Registry(demo_home / "registry"))
        assert str(it["candidate"]) in {t.model_version for t in releases.releases()}
        assert it["rollout_timeline"] and it["rollout_outcome"] in ("completed", "aborted", "stalled")
        if it["rollout_outcome"] == "completed":
            assert it["fleet_versions_after"] == {str(it["candidate"]): 4}
    assert (demo_home / "demo" / "report" / "index.html").exists()
    assert json.loads((demo_home / "demo" / "report" / "report.json").read_text())["iterations"][0]["index"] == 1


def test_bad_model_is_aborted_in_canary_and_the_fleet_reverts(demo_home) -> None:
    # the demo's own fleet size: its 25 % canary cohort is car000, car001 and car007
    report = _run(_config(iterations=1, inject_bad_model=True, vehicles=8, drive_s=12.0, window_s=15.0,
                          max_windows=12))
    bad = report["iterations"][-1]
    assert bad["kind"] == "bad-model" and bad["rollout_outcome"] == "aborted"
    stages = [w["stage"] for w in bad["rollout_timeline"]]
    assert stages[-1] == "canary"
    assert str(bad["candidate"]) not in bad["fleet_versions_after"]
    assert sum(bad["fleet_versions_after"].values()) == 8


_CHILD = """
import sys
from driveloop.demo import Demo, DemoConfig
from driveloop.settings import load_settings
cfg = DemoConfig(iterations=1, vehicles=4, drive_s=20.0, window_s=12.0, max_windows=10, fl_rounds=1, port=0,
                 eval_duration_s=12.0, finetune_epochs=2, eval_classes=("highway", "cut-in", "ccrs"))
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
