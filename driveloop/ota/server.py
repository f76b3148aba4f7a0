"""The fleet server (``driveloop ota serve``): health in, update offers out, rollouts steered by operators.

- Vehicles authenticate with their own token (``Authorization: Bearer …``; only its sha256 is stored):
  ``POST /v1/health``, ``GET /v1/update?vehicle=…`` and ``POST /v1/installed`` (the version its updater
  installed and booted; accepted only for what the director assigned it). A health report counts only
  where :func:`driveloop.ota.admission.admit` accepts it (confirmed version, window checked against the
  server's clock); a rejected one answers ``accepted: false`` with its reason and is counted
  (``driveloop_fleet_health_rejected_total``), logged and audited.
- Operators use a named admin token (the name is the audit's actor): ``POST /v1/vehicles`` (enrol →
  token), ``POST /v1/vehicles/{id}/disable|enable|rotate`` (revocation, effective on the vehicle's next
  request), ``POST /v1/rollouts`` (start, only for a version released in the TUF repository),
  ``POST /v1/rollouts/{id}/pause|resume|promote|abort|evaluate``. Reads (``GET /v1/rollouts/{id}``, the
  dashboard) need no token.
- TUF metadata and targets are served as static files from ``<ota_dir>/repo`` (``/tuf/…``, with
  HTTP Range for resumable downloads); ``/metrics`` for Prometheus; the dashboard at ``/``.
- With ``ServerConfig.live`` (a broker), the dashboard's live panel: ``GET /v1/live`` and the server-sent
  events of ``GET /v1/live/events`` (``ota/live_feed.py``; the view's rules in ``ota/live.py``).
- The director (Uptane): ``GET /v1/update`` also signs the vehicle's assignment into its director
  repository (``ota/director_repo.py``), served from ``<ota_dir>/director/vehicles`` at
  ``/director/<vehicle_id>/metadata/…``; the offer itself is an unsigned hint.

Each health report may trigger an evaluation (at most one per ``eval_interval_s`` of the injected
clock); a background task evaluates on the same period so a silent fleet still gets decisions.
Every request that fails leaves the state unchanged and gets a 4xx ``{"error": "…"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client import Counter
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from driveloop.contracts.fleet import (
    HealthReport,
    InstallConfirmation,
    OperatorRequest,
    RolloutStart,
    RolloutStatus,
    StageView,
    UpdateCheck,
    UpdateOffer,
    VehicleCredential,
    VehicleEnrol,
    VehicleState,
)
from driveloop.core.exceptions import (
    AuthError,
    ConfigError,
    DriveloopError,
    OtaError,
    RolloutStateError,
    StaleReportError,
)
from driveloop.core.logfmt import log_event
from driveloop.core.tokens import DEFAULT_ADMIN_NAME, AdminTokens, parse_bearer
from driveloop.ota.controller import OPERATOR_ACTIONS, OperatorAction, RolloutEvent, RolloutPlan, apply, decide
from driveloop.ota.admission import AdmissionPolicy
from driveloop.ota.director import assign, assign_fleet, fleet_share
from driveloop.ota.gates import HealthWindow
from driveloop.ota.live_feed import LiveSource
from driveloop.ota.metrics import PREFIX, FleetMetrics, FleetSnapshot
from driveloop.ota.store import FleetStore, Rollout

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # health reports and operator requests are < 2 KiB

__all__ = ["ServerConfig", "create_app", "FleetService", "NotFound", "released_versions"]


class NotFound(Exception):
    """An HTTP-layer signal (404), not a driveloop error: the addressed rollout does not exist."""


class HealthSource(Protocol):
    def window(self, rollout: Rollout) -> HealthWindow: ...


class LogSearch(Protocol):
    """The cloud's log index as the fleet server reads it (``ota`` never imports ``cloud``: the top layer
    hands in an adapter): newest first, ECS objects."""

    def __call__(self, text: str, vehicle: str | None, level: str | None, rollout_id: int | None,
                 limit: int) -> list[dict[str, Any]]: ...


def released_versions(repo_dir: Path) -> set[str]:
    """Model versions published as TUF targets (custom ``model_version`` of ``…/model.onnx`` targets) in
    the newest targets metadata of the repository. The server is the trusted side: no signature check."""
    from tuf.api.metadata import Metadata

    md_dir = repo_dir / "metadata"
    files = sorted(md_dir.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])) if md_dir.exists() \
        else []
    if not files:
        return set()
    try:
        targets = Metadata.from_file(str(files[-1])).signed.targets  # type: ignore[attr-defined]
    except Exception as e:  # tuf raises several unrelated types for unreadable metadata
        raise OtaError(f"cannot read TUF targets metadata {files[-1]}: {e}") from e
    return {str(t.unrecognized_fields.get("custom", {}).get("model_version")) for p, t in targets.items()
            if p.endswith("/model.onnx")}


class FleetService:
    """Glue between the HTTP layer, the store and the pure controller/director. The store's write lock
    (its thread lock, and on PostgreSQL an advisory lock shared by every replica of this server)
    serialises every read-decide-append, so concurrent requests cannot interleave decisions."""

    def __init__(self, store: FleetStore, clock: Callable[[], float], eval_interval_s: float,
                 source: HealthSource | None = None, released: Callable[[], set[str]] | None = None,
                 director: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.eval_interval_s = eval_interval_s
        self.source = source
        self.released = released
        self.director = director  # ota.director_repo.DirectorRepo: signs each vehicle's assignment
        self.metrics = FleetMetrics(self.snapshot)
        self.rejected = Counter(f"{PREFIX}_health_rejected", "Health reports rejected, by reason.", ["reason"],
                                registry=self.metrics.registry)

    def _rollout(self, rollout_id: int) -> Rollout:
        latest = self.store.latest_rollout_id()
        if latest is None or not 1 <= rollout_id <= latest:
            raise NotFound(f"no rollout {rollout_id}")
        return self.store.load(rollout_id)

    def enrol(self, req: VehicleEnrol, actor: str = "local") -> VehicleCredential:
        token = self.store.enrol(req.vehicle_id, req.hardware_class, self.clock(), actor)
        logger.info("enrolled vehicle %s (%s) by %s", req.vehicle_id, req.hardware_class, actor)
        return VehicleCredential(vehicle_id=req.vehicle_id, token=token)

    def vehicle_action(self, vehicle_id: str, action: str, actor: str) -> VehicleState:
        """Disable, enable or rotate the token of an enrolled vehicle (see ``FleetStore.vehicle_action``)."""
        if vehicle_id not in self.store.vehicle_ids():
            raise NotFound(f"no vehicle {vehicle_id}")
        token = self.store.vehicle_action(vehicle_id, action, self.clock(), actor)
        enabled = next(v["enabled"] for v in self.store.vehicles() if v["vehicle_id"] == vehicle_id)
        return VehicleState(vehicle_id=vehicle_id, enabled=enabled, token=token)

    def start(self, req: RolloutStart, actor: str) -> RolloutStatus:
        if self.released is not None and req.version not in self.released():
            raise OtaError(f"version {req.version} is not released (run `driveloop ota release {req.version}`)")
        try:
            plan = RolloutPlan.from_dict(req.plan.to_plan_dict()) if req.plan is not None else RolloutPlan.default()
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # the plan's rules are the controller's
            raise ConfigError(f"bad rollout plan: {e}") from e
        rid = self.store.create_rollout(req.version, req.previous_version, plan, self.clock(), actor)
        self.metrics.decisions.labels("start").inc()
        log_event(logger, logging.INFO, "rollout.start", "rollout %d started: %s (previous %s)", rid, req.version,
                  req.previous_version, rollout_id=rid, model_version=req.version)
        return self.status(rid)

    def operate(self, rollout_id: int, kind: str, req: OperatorRequest, actor: str) -> RolloutStatus:
        """``actor``: the admin token's name (over HTTP) or ``local:<user>`` (the CLI on the store)."""
        self._rollout(rollout_id)  # 404 for an unknown one
        with self.store.writing() as c:  # read, apply, append: one transaction, one replica at a time
            r = self.store.load_in(c, rollout_id)
            at = max(self.clock(), r.state.last_event_s)
            new = apply(r.state, r.plan, OperatorAction(kind, at, actor, req.reason))  # raises → unchanged
            self.store.append_in(c, rollout_id, RolloutEvent("operator", at, {"kind": kind, "actor": actor,
                                                                               "reason": req.reason}),
                                 "operator", actor, {"action": kind, "reason": req.reason,
                                                     "stage": new.stage(r.plan).name, "status": new.status.value})
        self.metrics.decisions.labels(kind).inc()
        log_event(logger, logging.WARNING, f"rollout.{kind}", "rollout %d: %s by %s (%s)", rollout_id, kind, actor,
                  req.reason or "no reason", rollout_id=rollout_id)
        return self.status(rollout_id)

    def confirm(self, req: InstallConfirmation) -> dict[str, Any]:
        r = self.store.latest()
        self.store.confirm_install(req.vehicle_id, req.version, r.state.rollout_id if r else None, self.clock())
        return {"confirmed": req.version}

    def ingest(self, report: HealthReport) -> dict[str, Any]:
        rejected, outcome = self.store.record_health(report, self.store.latest(), self.clock())
        if rejected is not None:
            self.rejected.labels(rejected).inc()
            logger.warning("health report %d from %s rejected: %s", report.seq, report.vehicle_id, rejected)
            return {"accepted": False, "seq": report.seq, "reason": rejected}
        d = self.evaluate()
        return {"accepted": True, "seq": report.seq, "update_outcome": outcome,
                "decision": d.to_dict() if d is not None else None}

    def window(self, r: Rollout) -> HealthWindow:
        return self.source.window(r) if self.source is not None else self.store.stage_window(r)

    def evaluate(self, force: bool = False) -> Any:
        """Run the controller on the current stage if an evaluation is due (or ``force``).

        Read, decide and append are one transaction under the store's write lock, which every replica
        of the server shares (PostgreSQL): a replica that waited for another's decision sees it and finds
        the next evaluation not yet due, so each evaluation is decided once; a replica that dies before
        its commit leaves nothing, and the next due evaluation (any replica's) decides instead."""
        with self.store.writing() as c:
            r = self.store.latest_in(c)
            if r is None or not r.state.active:
                return None
            now = self.clock()
            if not force and now - r.state.last_event_s < self.eval_interval_s:
                return None
            now = max(now, r.state.last_event_s)
            window = self.window(r)
            _, d = decide(r.state, r.plan, window, now)
            self.store.append_in(c, r.state.rollout_id, RolloutEvent("evaluate", now, {"window": window.to_dict(),
                                                                                "stage": d.stage}),
                                 "decision", "controller", d.to_dict())
        self.metrics.decisions.labels(d.action.value).inc()
        log_event(logger, logging.WARNING if d.action.value == "abort" else logging.INFO, f"rollout.{d.action.value}",
                  "rollout %d %s: %s %s", r.state.rollout_id, d.stage, d.action.value, d.reason,
                  rollout_id=r.state.rollout_id, model_version=r.state.version)
        return d

    def offer(self, vehicle_id: str) -> UpdateOffer:
        r = self.store.latest()
        if r is None:
            self._sign_assignment(vehicle_id, None, None)
            return UpdateOffer(vehicle_id=vehicle_id, version=None, reason="no rollout")
        a = assign(r.state, r.plan, vehicle_id)
        self.store.record_assignment(vehicle_id, r.state.rollout_id, a.version)
        self._sign_assignment(vehicle_id, a.version, a.shadow_version)
        return UpdateOffer(vehicle_id=vehicle_id, version=a.version, shadow_version=a.shadow_version,
                           rollout_id=r.state.rollout_id, stage=r.state.stage(r.plan).name, reason=a.reason)

    def _sign_assignment(self, vehicle_id: str, version: str | None, shadow_version: str | None) -> None:
        """Uptane: a vehicle installs what the director signs for it (and the image repository agrees
        with), never the unsigned offer; its repository is served at ``/director/<vehicle_id>/``."""
        if self.director is not None:
            self.director.assign(vehicle_id, version, shadow_version)

    def status(self, rollout_id: int) -> RolloutStatus:
        r = self._rollout(rollout_id)
        st, plan = r.state, r.plan
        return RolloutStatus(
            rollout_id=st.rollout_id, version=st.version, previous_version=st.previous_version,
            status=st.status.value, stage=st.stage(plan).name, stage_index=st.stage_index,
            stages=[StageView(name=s.name, fraction=s.fraction, shadow=s.shadow) for s in plan.stages],
            stage_entered_s=st.stage_entered_s, evaluations_in_stage=st.evaluations_in_stage,
            last_decision=st.last_decision.to_dict() if st.last_decision else None, reason=st.reason)

    def snapshot(self) -> FleetSnapshot:
        """For /metrics and the dashboard; always from the store (Prometheus scrapes this)."""
        r = self.store.latest()
        common = {"fleet_versions": self.store.fleet_versions(), "update_outcomes": self.store.update_outcomes()}
        if r is None:
            return FleetSnapshot(**common)
        st = r.state
        sizes = fleet_share(assign_fleet(st, r.plan, self.store.vehicle_ids()))
        return FleetSnapshot(st.rollout_id, st.version, st.stage(r.plan).name, st.stage_index, st.status.value,
                             sizes, self.store.stage_window(r), **common)


@dataclass(frozen=True)
class ServerConfig:
    """``admin_token`` is the admin token named ``admin``; ``admin_tokens`` ({name: token}) adds named
    ones. Every admin token is at least 16 characters; only their hashes are kept by the app."""

    ota_dir: Path
    admin_token: str
    eval_interval_s: float = 60.0
    db_url: str | None = None  # default: SQLite at <ota_dir>/fleet.db
    prometheus_url: str | None = None  # gates read per-cohort stats by PromQL when set
    require_release: bool = True  # start only versions present in the TUF repository
    background_eval: bool = True
    admin_tokens: Mapping[str, str] = field(default_factory=dict)
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)  # health windows vs the server's clock
    logs: LogSearch | None = None  # the cloud's log index, for the dashboard's logs panel (composed above ota)
    live: LiveSource | None = None  # the broker the dashboard's live panel reads (``DRIVELOOP_NATS_URL``)

    def __post_init__(self) -> None:
        self.admins()  # every token long enough, every name well-formed
        if not self.eval_interval_s > 0:
            raise ConfigError(f"eval_interval_s must be > 0, got {self.eval_interval_s}")

    def admins(self) -> AdminTokens:
        return AdminTokens.from_tokens({DEFAULT_ADMIN_NAME: self.admin_token, **self.admin_tokens})

    @property
    def repo_dir(self) -> Path:
        return self.ota_dir / "repo"


def _status_of(e: DriveloopError) -> int:
    if isinstance(e, AuthError):
        return e.status
    if isinstance(e, ConfigError):
        return 422
    if isinstance(e, (StaleReportError, RolloutStateError, OtaError)):
        return 409
    return 400


def create_app(config: ServerConfig, clock: Callable[[], float] = time.time) -> FastAPI:
    """The fleet server app. ``clock`` (seconds) is injectable so tests drive time explicitly."""
    store = FleetStore(config.db_url, config.admission) if config.db_url \
        else FleetStore.at(config.ota_dir, config.admission)
    admins = config.admins()  # compared as digests: equal length, constant time
    source = None
    if config.prometheus_url:
        from driveloop.ota.promql import PromHealthSource

        source = PromHealthSource(config.prometheus_url)
    released = (lambda: released_versions(config.repo_dir)) if config.require_release else None
    from driveloop.ota.director_repo import DirectorRepo

    director = DirectorRepo.at(config.ota_dir)  # its clock is the wall clock: vehicles check expiry on theirs
    service = FleetService(store, clock, config.eval_interval_s, source, released, director)
    from driveloop.ota.live_feed import LiveFeed, register_live

    live = LiveFeed(config.live) if config.live is not None else None  # wall clock: hazards' validity is Unix time
    closing = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_evaluate_forever(service, config.eval_interval_s)) \
            if config.background_eval else None
        if live is not None:
            live.start()  # connects in the background: a broker that is down does not hold up the server
        yield
        closing.set()
        if live is not None:
            await asyncio.to_thread(live.stop)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="driveloop fleet server", lifespan=lifespan)
    app.state.service = service
    config.repo_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("metadata", "targets"):
        (config.repo_dir / sub).mkdir(exist_ok=True)
        app.mount(f"/tuf/{sub}", StaticFiles(directory=config.repo_dir / sub, check_dir=False), name=f"tuf-{sub}")
    director.vehicles_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/director", StaticFiles(directory=director.vehicles_dir, check_dir=False), name="director")

    @app.exception_handler(DriveloopError)
    async def _driveloop_error(_: Request, e: DriveloopError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=_status_of(e))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, e: NotFound) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown path, unparsable body
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.middleware("http")
    async def _timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            response: Response = JSONResponse({"error": f"request body must be at most {MAX_BODY_BYTES} bytes"},
                                              status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or ("/tuf" if request.url.path.startswith("/tuf/") else "other")
        service.metrics.request_seconds.labels(request.method, path, str(response.status_code)).observe(
            time.perf_counter() - t0)
        return response

    def admin(authorization: str | None = Header(default=None)) -> str:
        """The name of the admin token the request carries: the audit's actor."""
        token = parse_bearer(authorization)
        if token is None:
            raise AuthError("missing admin token (Authorization: Bearer …)", status=401)
        name = admins.identify(token)
        if name is None:
            raise AuthError("invalid admin token", status=403)
        return name

    @app.post("/v1/vehicles", status_code=201)
    def enrol(req: VehicleEnrol, actor: str = Depends(admin)) -> VehicleCredential:
        return service.enrol(req, actor)

    @app.post("/v1/vehicles/{vehicle_id}/{action}")
    def vehicle_action(vehicle_id: str, action: Literal["disable", "enable", "rotate"],
                       actor: str = Depends(admin)) -> VehicleState:
        return service.vehicle_action(vehicle_id, action, actor)

    @app.post("/v1/health")
    def post_health(report: HealthReport, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        store.authenticate(report.vehicle_id, parse_bearer(authorization))
        return service.ingest(report)

    @app.post("/v1/installed")
    def post_installed(req: InstallConfirmation, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        store.authenticate(req.vehicle_id, parse_bearer(authorization))
        return service.confirm(req)

    @app.get("/v1/update")
    def get_update(vehicle: str, current: str | None = None,
                   authorization: str | None = Header(default=None)) -> UpdateOffer:
        try:
            check = UpdateCheck(vehicle_id=vehicle, current_version=current)
        except ValidationError as e:
            raise ConfigError(f"invalid update check: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
        store.authenticate(check.vehicle_id, parse_bearer(authorization))
        return service.offer(check.vehicle_id)

    @app.post("/v1/rollouts", status_code=201)
    def start_rollout(req: RolloutStart, actor: str = Depends(admin)) -> RolloutStatus:
        return service.start(req, actor)

    @app.get("/v1/rollouts/{rollout_id}")
    def get_rollout(rollout_id: int) -> RolloutStatus:
        return service.status(rollout_id)

    @app.post("/v1/rollouts/{rollout_id}/{action}")
    def operate(rollout_id: int, action: str, req: OperatorRequest | None = None,
                actor: str = Depends(admin)) -> RolloutStatus:
        if action == "evaluate":
            service.evaluate(force=True)
            return service.status(rollout_id)
        if action not in OPERATOR_ACTIONS:
            raise ConfigError(f"unknown action {action!r} ({', '.join((*OPERATOR_ACTIONS, 'evaluate'))})")
        return service.operate(rollout_id, action, req or OperatorRequest(), actor)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from driveloop.ota.dashboard import register_dashboard

    register_dashboard(app, service, config.logs)
    register_live(app, live, closing)
    return app


async def _evaluate_forever(service: FleetService, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            await asyncio.to_thread(service.evaluate)
        except DriveloopError as e:  # keep serving; the error is in the log and the next period retries
            logger.error("background evaluation failed: %s", e)
