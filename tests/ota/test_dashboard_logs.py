"""The fleet dashboard's logs panel: ``GET /v1/logs`` over a real log index (filters by vehicle, rollout,
level and words; bad filters are 422; no index is 404), and the page in headless Chromium showing only
the lines its filters select, and re-filtering when a filter is typed in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from driveloop.cloud.log_ingest import LogIngest
from driveloop.cloud.logindex import LogIndex, LogQuery
from driveloop.contracts.logline import LogLine
from tests.ota.test_dashboard_browser import BROWSER_ARGS, CHROMIUM, chromium, needs_chromium
from tests.ota.test_server import Running, start_server


def _line(i: int, vehicle: str, level: str, message: str, **kw: Any) -> LogLine:
    return LogLine.model_validate({"@timestamp": f"2030-01-01T00:00:{i:02d}.000Z", "log.level": level,
                                   "service.name": "vehicle", "message": message, "vehicle.id": vehicle,
                                   "event.sequence": i, **kw})


LINES = [
    _line(1, "veh-001", "info", "cruising at 27 m/s"),
    _line(2, "veh-002", "info", "aeb activation at t=4.1 s: ttc 1.2 s", **{"event.action": "aeb",
                                                                             "model.version": "2", "rollout.id": 1}),
    _line(3, "veh-002", "warning", "collision in dense seed=3", **{"event.action": "collision", "rollout.id": 1}),
    _line(4, "veh-003", "warning", "watchdog activation: model process is dead", **{"event.action": "watchdog"}),
]


@pytest.fixture(scope="module")
def logs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("dashlogs")
    index = LogIndex(f"sqlite:///{tmp / 'logs.db'}")
    LogIngest(index).accept(None, LINES)

    def search(text: str, vehicle: str | None, level: str | None, rollout_id: int | None,
               limit: int) -> list[dict[str, Any]]:
        return index.search(LogQuery(text=text, vehicle=vehicle, level=level, rollout_id=rollout_id, limit=limit))

    with start_server(tmp, logs=search) as srv:
        yield srv
    index.close()


@pytest.mark.parametrize(("params", "messages"), [
    ({}, [m.message for m in reversed(LINES)]),
    ({"vehicle": "veh-002"}, ["collision in dense seed=3", "aeb activation at t=4.1 s: ttc 1.2 s"]),
    ({"level": "warning"}, ["watchdog activation: model process is dead", "collision in dense seed=3"]),
    ({"rollout": 1, "level": "warning"}, ["collision in dense seed=3"]),
    ({"q": "aeb OR watchdog"}, ["watchdog activation: model process is dead", "aeb activation at t=4.1 s: ttc 1.2 s"]),
    ({"q": "aeb", "vehicle": "veh-003"}, []),
])
def test_logs_endpoint_filters(logs_server: Running, params: dict[str, Any], messages: list[str]) -> None:
    r = httpx.get(f"{logs_server.url}/v1/logs", params=params)
    assert r.status_code == 200
    assert [x["message"] for x in r.json()["lines"]] == messages


@pytest.mark.parametrize("params", [{"vehicle": "../etc"}, {"level": "loud"}, {"rollout": 0}, {"limit": 5000},
                                    {"q": "x" * 2000}])
def test_bad_filters_are_422(logs_server: Running, params: dict[str, Any]) -> None:
    r = httpx.get(f"{logs_server.url}/v1/logs", params=params)
    assert r.status_code == 422 and "error" in r.json()


def test_no_index_is_404(tmp_path: Path) -> None:
    with start_server(tmp_path) as srv:
        r = httpx.get(f"{srv.url}/v1/logs")
    assert r.status_code == 404 and "no log index" in r.json()["error"]


@needs_chromium
def test_logs_panel_renders_the_filtered_lines(logs_server: Running, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", f"{logs_server.url}/?vehicle=veh-002&level=warning")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<tr class="level-warning" data-vehicle="veh-002">' in html
    assert "<td>collision in dense seed=3</td>" in html
    assert "veh-003" not in html and "cruising" not in html and "aeb activation" not in html
    assert '1 newest' in html


@needs_chromium
def test_logs_panel_refilters_when_typed_in(logs_server: Running) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{logs_server.url}/")
            page.wait_for_selector("#logs tbody tr")
            assert page.locator("#logs tbody tr").count() == len(LINES)
            page.fill("#log-q", "aeb OR watchdog")
            page.dispatch_event("#log-q", "change")
            page.wait_for_function("document.querySelectorAll('#logs tbody tr').length === 2")
            page.select_option("#log-level", "warning")
            page.wait_for_function("document.querySelectorAll('#logs tbody tr').length === 1")
            assert page.locator("#logs tbody tr td").nth(2).inner_text() == "veh-003"
        finally:
            browser.close()
