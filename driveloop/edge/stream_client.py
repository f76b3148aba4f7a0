"""The vehicle's live-stream client: a synchronous facade for the control loop over nats-py (asyncio).

:class:`StreamLoop` runs one asyncio event loop in one daemon thread; any number of :class:`VehicleStream`
connections share it (a fleet runner with 1,000 vehicles costs one thread). The control loop calls
``publish`` and ``received``, which never block: a message goes to an in-memory outbox and the loop's
thread sends it.

Rules it keeps:
- At most ``max_pending_acks`` messages await the broker's ack per vehicle; each carries the JetStream
  message id ``<vehicle>:<seq>``, so a resend inside the broker's de-dup window is stored once, and the
  sinks' (vehicle, seq) key drops any later one.
- Nothing is lost that the broker did not ack: while disconnected, or when an ack fails or times out, the
  unacked messages and everything after them go to the on-disk spool (``_stream_spool``), which is replayed
  in order after reconnecting; new messages queue behind it, so a vehicle's messages keep their order.
- A broker that is down, restarts or refuses the credentials never blocks or crashes the caller: the
  client reconnects in the background and the spool holds the backlog (size-capped, eviction counted).
- Hazards: ``watch_cells`` subscribes exactly the given ``haz.<road>.<cell>`` subjects (a driving vehicle: the
  one cell it is in, ``edge.hazards``); for a cell newly watched (and after every reconnect) it also reads the
  live hazards already in the HAZARDS stream (direct get), so late joiners see them; ``watch_settled`` says
  when the last ``watch_cells`` has been applied. ``received`` hands out raw payloads of watched cells, each
  payload once for as long as it could still be live (``HANDED_OUT_FOR_S``): a repetition, and the stored copy
  the vehicle reads again on each cell it moves into, are the same bytes, and each would cost its filter a
  decode and a signature check only to be found a replay; verifying them is the caller's job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driveloop.contracts.stream import (
    HAZARD_MAX_VALIDITY_S,
    MAX_LOG_PAYLOAD_BYTES,
    Telemetry,
    VehicleEvent,
    encode,
    event_subject,
    hazard_digest,
    hazard_subject,
    log_subject,
    msg_id,
    subject_token,
    telemetry_subject,
)
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import StreamError
from driveloop.core.loop_thread import LoopThread
from driveloop.edge._stream_spool import Spool

logger = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0  # an ack slower than this counts as failed: the message is spooled and replayed
TICK_S = 0.2  # how often the loop checks ack timeouts and persists spool cursors
SEQ_BLOCK = 1000  # next_seq reserves seqs on disk in blocks (one write per block, never reused)
OUTBOX_LIMIT = 20_000  # queued in memory beyond the acks in flight before the client spills to the spool
DIRECT_GET_BATCH = 256
PERMANENT_ERRORS = {10054, 10060}  # message too large, wrong expected stream: resending cannot help
# a hazard handed out this long ago has expired, whatever its reference time (validity <= the maximum, clocks within
# a minute): its bytes are forgotten after it, and only then would a copy be handed out again
HANDED_OUT_FOR_S = HAZARD_MAX_VALIDITY_S + 60.0
MAX_HANDED_OUT = 100_000  # digests remembered at most (the per-cell rate limit keeps a vehicle far below it)


def nats_servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` (``DRIVELOOP_NATS_URL`` of a cluster) → the list nats-py takes."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise StreamError(f"no broker URL in {url!r:.100}")
    return servers


class StreamLoop:
    """One asyncio loop in one daemon thread (``core.loop_thread``), shared by many vehicles' connections."""

    def __init__(self, name: str = "driveloop-stream") -> None:
        self._thread = LoopThread(name).start()
        self.loop = self._thread.loop
        self._streams: set[VehicleStream] = set()
        self._kicks: deque[VehicleStream] = deque()
        self._kick_scheduled = False
        self.call(lambda: self.loop.create_task(self._ticker()))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for s in list(self._streams):
                try:
                    s._on_tick(now)
                except Exception:  # one vehicle's spool failing must not stop the others' timers
                    logger.exception("stream tick failed for %s", s.vehicle_id)

    def call(self, fn: Any) -> None:
        self._thread.call(fn)

    def kick(self, stream: VehicleStream) -> None:
        """Wake ``stream``'s sender from any thread; one wake-up of the loop serves every vehicle that
        published since the last (a fleet's tick costs one self-pipe write, not one per vehicle)."""
        self._kicks.append(stream)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self.loop.call_soon_threadsafe(self._run_kicks)

    def _run_kicks(self) -> None:
        self._kick_scheduled = False
        while self._kicks:
            self._kicks.popleft()._kick()

    def run(self, coro: Any, timeout_s: float | None = None) -> Any:
        return self._thread.run(coro, timeout_s)

    def close(self) -> None:
        """Cancel every task left on the loop, stop it and join its thread."""
        self._thread.stop(timeout_s=10)


@dataclass
class _Pending:
    subject: str
    msg_id: str
    data: bytes
    queued_at: float  # monotonic, when publish() took it (publish-to-ack latency)
    spool_index: int | None = None
    sent_at: float = 0.0


class VehicleStream:
    """One vehicle's connection: publish telemetry/events, receive hazards for the cells it watches."""

    def __init__(self, vehicle_id: str, url: str, spool_dir: Path, user: str | None = None,
                 password: str | None = None, max_pending_acks: int = 256, loop: StreamLoop | None = None,
                 spool_max_bytes: int = 64 << 20, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.vehicle_id = vehicle_id
        self._token = subject_token(vehicle_id)
        self.url = url
        self._user, self._password = user, password
        self.max_pending_acks = max(1, int(max_pending_acks))
        self.ack_timeout_s = ack_timeout_s
        self._dir = Path(spool_dir) / self._token
        self._spool = Spool(self._dir / "spool", max_bytes=spool_max_bytes)
        self._seq_lock = threading.Lock()
        self._seq, self._seq_reserved = self._load_seq()
        self._outbox: deque[_Pending] = deque()
        self._inflight: OrderedDict[str, _Pending] = OrderedDict()
        self._received: deque[tuple[str, bytes, float]] = deque()
        self._latencies: deque[float] = deque(maxlen=200_000)
        # (msg id, "stored"|"duplicate"|"refused") of log batches; bounded: an answer not collected is resent later
        self._raw_settled: deque[tuple[str, str]] = deque(maxlen=100_000)
        self._counts = dict.fromkeys(("published", "acked", "spooled", "replayed", "dropped", "reconnects",
                                      "duplicates", "errors"), 0)
        self._token_n = 0
        # congestion control (as TCP's AIMD): a failed or timed-out ack halves the window of acks in flight
        # and delays the resend; each ack widens it again. Without it, an overloaded broker (fsync-bound)
        # gets every timed-out message again at once, and a fleet's resends keep it overloaded.
        self._window = self.max_pending_acks
        self._backoff_s = 0.0
        self._resume_at = 0.0
        self._owned_loop = loop is None
        self._loop = loop or StreamLoop(f"stream-{vehicle_id}")
        self._nc: Any = None
        self._kick_scheduled = False
        self._closing = False
        self._cells: dict[str, Any] = {}  # watched hazard subject -> subscription (None until subscribed)
        self._handed: OrderedDict[bytes, float] = OrderedDict()  # digest of each hazard handed out -> monotonic time
        self._watch_lock: asyncio.Lock | None = None
        self._watch_asked = 0  # watch_cells calls so far (caller's thread) ...
        self._watch_done = 0  # ... and how many of them the loop has applied (subscribed, stored hazards read)
        self._kick_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._loop._streams.add(self)
        self._loop.call(lambda: self._loop.loop.create_task(self._main()))
        self._started.wait(10)

    # -- caller side (the control loop's thread): never blocks ---------------------------------------------
    def _load_seq(self) -> tuple[int, int]:
        try:
            reserved = int((self._dir / "seq").read_text().strip())
        except FileNotFoundError:
            reserved = 0
        except ValueError as e:
            raise StreamError(f"unreadable seq file in {self._dir}: {e}") from e
        return reserved, reserved

    def next_seq(self) -> int:
        """The next message seq for this vehicle: increasing, never reused across restarts."""
        with self._seq_lock:
            if self._seq >= self._seq_reserved:
                self._seq_reserved = self._seq + SEQ_BLOCK
                write_atomic(self._dir / "seq", f"{self._seq_reserved}\n".encode(), mode=0o600)
            seq = self._seq
            self._seq += 1
            return seq

    def publish(self, message: Telemetry | VehicleEvent) -> None:
        """Queue a message for sending; StreamError if it is not this vehicle's or is oversized."""
        if message.vehicle_id != self.vehicle_id:
            raise StreamError(f"vehicle {self.vehicle_id!r} cannot publish for {message.vehicle_id!r}")
        if isinstance(message, Telemetry):
            subject = telemetry_subject(self.vehicle_id)
        elif isinstance(message, VehicleEvent):
            subject = event_subject(self.vehicle_id, message.kind)
        else:
            raise StreamError(f"cannot publish a {type(message).__name__}")
        self._enqueue(subject, msg_id(self.vehicle_id, message.seq), encode(message))

    def publish_raw(self, subject: str, payload: bytes, message_id: str | None = None) -> None:
        """Queue an opaque payload on this vehicle's ``log.<vehicle>`` subject (log batches)."""
        if subject != log_subject(self.vehicle_id):
            raise StreamError(f"vehicle {self.vehicle_id!r} may publish raw only on {log_subject(self.vehicle_id)!r}")
        if len(payload) > MAX_LOG_PAYLOAD_BYTES:  # the Nats-Msg-Id header counts against the stream's limit too
            raise StreamError(f"log batch of {len(payload)} bytes exceeds {MAX_LOG_PAYLOAD_BYTES}")
        self._enqueue(subject, message_id or msg_id(self.vehicle_id, self.next_seq()), bytes(payload))

    def _enqueue(self, subject: str, mid: str, data: bytes) -> None:
        if self._closing:
            raise StreamError(f"stream of {self.vehicle_id} is closed")
        self._outbox.append(_Pending(subject, mid, data, time.monotonic()))
        self._counts["published"] += 1
        self._kick_threadsafe()

    def _kick_threadsafe(self) -> None:
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.kick(self)

    def watch_cells(self, road: str, cells: Iterable[int]) -> None:
        """Receive hazards for exactly these cells of ``road`` (and the live ones already published there)."""
        wanted = {hazard_subject(road, int(c)) for c in cells}
        self._watch_asked += 1
        asked = self._watch_asked
        self._loop.call(lambda: self._loop.loop.create_task(self._watch(wanted, asked)))

    def watch_settled(self) -> bool:
        """True once the last ``watch_cells`` is applied: its cells subscribed and their stored hazards read (or,
        while disconnected, recorded for the reconnect to do)."""
        return self._watch_done >= self._watch_asked

    def received(self) -> list[tuple[str, bytes, float]]:
        """(subject, raw payload, wall receive time) of hazards received since the last call."""
        out = []
        while self._received:
            out.append(self._received.popleft())
        return out

    def ack_latencies_ms(self) -> list[float]:
        """Publish-to-ack latencies (ms) of live messages acked since the last call (for benchmarks)."""
        out = []
        while self._latencies:
            out.append(self._latencies.popleft() * 1e3)
        return out

    def settled_raw(self) -> list[tuple[str, str]]:
        """(message id, "stored" | "duplicate" | "refused") of ``publish_raw`` messages the broker answered for
        since the last call: the log shipper drops its lines only then."""
        out = []
        while self._raw_settled:
            out.append(self._raw_settled.popleft())
        return out

    def stats(self) -> dict[str, int]:
        pending = len(self._outbox) + sum(1 for p in list(self._inflight.values()) if p.spool_index is None)
        return {**self._counts, "spooled_now": len(self._spool), "dropped": self._counts["dropped"] + self._spool.dropped,
                "pending": pending + len(self._spool)}

    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything published so far is acked (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._outbox and not self._inflight and len(self._spool) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            self._kick_threadsafe()
            time.sleep(0.005)

    def close(self) -> None:
        """Spool whatever is not acked, close the connection (and the loop, if this stream owns it)."""
        if self._closing:
            return
        self._closing = True
        try:
            self._loop.run(self._shutdown(), timeout_s=60)
        except TimeoutError:  # an overloaded loop: the shutdown still runs there; never raise into the caller
            logger.warning("vehicle %s: stream close did not finish in 60 s", self.vehicle_id)
        finally:
            self._loop._streams.discard(self)
            if self._owned_loop:
                self._loop.close()

    # -- loop side ---------------------------------------------------------------------------------------
    async def _main(self) -> None:
        self._watch_lock = asyncio.Lock()
        self._kick_event = asyncio.Event()
        self._started.set()
        self._sender_task = asyncio.create_task(self._sender())
        await self._connect()

    async def _connect(self) -> None:
        import nats

        delay = 0.1
        while not self._closing:
            try:
                self._nc = await nats.connect(
                    nats_servers(self.url), user=self._user, password=self._password, inbox_prefix=f"_INBOX.{self._token}",
                    name=f"vehicle-{self.vehicle_id}", allow_reconnect=True, max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25, connect_timeout=2, ping_interval=5, max_outstanding_pings=2,
                    pending_size=4 << 20, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )  # fmt: skip
                break
            except Exception as e:  # the broker is down or refuses us: keep driving, retry in the background
                logger.info("vehicle %s: cannot connect to %s (%s); retrying", self.vehicle_id, self.url, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if self._nc is None:
            return
        await self._nc.subscribe(f"_INBOX.{self._token}.ack.*", cb=self._on_ack)
        await self._rewatch()
        self._kick()

    async def _on_disconnected(self) -> None:
        self._fail("disconnected")

    async def _on_reconnected(self) -> None:
        self._counts["reconnects"] += 1
        logger.info("vehicle %s reconnected", self.vehicle_id)
        self._kick()
        await self._rewatch()

    async def _on_error(self, e: Exception) -> None:
        self._counts["errors"] += 1
        # a refused subject is a bug or an attack, worth a warning; a refused connection is the outage
        # the spool is for, logged by the reconnect notices
        level = logging.WARNING if "permission" in str(e).lower() else logging.DEBUG
        logger.log(level, "vehicle %s stream error: %s", self.vehicle_id, e)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._kick_event is not None:
            self._kick_event.set()

    async def _sender(self) -> None:
        assert self._kick_event is not None
        while True:
            await self._kick_event.wait()
            self._kick_event.clear()
            try:
                await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk or a broken connection: log, the spool and timers recover
                logger.exception("vehicle %s: sending failed", self.vehicle_id)
                self._fail("send error")

    def _spill_outbox(self) -> None:
        if self._outbox:
            items = []
            while self._outbox:
                items.append(self._outbox.popleft())
            self._spool.append((p.subject, p.msg_id, p.data) for p in items)
            self._counts["spooled"] += len(items)

    async def _drain(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            self._spill_outbox()
            return
        if time.monotonic() < self._resume_at:
            if len(self._outbox) > OUTBOX_LIMIT:
                self._spill_outbox()
            return
        room = self._window - len(self._inflight)
        if len(self._spool):
            self._spill_outbox()  # behind the backlog: order is kept
            batch = [_Pending(r.subject, r.msg_id, r.data, 0.0, r.index) for r in self._spool.next_unsent(room)]
        else:
            batch = []
            while self._outbox and len(batch) < room:
                batch.append(self._outbox.popleft())
            if len(self._outbox) > OUTBOX_LIMIT:
                self._fail("outbox over its limit")
                return
        now = time.monotonic()
        for p in batch:
            self._token_n += 1
            token = str(self._token_n)
            p.sent_at = now
            self._inflight[token] = p
            await nc.publish(p.subject, p.data, reply=f"_INBOX.{self._token}.ack.{token}",
                             headers={"Nats-Msg-Id": p.msg_id})

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        p = self._inflight.get(token)
        if p is None:  # an ack for a message already given up on (it is being resent)
            return
        status = msg.headers.get("Status") if msg.headers else None
        try:
            resp = json.loads(msg.data) if msg.data else {}
        except ValueError:
            resp = {"error": {"description": "unparseable ack"}}
        if status or "error" in resp:
            err = resp.get("error", {})
            if err.get("err_code") not in PERMANENT_ERRORS:
                self._fail(f"ack error {status or err}")  # spools it with the rest, in order
                return
            logger.warning("vehicle %s: broker refused %s for good: %s", self.vehicle_id, p.msg_id, err)
            self._counts["dropped"] += 1
            if p.subject.startswith("log."):
                self._raw_settled.append((p.msg_id, "refused"))
            if p.spool_index is not None:
                self._spool.ack(p.spool_index)
            del self._inflight[token]
            return
        self._window = min(self.max_pending_acks, self._window + 1)
        self._backoff_s = 0.0
        # counts first: flush() (another thread) returns once the spool and _inflight are empty
        self._counts["acked"] += 1
        if resp.get("duplicate"):
            self._counts["duplicates"] += 1
        if p.subject.startswith("log."):
            self._raw_settled.append((p.msg_id, "duplicate" if resp.get("duplicate") else "stored"))
        if p.spool_index is not None:
            self._counts["replayed"] += 1
            self._spool.ack(p.spool_index)
        else:
            self._latencies.append(time.monotonic() - p.queued_at)
        del self._inflight[token]
        if self._kick_event is not None and (self._outbox or len(self._spool)):  # room for what waits, if any:
            self._kick_event.set()  # an idle sender woken per ack costs a task step per message

    def _fail(self, reason: str) -> None:
        """Give up on every ack in flight: live messages go to the spool (before anything queued after
        them), spooled ones will be resent from the spool's cursor."""
        if not self._inflight and not self._outbox:
            return
        live = [p for p in self._inflight.values() if p.spool_index is None]
        if self._inflight and reason != "closing":
            self._window = max(1, self._window // 2)
            self._backoff_s = min(5.0, max(0.25, self._backoff_s * 2))
            self._resume_at = time.monotonic() + self._backoff_s
        self._inflight.clear()
        logger.info("vehicle %s: %s; spooling %d in flight and %d queued", self.vehicle_id, reason, len(live),
                    len(self._outbox))
        if live:
            self._spool.append((p.subject, p.msg_id, p.data) for p in live)
            self._counts["spooled"] += len(live)
        self._spill_outbox()
        self._spool.rewind()

    def _on_tick(self, now: float) -> None:
        if self._inflight:
            first = next(iter(self._inflight.values()))
            if now - first.sent_at > self.ack_timeout_s:
                self._fail("ack timeout")
                self._kick()
        self._spool.persist_cursor()
        if len(self._spool) or self._outbox:
            self._kick()
        while self._handed and now - next(iter(self._handed.values())) > HANDED_OUT_FOR_S:
            self._handed.popitem(last=False)

    # -- hazards ------------------------------------------------------------------------------------------
    async def _watch(self, wanted: set[str], asked: int) -> None:
        assert self._watch_lock is not None
        try:
            await self._apply_watch(wanted)
        finally:
            self._watch_done = max(self._watch_done, asked)

    async def _apply_watch(self, wanted: set[str]) -> None:
        assert self._watch_lock is not None
        async with self._watch_lock:
            for subject in [s for s in self._cells if s not in wanted]:
                sub = self._cells.pop(subject)
                if sub is not None and self.connected():
                    await sub.unsubscribe()
            new = [s for s in sorted(wanted) if s not in self._cells]
            for subject in new:
                self._cells[subject] = None
            if self.connected():
                await self._subscribe_and_fetch(new)

    async def _rewatch(self) -> None:
        """After (re)connecting: subscribe what is still unsubscribed, then read every watched cell's
        stored hazards (those published while we were away)."""
        if self._watch_lock is None:
            return
        async with self._watch_lock:
            await self._subscribe_and_fetch(sorted(self._cells))

    async def _subscribe_and_fetch(self, subjects: list[str]) -> None:
        for subject in subjects:
            if self._cells.get(subject) is None:
                self._cells[subject] = await self._nc.subscribe(subject, cb=self._on_hazard)
        roads = sorted({s.split(".")[1] for s in subjects})
        for road in roads:  # one read per road, not per cell: a fleet of 1,000 joins with 1,000 requests
            on_road = {s for s in subjects if s.split(".")[1] == road}
            # one cell (a driving vehicle's): read only its subject, not every stored copy on the road
            pattern = next(iter(on_road)) if len(on_road) == 1 else f"haz.{road}.*"
            try:
                await self._fetch_stored(pattern, set(subjects))
            except Exception as e:  # late-join reads are best effort; live delivery continues
                logger.info("vehicle %s: reading stored hazards of road %s failed: %r", self.vehicle_id, road, e)

    def _deliver(self, subject: str, data: bytes) -> None:
        if subject not in self._cells:  # a message for a cell no longer watched
            return
        digest = hazard_digest(data)
        if digest in self._handed:  # the same bytes as one handed out (see the module docstring)
            return
        self._handed[digest] = time.monotonic()
        if len(self._handed) > MAX_HANDED_OUT:
            self._handed.popitem(last=False)
        self._received.append((subject, data, time.time()))

    async def _on_hazard(self, msg: Any) -> None:
        self._deliver(msg.subject, msg.data)

    async def _fetch_stored(self, pattern: str, wanted: set[str]) -> None:
        """Every message of ``wanted`` still in the HAZARDS stream (max age = the longest validity), read
        with batched direct gets over the subjects ``pattern`` matches; other cells' hazards are not handed out."""
        inbox = f"_INBOX.{self._token}.dg.{self._token_n}"
        self._token_n += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = await self._nc.subscribe(inbox, cb=queue.put)
        try:
            seq = 0
            while True:
                body = json.dumps({"batch": DIRECT_GET_BATCH, "next_by_subj": pattern, "seq": seq + 1})
                await self._nc.publish("$JS.API.DIRECT.GET.HAZARDS", body.encode(), reply=inbox)
                more = False
                while True:
                    msg = await asyncio.wait_for(queue.get(), timeout=5.0)
                    headers = msg.headers or {}
                    if headers.get("Status"):  # 204 end of batch, 404 nothing (more) stored
                        more = headers.get("Status") == "204" and int(headers.get("Nats-Num-Pending", 0) or 0) > 0
                        break
                    seq = max(seq, int(headers.get("Nats-Sequence", seq)))
                    subject = headers.get("Nats-Subject", "")
                    if subject in wanted:
                        self._deliver(subject, msg.data)
                if not more:
                    return
        finally:
            await sub.unsubscribe()

    async def _shutdown(self) -> None:
        self._fail("closing")
        self._spill_outbox()
        self._spool.close()
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception as e:  # closing a half-dead connection: nothing left to save
                logger.info("vehicle %s: close: %s", self.vehicle_id, e)
        for task in (getattr(self, "_sender_task", None),):
            if task is not None:
                task.cancel()
