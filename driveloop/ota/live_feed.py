"""The live view's I/O: a NATS subscriber that feeds :class:`~driveloop.ota.live.LiveView`, and the fleet
server's ``GET /v1/live`` (a JSON snapshot) and ``GET /v1/live/events`` (server-sent events).

- :class:`LiveFeed` runs one asyncio loop in one daemon thread (``core.loop_thread``, like the hazard
  service): it connects as the configured service user, retrying in the background (a broker that is down
  never stops the fleet server), subscribes ``tel.>`` (live only: the newest message per vehicle is all the view keeps) and reads ``haz.>``
  through an ordered consumer of the HAZARDS stream from its start, so hazards issued before the server
  started are shown too (the stream's max age is the longest validity); without that stream, live only.
- Reads, like the rest of the dashboard, need no token: the view holds positions and speeds, no secrets.
  ``/v1/live`` is 404 when the server has no live data plane configured (the page says so).
- ``/v1/live/events`` sends the snapshot as an SSE ``snapshot`` event every ``interval_s`` when it changed, and
  at least every ``heartbeat_s``; at most ``max_streams`` at once (429 beyond). A stream ends cleanly when the
  client goes, when the app shuts down, or after ``max_stream_s`` (the browser's EventSource reconnects
  after ``retry``): an open stream can never hold up a graceful shutdown for longer than that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from driveloop.core.exceptions import ConfigError
from driveloop.core.loop_thread import LoopThread
from driveloop.ota.live import LivePolicy, LiveView

logger = logging.getLogger(__name__)

__all__ = ["LiveFeed", "LiveSource", "register_live"]

RETRY_MS = 1000  # what the browser waits before reconnecting a closed event stream


@dataclass(frozen=True)
class LiveSource:
    """Where the live view comes from: the broker (``DRIVELOOP_NATS_URL``, comma-separated for a cluster) and a
    service user's credentials, the cloud's hazard public key(s), and the view's and the streams' bounds."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    hazard_keys: tuple[bytes, ...] = ()
    policy: LivePolicy = field(default_factory=LivePolicy)
    interval_s: float = 0.5
    heartbeat_s: float = 5.0
    max_streams: int = 16
    max_stream_s: float = 15.0

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ConfigError("the live view needs a broker URL")
        if not (0 < self.interval_s <= self.heartbeat_s and self.max_stream_s > 0 and self.max_streams >= 1):
            raise ConfigError("live streams need 0 < interval_s <= heartbeat_s, max_stream_s > 0, max_streams >= 1")


class LiveFeed:
    """The background subscriber (see the module docstring); ``snapshot()`` is safe from any thread."""

    def __init__(self, source: LiveSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self.view = LiveView(source.policy, source.hazard_keys)
        self._lock = threading.Lock()
        self._thread = LoopThread("live-feed")
        self._stop = self._thread.stopping  # set from stop() through the loop, even before _main has run
        self._nc: Any = None
        self.connected = False
        if not source.hazard_keys:
            logger.warning("live view: no hazard public key configured: hazards cannot be verified and are dropped")

    def start(self) -> LiveFeed:
        self._thread.start(self._main())
        return self

    def stop(self) -> None:
        self._thread.stop(timeout_s=15)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap = self.view.snapshot(self.clock())
        snap["connected"] = self.connected
        return snap

    # -- the loop -------------------------------------------------------------------------------------------
    async def _main(self) -> None:
        import nats

        from driveloop.edge.stream_client import nats_servers

        delay = 0.2
        while not self._stop.is_set():
            try:
                self._nc = await nats.connect(
                    nats_servers(self.source.url), user=self.source.user, password=self.source.password,
                    name="fleet-live-view", allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=3, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error)  # fmt: skip
                break
            except Exception as e:  # noqa: BLE001 - down or refusing us: the dashboard keeps serving, we retry
                logger.info("live view: cannot connect to %s (%s); retrying", self.source.url, e)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                except TimeoutError:
                    delay = min(delay * 2, 5.0)
        if self._nc is None:
            return
        try:
            await self._nc.subscribe("tel.>", cb=self._on_telemetry)
            await self._subscribe_hazards()
            self.connected = True
            logger.info("live view subscribed on %s", self.source.url)
            await self._stop.wait()
        finally:
            self.connected = False
            try:
                await self._nc.close()
            except Exception as e:  # noqa: BLE001 - closing a broken connection: nothing left to save
                logger.info("live view: close: %s", e)
            # the ordered consumer's heartbeat and flow-control tasks outlive the connection: LoopThread
            # cancels them once this returns, before the loop closes

    async def _subscribe_hazards(self) -> None:
        from nats.js.api import DeliverPolicy
        from nats.js.errors import NotFoundError

        try:
            await self._nc.jetstream().subscribe("haz.>", stream="HAZARDS", cb=self._on_hazard, ordered_consumer=True,
                                                 deliver_policy=DeliverPolicy.ALL)
        except NotFoundError:
            logger.info("live view: no HAZARDS stream on %s: live hazards only", self.source.url)
            await self._nc.subscribe("haz.>", cb=self._on_hazard)

    async def _on_telemetry(self, msg: Any) -> None:
        with self._lock:
            self.view.on_telemetry(msg.subject, msg.data, self.clock())

    async def _on_hazard(self, msg: Any) -> None:
        with self._lock:
            self.view.on_hazard(msg.subject, msg.data, self.clock())

    async def _on_disconnected(self) -> None:
        self.connected = False

    async def _on_reconnected(self) -> None:
        self.connected = True
        logger.info("live view reconnected to %s", self.source.url)

    async def _on_error(self, e: Exception) -> None:
        logger.info("live view: broker error: %s", e)


class _Slot:
    def __init__(self, owner: _Slots) -> None:
        self._owner: _Slots | None = owner

    def release(self) -> None:
        if self._owner is not None:
            self._owner.open -= 1
            self._owner = None

    async def release_later(self) -> None:  # a response's background task: async, so it runs on the loop too
        self.release()


@dataclass
class _Slots:
    """Open event streams (touched only on the server's event loop, so a plain counter)."""

    open: int = 0

    def take(self, limit: int) -> _Slot | None:
        if self.open >= limit:
            return None
        self.open += 1
        return _Slot(self)


def _event(snap: dict[str, Any]) -> bytes:
    return f"event: snapshot\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n".encode()


def register_live(app: FastAPI, feed: LiveFeed | None, closing: asyncio.Event) -> None:
    """``GET /v1/live`` and ``GET /v1/live/events`` on ``app`` (404 for both when ``feed`` is None);
    ``closing`` (set when the app shuts down) ends every open stream."""
    from driveloop.ota.server import NotFound

    slots = _Slots()

    def need_feed() -> LiveFeed:
        if feed is None:
            raise NotFound("no live data plane configured (set DRIVELOOP_NATS_URL for `driveloop ota serve`)")
        return feed

    @app.get("/v1/live")
    def live() -> dict[str, Any]:
        return need_feed().snapshot()

    @app.get("/v1/live/events", response_model=None)
    async def live_events() -> StreamingResponse | JSONResponse:
        f = need_feed()
        slot = slots.take(f.source.max_streams)  # on the event loop: two requests cannot both take the last one
        if slot is None:
            return JSONResponse({"error": f"at most {f.source.max_streams} live streams at once"}, status_code=429,
                                headers={"Retry-After": "5"})

        async def events() -> AsyncIterator[bytes]:
            try:
                yield f"retry: {RETRY_MS}\n\n".encode()
                end = time.monotonic() + f.source.max_stream_s
                last_key, last_sent = "", 0.0
                while not closing.is_set() and time.monotonic() < end:
                    snap = f.snapshot()
                    key = json.dumps({k: v for k, v in snap.items() if k != "now_s"}, sort_keys=True, default=str)
                    if key != last_key or time.monotonic() - last_sent >= f.source.heartbeat_s:
                        yield _event(snap)
                        last_key, last_sent = key, time.monotonic()
                    try:
                        await asyncio.wait_for(closing.wait(), timeout=f.source.interval_s)
                    except TimeoutError:
                        pass
            finally:
                slot.release()

        # the background task releases the slot too when the client left before the body started (then the
        # generator never runs, nor its finally); releasing twice is harmless
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(slot.release_later),
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
