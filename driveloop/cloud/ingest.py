"""The ingest server (``driveloop cloud serve``): FastAPI over the shared IngestService.

Endpoints (all JSON; vehicle endpoints need ``Authorization: Bearer <vehicle token>``):
- ``POST /v1/uploads`` {sha256, size, name} → upload status (``exists`` when already cataloged)
- ``PATCH /v1/uploads/{id}`` with ``Upload-Offset`` and a chunk body → new status; the last byte
  returns ``{state: done, cataloged: true}``; a wrong offset → 409 with the server's ``Upload-Offset``
- ``HEAD``/``GET /v1/uploads/{id}`` → the server's offset (header and body)
- ``GET /v1/campaigns`` → approved, unexpired campaigns for vehicles
- admin (``Bearer <admin token>``): ``POST /v1/campaigns``, ``POST /v1/campaigns/{id}/approve``
- logs (``cloud/log_ingest.py``): ``POST /v1/logs/batch`` (a vehicle's spooled lines), ``POST /v1/logs``
  (OTLP/HTTP JSON; vehicle or admin token), ``GET /v1/logs/search`` (admin)
- ``GET /metrics`` (Prometheus text): bytes received, segments cataloged, uploads rejected, requests by
  status, log lines
Errors map from the error tree: AuthError → 401/403, UploadRejectedError → its status,
QuotaExceededError → 429 with ``Retry-After``, SegmentError/ConfigError → 422, StorageError → 503
(retry later); the body is ``{"error": "…"}``. JSON bodies are bounded in size and nesting depth.
HTTPS when ``serve`` is given a certificate and key (vehicles then verify it against their CA).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import ClientDisconnect

from driveloop.cloud._ingest_openapi import CAMPAIGN_BODY, CHUNK_BODY, UPLOAD_BODY
from driveloop.cloud.ingest_service import ChunkWriter, IngestConfig, IngestService
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.log_ingest import LogIngest, register_log_routes
from driveloop.cloud.logindex import LogIndex
from driveloop.cloud.quotas import QuotaConfig
from driveloop.cloud.store import ObjectStore
from driveloop.contracts.upload import OFFSET_HEADER, UploadStatus
from driveloop.core.exceptions import (
    AuthError,
    ConfigError,
    DriveloopError,
    QuotaExceededError,
    SegmentError,
    StorageError,
    UploadRejectedError,
)
from driveloop.core.tls import server_tls
from driveloop.core.tokens import check_admin_token, hash_token

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024  # declarations and campaigns are tiny; refuse anything bigger unread
MAX_JSON_DEPTH = 16  # they are flat objects; deep nesting is an attack on the parser's recursion

__all__ = ["IngestConfig", "IngestService", "create_app", "serve", "serve_in_thread"]


def _status_code(e: DriveloopError) -> int:
    if isinstance(e, AuthError | UploadRejectedError | QuotaExceededError):
        return e.status
    if isinstance(e, SegmentError | ConfigError):
        return 422
    if isinstance(e, StorageError):
        return 503
    return 400


def _error_response(e: DriveloopError) -> JSONResponse:
    code = _status_code(e)
    headers: dict[str, str] = {}
    body: dict[str, Any] = {"error": str(e)}
    if isinstance(e, UploadRejectedError) and e.offset is not None:
        headers[OFFSET_HEADER] = str(e.offset)
        body["offset"] = e.offset
    if code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(e, QuotaExceededError):
        headers["Retry-After"] = str(e.retry_after_s)
        body["retry_after_s"] = e.retry_after_s
    log = logger.error if code >= 500 else logger.info
    log("ingest request refused (%d): %s", code, e)
    return JSONResponse(body, status_code=code, headers=headers)


def _status_response(status: UploadStatus, code: int = 200) -> JSONResponse:
    return JSONResponse(status.to_json(), status_code=code, headers={OFFSET_HEADER: str(status.offset)})


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_JSON_BYTES):
        raise UploadRejectedError(f"JSON body larger than {MAX_JSON_BYTES} bytes", status=413)
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_JSON_BYTES:
            raise UploadRejectedError(f"JSON body larger than {MAX_JSON_BYTES} bytes", status=413)
    if _nesting(raw) > MAX_JSON_DEPTH:
        raise UploadRejectedError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", status=422)
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:
        raise UploadRejectedError(f"body is not JSON: {e}", status=422) from e


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN/Infinity; the standard does not


def _nesting(raw: bytes) -> int:
    """The deepest ``[``/``{`` nesting of ``raw`` outside strings (checked before parsing, so a hostile
    body never reaches the recursive parser)."""
    depth = deepest = 0
    in_string = escaped = False
    for b in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (b == 0x5C, b != 0x22)
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _int_header(request: Request, name: str, required: bool) -> int | None:
    value = request.headers.get(name)
    if value is None:
        if required:
            raise UploadRejectedError(f"missing {name} header", status=400)
        return None
    if not value.isdigit():
        raise UploadRejectedError(f"{name} must be a non-negative integer, got {value!r}", status=400)
    return int(value)


class _StatsCollector:
    """Exports the service's counters; a registry per app, so tests can run several servers."""

    def __init__(self, service: IngestService, logs: LogIngest | None = None,
                 responses: Mapping[str, int] | None = None) -> None:
        self._service = service
        self._logs = logs
        self._responses = responses if responses is not None else {}

    def collect(self) -> Iterator[Metric]:
        s = self._service.stats
        requests = CounterMetricFamily("driveloop_ingest_requests", "Ingest API requests answered, by status class",
                                       labels=["code"])
        for code, n in sorted(dict(self._responses).items()):
            requests.add_metric([code], n)
        yield requests
        if self._logs is not None:
            lines = CounterMetricFamily("driveloop_ingest_log_lines", "Log lines received, by outcome",
                                        labels=["outcome"])
            ls = self._logs.stats
            for outcome in ("accepted", "duplicates", "rejected"):
                lines.add_metric([outcome], getattr(ls, outcome))
            yield lines
        yield GaugeMetricFamily("driveloop_ingest_uploads_in_flight", "Requests appending to an upload now",
                                value=self._service.uploads_in_flight())
        yield CounterMetricFamily("driveloop_ingest_received_bytes", "Upload body bytes received", value=s.bytes_received)
        yield CounterMetricFamily("driveloop_ingest_segments_cataloged", "Segments newly cataloged",
                                  value=s.segments_cataloged)
        yield CounterMetricFamily("driveloop_ingest_uploads_rejected", "Uploads refused at finalization",
                                  value=s.uploads_rejected)


class _CountResponses:
    """Counts answers by status class (``2xx``, ``4xx``, ``5xx``) for the error-ratio alert. Plain ASGI
    (it only watches ``send``), so streamed upload bodies and client disconnects pass through untouched;
    a request that dies without an answer counts as ``5xx``."""

    def __init__(self, app: Any, counts: dict[str, int]) -> None:
        self.app, self.counts, self.lock = app, counts, threading.Lock()

    def _add(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def watch(message: Any) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._add(f"{int(message['status']) // 100}xx")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not answered:
                self._add("5xx")


def create_app(store: ObjectStore, catalog: Catalog, config: IngestConfig,
               clock: Callable[[], float] = time.time, logs: LogIndex | None = None) -> FastAPI:
    """The ingest API over ``store`` and ``catalog``; ``app.state.service`` is its IngestService.
    With ``logs`` it also takes log lines into that index (``app.state.logs``: the LogIngest)."""
    service = IngestService(store, catalog, config, clock=clock)
    app = FastAPI(title="driveloop ingest", version="1")
    app.state.service = service
    log_ingest = LogIngest(logs) if logs is not None else None
    app.state.logs = log_ingest
    responses: dict[str, int] = {}
    app.add_middleware(_CountResponses, counts=responses)

    @app.exception_handler(DriveloopError)
    async def _driveloop_error(_request: Request, e: DriveloopError) -> JSONResponse:
        return _error_response(e)

    async def vehicle(request: Request) -> str:
        return await run_in_threadpool(service.authenticate, request.headers.get("authorization"))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(service, log_ingest, responses))  # type: ignore[arg-type]
    if log_ingest is not None:
        register_log_routes(app, log_ingest, service.authenticate, service.check_admin, _nesting, MAX_JSON_DEPTH)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/uploads", openapi_extra=UPLOAD_BODY)
    async def begin_upload(request: Request) -> JSONResponse:
        who = await vehicle(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise UploadRejectedError("expected a JSON object {sha256, size, name}", status=422)
        status = await run_in_threadpool(service.begin, who, body.get("sha256"), body.get("size"), body.get("name"))
        return _status_response(status)

    @app.get("/v1/uploads/{upload_id}")
    async def get_upload(upload_id: str, request: Request) -> JSONResponse:
        who = await vehicle(request)
        return _status_response(await run_in_threadpool(service.status, who, upload_id))

    @app.head("/v1/uploads/{upload_id}")
    async def head_upload(upload_id: str, request: Request) -> Response:
        who = await vehicle(request)
        status = await run_in_threadpool(service.status, who, upload_id)
        headers = {OFFSET_HEADER: str(status.offset), "Upload-Length": str(status.size), "Cache-Control": "no-store"}
        return Response(status_code=200, headers=headers)

    @app.patch("/v1/uploads/{upload_id}", openapi_extra=CHUNK_BODY)
    async def patch_upload(upload_id: str, request: Request) -> Response:
        who = await vehicle(request)
        offset = _int_header(request, OFFSET_HEADER, required=True)
        length = _int_header(request, "content-length", required=False)
        writer = await run_in_threadpool(service.open_chunk, who, upload_id, offset, length)
        if isinstance(writer, UploadStatus):
            return _status_response(writer)
        return await _stream_into(writer, request)

    async def _stream_into(writer: ChunkWriter, request: Request) -> Response:
        dropped = False
        try:
            async for piece in request.stream():
                writer.write(piece)
        except ClientDisconnect:
            dropped = True  # keep what arrived: the client resumes from the server's offset
        except BaseException:
            await run_in_threadpool(writer.close)
            raise
        status = await run_in_threadpool(writer.close)
        if dropped:
            logger.info("upload %s: connection dropped at offset %d", status.upload_id, status.offset)
        return _status_response(status)

    @app.get("/v1/campaigns")
    async def list_campaigns(request: Request) -> dict[str, Any]:
        await vehicle(request)
        return {"campaigns": await run_in_threadpool(service.vehicle_campaigns)}

    @app.post("/v1/campaigns", status_code=201, openapi_extra=CAMPAIGN_BODY)
    async def create_campaign(request: Request) -> dict[str, Any]:
        actor = service.check_admin(request.headers.get("authorization"))
        body = await _json_body(request)
        return await run_in_threadpool(service.create_campaign, body, actor)

    @app.post("/v1/campaigns/{campaign_id}/approve")
    async def approve_campaign(campaign_id: str, request: Request) -> dict[str, Any]:
        actor = service.check_admin(request.headers.get("authorization"))
        return await run_in_threadpool(service.approve_campaign, campaign_id, actor)

    return app


def build_app(store_url: str, catalog_url: str, staging_dir: Path, admin_tokens: Mapping[str, str] | None = None,
              max_segment_bytes: int | None = None, quotas: QuotaConfig | None = None) -> FastAPI:
    """The app from URLs (what ``driveloop cloud serve`` runs). ``admin_tokens``: {name: plain token},
    each at least 16 characters; only their hashes are kept."""
    limits: dict[str, Any] = {} if max_segment_bytes is None else {"max_segment_bytes": max_segment_bytes}
    if quotas is not None:
        limits["quotas"] = quotas
    hashes = {name: hash_token(check_admin_token(token)) for name, token in (admin_tokens or {}).items()}
    config = IngestConfig(staging_dir=staging_dir, admin_tokens=hashes, **limits)
    return create_app(ObjectStore(store_url), Catalog(catalog_url), config, logs=LogIndex.beside(catalog_url))


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8750, tls_cert: Path | None = None,
          tls_key: Path | None = None) -> None:
    """Run the server in the foreground until interrupted (HTTPS with a certificate and key)."""
    uvicorn.run(app, host=host, port=port, log_level="warning", log_config=None,  # its lines: our format
                **server_tls(tls_cert, tls_key))  # type: ignore[arg-type]


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, tls_cert: Path | None = None,
                    tls_key: Path | None = None) -> Iterator[str]:
    """Run the real uvicorn server on a background thread (tests, the demo); yields its base URL
    (``https://`` with a certificate and key). ``port=0`` picks a free port."""
    tls = server_tls(tls_cert, tls_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           log_config=None, **tls))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, name="ingest-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise StorageError("ingest server failed to start")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join()
