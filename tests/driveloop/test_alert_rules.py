"""The Prometheus alert rules in deploy/prometheus: promtool checks them and runs their unit tests (a
firing and a not-firing case per alert), and every metric they and the Grafana rows name is one the
code really exports (rendered here from the real registries)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; "
                                                             "CI installs it)")
_METRIC = re.compile(r"\b(driveloop_[a-z0-9_]+)")


def _alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    res = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES_DIR, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in res.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    res = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES_DIR, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The tests are not vacuous: moving one alert's threshold past its firing case fails them."""
    for f in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(RULES_DIR / f, tmp_path / f)
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules.read_text().replace("driveloop_stream_consumer_lag) > 10000",
                                               "driveloop_stream_consumer_lag) > 30000"))
    res = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "DriveloopStreamConsumerLag" in res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {str(r["alert"]) for r in _alerts()}
    assert names == {"DriveloopRolloutAborted", "DriveloopInferenceP99High", "DriveloopIngestErrorRatio",
                     "DriveloopStreamConsumerLag", "DriveloopWatchdogRate", "DriveloopFlRoundSkipped"}
    assert firing == names and quiet == names


def _exported(tmp_path: Path) -> set[str]:
    """Metric names in the exposition of the real registries (with a rollout running, so the per-rollout
    families exist), plus the FL text file a real round writes."""
    from prometheus_client import generate_latest

    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.ingest import IngestConfig, create_app
    from driveloop.cloud.logindex import LogIndex
    from driveloop.cloud.store import ObjectStore
    from driveloop.cloud.stream_sinks import StreamMetrics
    from driveloop.federated.fl_metrics import write_round_metrics
    from driveloop.ota.gates import CohortStats, HealthWindow
    from driveloop.ota.metrics import FleetMetrics, FleetSnapshot

    text = ""
    fleet = FleetMetrics(lambda: FleetSnapshot(rollout_id=1, version="2", stage="canary", status="aborted",
                                               cohort_sizes={"canary": 1}, window=HealthWindow(CohortStats(),
                                                                                               CohortStats())))
    fleet.decisions.labels("abort").inc()
    text += fleet.render().decode()
    stream = StreamMetrics()
    stream.consumed.labels("TELEMETRY").inc()
    stream.events.labels("watchdog").inc()
    stream.lag.labels("event-index").set(1)
    text += generate_latest(stream.registry).decode()
    app = create_app(ObjectStore(tmp_path / "store"), Catalog(f"sqlite:///{tmp_path / 'c.db'}"),
                     IngestConfig(staging_dir=tmp_path / "up"), logs=LogIndex(f"sqlite:///{tmp_path / 'l.db'}"))
    import httpx

    from driveloop.cloud.ingest import serve_in_thread

    with serve_in_thread(app) as url:
        httpx.get(f"{url}/healthz")
        text += httpx.get(f"{url}/metrics").text
    text += write_round_metrics(tmp_path / "run", {"rounds": [{"skipped": True, "accepted": 0}]}, 0.0).read_text()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_rules_and_grafana_rows_name_exported_metrics(tmp_path: Path) -> None:
    from driveloop.ota.grafana import ROWS

    (tmp_path / "run").mkdir()
    exported = _exported(tmp_path)
    exprs = [str(r["expr"]) for r in _alerts()] + [expr for _, panels in ROWS for _, expr, *_ in panels]
    used = {m for e in exprs for m in _METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)
