"""The dashboard in a real headless Chromium, mid-rollout: the page's JS must have fetched the JSON and
filled in the stage, cohort counts, health chart and timeline. The screenshot goes to the test's temp
folder; the documentation's picture (docs/dashboard.png) is made by ``scripts/dashboard_screenshot.py``
from the same mid-rollout server (:func:`mid_rollout_server`)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ota.test_server import ADMIN, FLEET, Fleet, Running, admin, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="chromium is not installed (Debian: apt-get install chromium)")


def screenshot(tmp: Path, url: str, out: Path) -> None:
    """A PNG of the page at ``url`` (rendered by headless Chromium) at ``out``; asserts it is one."""
    res = chromium(tmp, f"--screenshot={out}", url)
    assert res.returncode == 0 and out.stat().st_size > 10_000, res.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def mid_rollout_server(tmp: Path) -> Iterator[tuple[Running, int]]:
    """A fleet server (state under ``tmp``) with a rollout held in its 50 % stage after healthy shadow and
    canary stages: what the tests render, and what the documentation's picture shows."""
    with start_server(tmp) as srv:
        tokens = {v: httpx.post(f"{srv.url}/v1/vehicles", json={"vehicle_id": v}, headers=admin()).json()["token"]
                  for v in FLEET}
        fleet = Fleet(srv, tokens)
        fleet.window()
        r = httpx.post(f"{srv.url}/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": PLAN},
                       headers=admin())
        rid = r.json()["rollout_id"]
        for _ in range(6):
            fleet.window()
            if httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["stage"] == "50%":
                break
        fleet.window()  # one healthy window inside 50 %: mid-rollout, still held
        yield srv, rid


@pytest.fixture(scope="module")
def mid_rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, int]]:
    with mid_rollout_server(tmp_path_factory.mktemp("dash")) as running:
        yield running


@needs_chromium
def test_dashboard_renders_mid_rollout(mid_rollout: tuple[Running, int], tmp_path: Path) -> None:
    srv, rid = mid_rollout
    status = httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()
    assert (status["stage"], status["status"]) == ("50%", "running")
    view = httpx.get(f"{srv.url}/v1/dashboard").json()

    dom = chromium(tmp_path, "--dump-dom", f"{srv.url}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'<li class="current" data-stage="50%">50% \(50%\)</li>', html), html[:3000]
    assert "running · stage 50%" in html
    assert f"#{rid}: 1 → 2" in html
    assert f"{len(FLEET)} vehicles · 2 model versions" in html
    for cohort, n in view["cohort_sizes"].items():
        assert f"<td>{cohort}</td><td>{n}</td>" in html
    # canary lines start once the canary had vehicles (shadow windows are gaps, not zeros)
    assert re.search(r'<polyline points="[0-9., ]+" [^>]*class="series-canary" data-metric="interventions_per_h"',
                     html)
    assert 'data-metric="p99_ms"' in html
    assert "health gate passed in canary" in html and "audit chain verified" in html

    screenshot(tmp_path, f"{srv.url}/", tmp_path / "dashboard.png")  # the test's own folder, never docs/


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@needs_chromium
def test_operator_controls_in_the_page(mid_rollout: tuple[Running, int]) -> None:
    """Type a token into the page and click: a wrong token is refused (state unchanged), the right one
    pauses and resumes the rollout on the server; the page shows the outcome and re-renders."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    srv, rid = mid_rollout
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{srv.url}/")
            page.wait_for_selector('li.current[data-stage="50%"]')
            page.fill("#token", "not-the-admin-token")
            page.click('button[data-action="pause"]')
            page.wait_for_function("document.getElementById('action-result').textContent.length > 0")
            assert page.inner_text("#action-result") == "pause refused: invalid admin token"
            assert httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["status"] == "running"

            page.fill("#token", ADMIN)
            page.click('button[data-action="pause"]')
            page.wait_for_function("document.getElementById('action-result').textContent.startsWith('pause: ok')")
            assert httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["status"] == "paused"
            page.wait_for_selector("#rollout-status.paused")
            assert page.inner_text("#rollout-status") == "paused · stage 50%"
            assert "pause from the dashboard" in page.inner_text("#timeline")

            page.click('button[data-action="resume"]')
            page.wait_for_function("document.getElementById('action-result').textContent.startsWith('resume: ok')")
            assert httpx.get(f"{srv.url}/v1/rollouts/{rid}").json()["status"] == "running"
        finally:
            browser.close()
