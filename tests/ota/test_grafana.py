"""Grafana provisioning against a local HTTP server speaking the Grafana API endpoints we use
(Grafana itself cannot be installed here): provisioning twice → one data source, one dashboard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from driveloop.cli import main
from driveloop.core.exceptions import ConfigError, OtaError
from driveloop.ota.grafana import DASHBOARD_UID, DATASOURCE_UID, PANELS, ROWS, build_dashboard, provision
from tests.ota.test_server import serve_in_thread

TOKEN = "glsa_test_token"


def fake_grafana() -> tuple[FastAPI, dict[str, Any]]:
    """In-memory Grafana: the endpoints grafana-client calls for provisioning, with Grafana's status codes."""
    db: dict[str, Any] = {"datasources": {}, "dashboards": {}, "calls": []}
    app = FastAPI()

    @app.middleware("http")
    async def auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        db["calls"].append(f"{request.method} {request.url.path}")
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            from fastapi.responses import JSONResponse
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/api/frontend/settings")
    def settings() -> dict[str, Any]:
        return {"buildInfo": {"version": "11.3.0", "commit": "fake"}}

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"database": "ok", "version": "11.3.0"}

    @app.get("/api/datasources/uid/{uid}")
    def get_ds(uid: str) -> dict[str, Any]:
        if uid not in db["datasources"]:
            raise HTTPException(404, "Data source not found")
        return db["datasources"][uid]

    @app.post("/api/datasources")
    def create_ds(body: dict[str, Any]) -> dict[str, Any]:
        if any(d["name"] == body["name"] or d["uid"] == body["uid"] for d in db["datasources"].values()):
            raise HTTPException(409, "data source with the same name or uid already exists")
        body = body | {"id": len(db["datasources"]) + 1, "version": 1}
        db["datasources"][body["uid"]] = body
        return {"datasource": body, "id": body["id"], "message": "Datasource added"}

    @app.put("/api/datasources/uid/{uid}")
    def update_ds(uid: str, body: dict[str, Any]) -> dict[str, Any]:
        if uid not in db["datasources"]:
            raise HTTPException(404, "Data source not found")
        old = db["datasources"][uid]
        db["datasources"][uid] = body | {"id": old["id"], "version": old["version"] + 1}
        return {"datasource": db["datasources"][uid], "message": "Datasource updated"}

    @app.get("/api/dashboards/uid/{uid}")
    def get_dash(uid: str) -> dict[str, Any]:
        if uid not in db["dashboards"]:
            raise HTTPException(404, "Dashboard not found")
        return {"dashboard": db["dashboards"][uid], "meta": {"slug": "rollout"}}

    @app.post("/api/dashboards/db")
    def save_dash(body: dict[str, Any]) -> dict[str, Any]:
        d = body["dashboard"]
        if not d.get("uid") or not d.get("title") or not isinstance(d.get("panels"), list):
            raise HTTPException(400, "bad dashboard")
        old = db["dashboards"].get(d["uid"])
        if old is not None and not body.get("overwrite"):
            raise HTTPException(412, "A dashboard with the same uid already exists")
        version = (old["version"] if old else 0) + 1
        db["dashboards"][d["uid"]] = d | {"version": version, "id": 7}
        return {"id": 7, "uid": d["uid"], "url": f"/d/{d['uid']}/rollout", "status": "success", "version": version}

    @app.get("/api/search")
    def search(dashboardUIDs: str | None = None) -> list[dict[str, Any]]:  # noqa: N803 (Grafana's name)
        return [{"uid": u, "title": d["title"], "type": "dash-db"} for u, d in db["dashboards"].items()
                if dashboardUIDs is None or u == dashboardUIDs]

    return app, db


@pytest.fixture()
def grafana() -> Iterator[tuple[str, dict[str, Any]]]:
    app, db = fake_grafana()
    url, server, thread = serve_in_thread(app)
    yield url, db
    server.should_exit = True
    thread.join()


def test_provision_twice_is_idempotent(grafana: tuple[str, dict[str, Any]]) -> None:
    url, db = grafana
    first = provision(url, TOKEN, "http://127.0.0.1:9090")
    assert (first["datasource"], first["dashboard"]) == ("created", "created")
    assert first["grafana_version"] == "11.3.0"
    second = provision(url, TOKEN, "http://127.0.0.1:9091")
    assert (second["datasource"], second["dashboard"]) == ("updated", "updated")
    assert list(db["datasources"]) == [DATASOURCE_UID] and list(db["dashboards"]) == [DASHBOARD_UID]
    assert db["datasources"][DATASOURCE_UID]["url"] == "http://127.0.0.1:9091"
    assert db["datasources"][DATASOURCE_UID]["version"] == 2 and db["dashboards"][DASHBOARD_UID]["version"] == 2
    hits = httpx.get(f"{url}/api/search", params={"dashboardUIDs": DASHBOARD_UID},
                     headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert len(hits) == 1
    assert second["dashboard_url"] == f"{url}/d/{DASHBOARD_UID}/rollout"


def test_dashboard_is_built_by_the_typed_builder() -> None:
    d = build_dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    charts = [p for p in d["panels"] if p["type"] != "row"]
    assert rows == [title for title, _ in ROWS] == ["Alerts", "Logs"]
    assert d["uid"] == DASHBOARD_UID and len(charts) == len(PANELS) + sum(len(panels) for _, panels in ROWS)
    exprs = [p["targets"][0]["expr"] for p in charts]
    assert "driveloop_ota_cohort_interventions_per_h" in exprs
    assert 'ALERTS{alertstate="firing", alertname=~"Driveloop.*"}' in exprs
    assert "sum by (outcome) (rate(driveloop_ingest_log_lines_total[5m]))" in exprs
    assert all(p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID} for p in charts)
    assert [p["gridPos"]["w"] for p in d["panels"]][:3] == [8, 8, 8]
    assert d["panels"][5]["fieldConfig"]["defaults"]["unit"] == "ms"


def test_bad_token_is_a_clear_error(grafana: tuple[str, dict[str, Any]]) -> None:
    url, db = grafana
    with pytest.raises(OtaError, match="refused"):
        provision(url, "wrong", "http://127.0.0.1:9090")
    assert db["datasources"] == {} and db["dashboards"] == {}


def test_unreachable_and_bad_urls() -> None:
    with pytest.raises(OtaError, match="cannot reach"):
        provision("http://127.0.0.1:9", TOKEN, "http://127.0.0.1:9090", timeout_s=2.0)
    with pytest.raises(ConfigError):
        provision("ftp://x", TOKEN, "http://127.0.0.1:9090")
    with pytest.raises(ConfigError):
        provision("http://127.0.0.1:9", TOKEN, "prometheus:9090")


def test_cli(grafana: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, db = grafana
    for _ in range(2):
        assert main(["ota", "grafana", "--url", url, "--token", TOKEN, "--prometheus-url",
                     "http://127.0.0.1:9090", "--json"]) == 0
    assert '"dashboard": "updated"' in capsys.readouterr().out
    assert len(db["datasources"]) == 1 and len(db["dashboards"]) == 1
    assert main(["ota", "grafana", "--url", url, "--token", "nope"]) == 9
