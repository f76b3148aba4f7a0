"""The built-in rollout dashboard: ``/`` serves a static page (``ota/static``: plain HTML, JS, CSS,
inline SVG charts, nothing loaded from outside) that polls ``GET /v1/dashboard`` every 2 s.

The JSON view gathers what an operator needs in one request: the rollout and its stages, cohort
sizes, fleet share per model version, per-cohort health after every evaluation (from the event
log), the decision timeline (from the audit log, with its chain verified) and update outcomes.
Operator buttons call the admin endpoints with the token typed into the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from driveloop.core.ids import VEHICLE_ID_PATTERN
from driveloop.ota.gates import CohortStats, HealthWindow

if TYPE_CHECKING:
    from driveloop.ota.server import FleetService, LogSearch

STATIC_DIR = Path(__file__).with_name("static")
TIMELINE_MAX = 60
LOGS_PANEL_LINES = 50

__all__ = ["register_dashboard", "dashboard_view", "STATIC_DIR"]


def _cohort(c: CohortStats) -> dict[str, Any]:
    return {"vehicles": c.vehicles, "hours": round(c.hours, 4), "interventions_per_h": round(c.interventions_per_h, 4),
            "p99_ms": round(c.p99_ms, 3), "collisions": c.collisions, "crashes": c.crashes,
            "deadline_miss_rate": round(c.deadline_miss_rate, 6)}


def dashboard_view(service: FleetService) -> dict[str, Any]:
    """Everything the page shows, as plain JSON."""
    store = service.store
    snap = service.snapshot()
    view: dict[str, Any] = {"now_s": service.clock(), "fleet_versions": snap.fleet_versions,
                            "update_outcomes": snap.update_outcomes, "cohort_sizes": snap.cohort_sizes,
                            "vehicles": sum(snap.fleet_versions.values()), "rollout": None, "stages": [],
                            "series": [], "timeline": [], "audit_ok": True}
    if snap.rollout_id is None:
        return view
    r = store.load(snap.rollout_id)
    view["rollout"] = service.status(snap.rollout_id).model_dump()
    done = r.state.status.value == "completed"
    view["stages"] = [{"name": s.name, "fraction": s.fraction, "shadow": s.shadow,
                       "state": "done" if done or i < r.state.stage_index else
                       ("current" if i == r.state.stage_index else "pending")}
                      for i, s in enumerate(r.plan.stages)]
    for e in store.events(snap.rollout_id):
        if e.kind == "evaluate":
            w = HealthWindow.from_dict(e.data["window"])
            view["series"].append({"at_s": e.at_s, "stage": e.data.get("stage", ""), "canary": _cohort(w.canary),
                                   "control": _cohort(w.control)})
    entries = store.audit_entries(snap.rollout_id)
    view["timeline"] = [{"seq": a.seq, "at_s": a.at_s, "kind": a.kind, "actor": a.actor,
                         "action": a.payload.get("action", a.kind), "stage": a.payload.get("stage", ""),
                         "reason": a.payload.get("reason", "")} for a in entries[-TIMELINE_MAX:]][::-1]
    view["audit_ok"] = store.verify_audit().ok
    return view


def register_dashboard(app: FastAPI, service: FleetService, logs: LogSearch | None = None) -> None:
    """The page, its JSON view, and ``GET /v1/logs`` for its logs panel (``q``, ``vehicle``, ``rollout``,
    ``level``, ``limit``; 404 when the server was started without a log index). Like the rest of the
    dashboard it is a read: the lines in the index carry no secrets (``core/logfmt.py`` redacts them)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/logs")
    def log_lines(q: str = Query("", max_length=1024), vehicle: str | None = Query(None, pattern=VEHICLE_ID_PATTERN),
                  rollout: int | None = Query(None, ge=1, le=2**31 - 1),
                  level: Literal["debug", "info", "warning", "error", "critical"] | None = None,
                  limit: int = Query(LOGS_PANEL_LINES, ge=1, le=1000)) -> dict[str, Any]:
        if logs is None:
            from driveloop.ota.server import NotFound

            raise NotFound("this fleet server has no log index (start it with `driveloop ota serve`)")
        return {"lines": logs(q, vehicle or None, level, rollout, limit)}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/v1/dashboard")
    def dashboard() -> dict[str, Any]:
        return dashboard_view(service)
