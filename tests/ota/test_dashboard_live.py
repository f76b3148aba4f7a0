"""The dashboard's live panel in a real headless Chromium over a real nats-server: the road strip shows the 3
vehicles (the one in fallback in its own colour) and the cloud's signed hazard (not the forged one), the
screenshot goes to the test's temp folder, and a vehicle's next telemetry moves its mark through the page's
EventSource. Without a data plane the panel says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ota.test_dashboard_browser import BROWSER_ARGS, CHROMIUM, chromium, needs_chromium
from tests.ota.test_live_feed import VEHICLES, LivePlane, live_fleet_server, wait_for
from tests.ota.test_server import Running, start_server


@pytest.fixture(scope="module")
def live_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, LivePlane]]:
    with live_fleet_server(tmp_path_factory.mktemp("dashlive")) as running:
        yield running


@needs_chromium
def test_live_panel_shows_vehicles_and_hazard_and_follows_a_move(live_srv: tuple[Running, LivePlane],
                                                                tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    srv, plane = live_srv
    wait_for(srv.url, lambda v: len(v["vehicles"]) == 3 and len(v["hazards"]) == 1, "3 vehicles and a hazard")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{srv.url}/")
            page.wait_for_selector('#live-roads svg[data-road="hw1"] g.live-hazard')
            page.wait_for_function("document.querySelectorAll('#live-roads g.live-vehicle').length === 3")
            marks = {g.get_attribute("data-vehicle"): (float(g.get_attribute("data-x") or "nan"),
                                                       g.get_attribute("data-mode"),
                                                       g.locator("circle").get_attribute("fill"))
                     for g in page.locator("#live-roads g.live-vehicle").all()}
            assert marks == {vid: (x, mode, "#d64545" if mode == "fallback" else "#2f6fde")
                             for vid, (x, mode) in VEHICLES.items()}
            hazards = page.locator("#live-roads g.live-hazard")
            assert hazards.count() == 1 and hazards.get_attribute("data-action") == "cloud/1"
            label = page.text_content("#live-roads .live-hazard-label") or ""
            assert label.startswith("dangerousEndOfQueue · ") and 0 < int(label.split("· ")[1].split(" s")[0]) <= 300
            assert page.inner_text('#live-hazards tr[data-action="cloud/1"] td:nth-child(5)') == "600–1250"
            assert page.inner_text("#live-status").startswith("3 vehicles · 1 active hazards")
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True)  # the test's own folder
            assert (tmp_path / "live.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # a live update: veh-002 (between the others, so the strip's scale stays) drives on and leaves
            # fallback; its mark moves right without a reload
            x_before = float(page.locator('g.live-vehicle[data-vehicle="veh-002"] circle').get_attribute("cx") or "nan")
            to_x = VEHICLES["veh-002"][0] + 200.0
            plane.drive("veh-002", to_x, "model")
            page.wait_for_selector(f'g.live-vehicle[data-vehicle="veh-002"][data-x="{to_x:g}"]')
            moved = page.locator('g.live-vehicle[data-vehicle="veh-002"]')
            assert (moved.get_attribute("data-mode"), moved.locator("circle").get_attribute("fill")) == \
                ("model", "#2f6fde")
            assert float(moved.locator("circle").get_attribute("cx") or "nan") > x_before
            assert page.inner_text('#live-vehicles tr[data-vehicle="veh-002"] td:nth-child(3)') == f"{to_x:.1f}"
        finally:
            browser.close()


@needs_chromium
def test_live_panel_without_a_data_plane(tmp_path: Path) -> None:
    with start_server(tmp_path) as srv:
        dom = chromium(tmp_path, "--dump-dom", f"{srv.url}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<span id="live-status" class="muted">no live data plane configured</span>' in dom.stdout
    assert '<section class="card wide off" id="live-card">' in dom.stdout
