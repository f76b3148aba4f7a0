"""The dashboard in a real headless Chromium, mid-rollout: the page's JS must have fetched the JSON and
filled in the stage, cohort counts, health chart and timeline. Saves docs/dashboard.png."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.ota.test_server import FLEET, Fleet, admin, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[2] / "docs"
PLAN = {"stages": [
    {"name": "shadow", "fraction": 0.2, "shadow": True, "min_duration_s": 0.0, "min_evaluations": 1,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1, "min_shadow_ticks": 100}},
    {"name": "canary", "fraction": 0.2, "min_duration_s": 0.0, "min_evaluations": 2,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}},
    {"name": "50%", "fraction": 0.5, "min_duration_s": 0.0, "min_evaluations": 3,
     "tolerances": {"min_vehicles": 2, "min_hours": 0.1, "min_control_hours": 0.1}},
    {"name": "100%", "fraction": 1.0, "min_duration_s": 0.0, "min_evaluations": 1},
]}


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
                           "--virtual-time-budget=6000", "--window-size=1400,1000", *args],
                          capture_output=True, text=True, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_dashboard_renders_mid_rollout(tmp_path: Path) -> None:
    with start_server(tmp_path) as srv:
        tokens = {v: httpx.post(f"{srv.url}/v1/vehicles", json={"vehicle_id": v}, headers=admin()).json()["token"]
                  for v in FLEET}
        fleet = Fleet(srv, tokens)
        fleet.window()
        r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "v2", "previous_version": "v1", "plan": PLAN},
                       headers=admin())
        rid = r.json()["rollout_id"]
        for _ in range(6):
            fleet.window()
            if httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["stage"] == "50%":
                break
        fleet.window()  # one healthy window inside 50 %: mid-rollout, still held
        status = httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()
        assert (status["stage"], status["status"]) == ("50%", "running")
        view = httpx.get(f"{srv.url}/v1/dashboard").json()

        dom = chromium(tmp_path, "--dump-dom", f"{srv.url}/")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert re.search(r'<li class="current" data-stage="50%">50% \(50%\)</li>', html), html[:3000]
        assert "running · stage 50%" in html
        assert f"#{rid}: v1 → v2" in html
        assert f"{len(FLEET)} vehicles · 2 model versions" in html
        for cohort, n in view["cohort_sizes"].items():
            assert f"<td>{cohort}</td><td>{n}</td>" in html
        # canary lines start once the canary had vehicles (shadow windows are gaps, not zeros)
        assert re.search(r'<polyline points="[0-9., ]+" [^>]*class="series-canary" data-metric="interventions_per_h"',
                         html)
        assert 'data-metric="p99_ms"' in html
        assert "health gate passed in canary" in html and "audit chain verified" in html

        DOCS.mkdir(exist_ok=True)
        shot = tmp_path / "dashboard.png"
        res = chromium(tmp_path, f"--screenshot={shot}", f"{srv.url}/")
        assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.copyfile(shot, DOCS / "dashboard.png")
