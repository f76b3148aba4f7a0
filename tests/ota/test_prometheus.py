"""PromQL health source: a real Prometheus (Debian `prometheus`, started here on 127.0.0.1, scrape
interval 1 s) scrapes the fleet server's /metrics; the gate reads back exactly the server's numbers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from driveloop.core.exceptions import ConfigError, OtaError
from driveloop.ota.gates import HealthWindow
from driveloop.ota.promql import PromHealthSource, stage_selector, window_from_samples
from driveloop.ota.server import ServerConfig, create_app
from tests.ota.test_server import ADMIN, FakeClock, admin, report, serve_in_thread, write_release

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
POLL_S = 0.2
MAX_POLLS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(cond, what: str):  # type: ignore[no-untyped-def]
    """Wait for an external process to reach a state (bounded number of polls, no timing assertion)."""
    for _ in range(MAX_POLLS):
        got = cond()
        if got:
            return got
        time.sleep(POLL_S)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, object]]:
    if not Path(PROMETHEUS).exists():
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prom")
    prom_url = f"http://127.0.0.1:{free_port()}"
    write_release(tmp / "ota", ["1", "2"])
    clock = FakeClock()
    app = create_app(ServerConfig(tmp / "ota", ADMIN, eval_interval_s=60.0, background_eval=False,
                                  prometheus_url=prom_url), clock=clock)
    url, server, thread = serve_in_thread(app)
    cfg = tmp / "prometheus.yml"
    cfg.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: driveloop-fleet
    metrics_path: /metrics
    static_configs:
      - targets: ["{url.removeprefix('http://')}"]
""")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address={prom_url.removeprefix('http://')}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("wb"))
    try:
        poll(lambda: _ready(prom_url) or proc.poll() is not None, "prometheus to start")
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
        yield url, prom_url, app
    finally:
        proc.terminate()
        proc.wait()
        server.should_exit = True
        thread.join()


def _ready(prom_url: str) -> bool:
    try:
        return httpx.get(f"{prom_url}/-/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_gate_reads_the_same_numbers_through_prometheus(stack: tuple[str, str, object]) -> None:
    url, prom_url, app = stack
    fleet = [f"veh-{i:02d}" for i in range(12)]
    tokens = {v: httpx.post(f"{url}/v1/vehicles", json={"vehicle_id": v}, headers=admin()).json()["token"]
              for v in fleet}
    plan = {"stages": [{"name": "canary", "fraction": 0.5, "min_duration_s": 0.0, "min_evaluations": 1,
                        "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}},
                       {"name": "100%", "fraction": 1.0}]}
    r = httpx.post(f"{url}/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": plan},
                   headers=admin())
    assert r.status_code == 201, r.text
    rid = r.json()["rollout_id"]
    for i, (v, tok) in enumerate(tokens.items()):
        version = httpx.get(f"{url}/v1/update", params={"vehicle": v}, headers=admin(tok)).json()["version"]
        confirmed = httpx.post(f"{url}/v1/installed", json={"vehicle_id": v, "version": version}, headers=admin(tok))
        assert confirmed.status_code == 200, confirmed.text  # only a confirmed install's reports count
        now_s = app.state.service.clock()  # type: ignore[attr-defined]  # windows end at server time, never after
        body = report(v, version, 1, now_s, interventions=i % 3) | {"inference_p99_ms": 5.0 + i / 7}
        r = httpx.post(f"{url}/v1/health", json=body, headers=admin(tok))
        assert r.status_code == 200 and r.json().get("accepted", True), r.text
    service = app.state.service  # type: ignore[attr-defined]
    expected = service.store.stage_window(service.store.load(rid))
    assert expected.canary.vehicles > 0 and expected.control.vehicles > 0
    source = PromHealthSource(prom_url)
    got = poll(lambda: (w := source.stage_window(rid, "canary")) == expected and w, "Prometheus to scrape")
    assert got == expected
    # the server's own evaluation now runs on the PromQL window
    st = httpx.post(f"{url}/v1/rollouts/{rid}/evaluate", headers=admin()).json()
    gate = st["last_decision"]["gate"]
    iv = next(c for c in gate["checks"] if c["name"] == "interventions_per_h")
    assert iv["canary"] == pytest.approx(expected.canary.interventions_per_h)
    assert iv["control"] == pytest.approx(expected.control.interventions_per_h)
    assert st["stage"] == "100%"  # promoted: the PromQL numbers passed the gate
    # what it recorded is what Prometheus returned
    ev = service.store.events(rid)[-1]
    assert HealthWindow.from_dict(ev.data["window"]) == expected


def test_unknown_stage_is_no_data(stack: tuple[str, str, object]) -> None:
    _, prom_url, _ = stack
    assert PromHealthSource(prom_url).stage_window(99, "nope") == HealthWindow()


def test_prometheus_errors_are_clear(stack: tuple[str, str, object]) -> None:
    _, prom_url, _ = stack
    with pytest.raises(OtaError, match="query failed"):
        PromHealthSource(prom_url).query("sum(")
    with pytest.raises(OtaError, match="cannot query"):
        PromHealthSource(f"http://127.0.0.1:{free_port()}", timeout_s=2.0).query("up")
    with pytest.raises(ConfigError):
        PromHealthSource("localhost:9090")


def test_selector_escapes_and_samples_parse() -> None:
    assert 'stage="a\\"b"' in stage_selector(1, 'a"b')
    w = window_from_samples([
        {"metric": {"__name__": "driveloop_ota_health_ticks", "cohort": "canary"}, "value": [0, "6000"]},
        {"metric": {"__name__": "driveloop_ota_health_hours", "cohort": "control"}, "value": [0, "0.5"]},
        {"metric": {"__name__": "driveloop_ota_shadow_disagreements"}, "value": [0, "3"]},
    ])
    assert (w.canary.ticks, w.control.hours, w.shadow.disagreements) == (6000, 0.5, 3)
    with pytest.raises(OtaError):
        window_from_samples([{"metric": {"__name__": "driveloop_ota_health_ticks"}, "value": []}])
