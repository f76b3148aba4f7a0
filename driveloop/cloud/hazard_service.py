"""The hazard service's I/O: the signing key on disk, durable consumers on EVENTS and TELEMETRY, signed
publication on ``haz.<road>.<cell>``, and the list of active hazards for ``driveloop hazards list``.

The decisions are :class:`~driveloop.cloud.hazards.HazardBook`'s; this module only moves bytes:
- the key: an ed25519 private key under the cloud's home (``hazards/signing.key``, mode 0600, written
  atomically, created on first use); vehicles get the raw public key (``hazards/signing.pub``);
- a durable pull consumer on EVENTS (``evt.>``) and one on TELEMETRY (``tel.>``, new messages only: it only
  looks for vehicles passing a hazard's spot); a message that fails its contract is acked (so it is not
  redelivered forever), counted and logged;
- every version :meth:`HazardBook.due` returns is signed and published on each of its cells
  (``contracts.stream.hazard_cells``: its relevance area and the watch horizon before it, where vehicles
  subscribe to the cell they are in), into the HAZARDS stream (late joiners read it there), each copy with its
  ``hazard_msg_id``: a repetition reaches the live subscribers and is stored once;
- after each change the active hazards go to ``hazards/active.json`` (atomic).
It runs in one background thread with its own asyncio loop (``core.loop_thread``); ``stop()`` ends it and
closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.cloud.broker import ensure_streams, fetch_prompt
from driveloop.cloud.hazards import HazardBook, HazardPolicy
from driveloop.contracts.hazard import Hazard, HazardSigner, encode_hazard
from driveloop.contracts.stream import decode_event, decode_telemetry, hazard_cells, hazard_msg_id, hazard_subject
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, StreamError
from driveloop.core.loop_thread import LoopThread

logger = logging.getLogger(__name__)

KEY_NAME, PUB_NAME, ACTIVE_NAME = "signing.key", "signing.pub", "active.json"
EVENTS_DURABLE, TELEMETRY_DURABLE = "hazard-service", "hazard-service-tel"
FETCH_TIMEOUT_S = 0.5
ROUND_S = 0.1  # repetitions, expiry and the rate limit's waiting versions are looked at this often


def hazard_dir(cloud_dir: Path) -> Path:
    return Path(cloud_dir) / "hazards"


def load_signer(directory: Path, create: bool = True) -> HazardSigner:
    """The cloud's hazard signing key under ``directory`` (created, 0600, on first use when ``create``)."""
    key_path, pub_path = Path(directory) / KEY_NAME, Path(directory) / PUB_NAME
    if key_path.is_file():
        if key_path.stat().st_mode & 0o077:
            raise ConfigError(f"hazard signing key {key_path} is readable by others: chmod 600 it")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as e:
            raise ConfigError(f"unreadable hazard signing key {key_path}: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"hazard signing key {key_path} is not an ed25519 key")
        signer = HazardSigner(key)
    elif create:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_atomic(key_path, pem, mode=0o600)
        signer = HazardSigner(key)
        logger.info("created the hazard signing key %s (key id %s)", key_path, signer.key_id[:16])
    else:
        raise ConfigError(f"no hazard signing key at {key_path}")
    if not pub_path.is_file() or pub_path.read_bytes() != signer.public_bytes():
        write_atomic(pub_path, signer.public_bytes(), mode=0o644)
    return signer


def public_key(directory: Path) -> bytes:
    """The raw public key vehicles trust (ConfigError when the service never ran)."""
    path = Path(directory) / PUB_NAME
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"no hazard public key at {path}: start the hazard service once") from e


def read_active(directory: Path, now_s: float | None = None) -> list[dict[str, Any]]:
    """The active hazards the service last wrote (expired ones left out); [] when it never ran."""
    path = Path(directory) / ACTIVE_NAME
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["hazards"]
        hazards = [Hazard.model_validate(r) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StreamError(f"unreadable hazard list {path}: {e}") from e
    now = time.time() if now_s is None else now_s
    return [h.model_dump(mode="json") for h in hazards if h.live(now)]


class HazardService:
    """Consume events and telemetry, publish signed hazards (see the module docstring). A context manager."""

    def __init__(self, url: str, directory: Path, user: str | None = None, password: str | None = None,
                 policy: HazardPolicy | None = None, replicas: int = 1) -> None:
        self.url, self.directory = url, Path(directory)
        self._user, self._password, self._replicas = user, password, replicas
        self.signer = load_signer(self.directory)
        self.book = HazardBook(policy or HazardPolicy())
        self.counts: Counter[str] = Counter()
        self._thread: LoopThread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._written: list[dict[str, Any]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> HazardService:
        self._thread = LoopThread("hazard-service")
        self._thread.start(self._main(self._thread.stopping))
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise StreamError(f"hazard service could not start on {self.url}: {self._error or 'timeout'}")
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop(timeout_s=30)
            self._thread = None

    def __enter__(self) -> HazardService:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------------------------
    async def _main(self, stopping: asyncio.Event) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._stop = stopping
        try:
            self._nc = await nats.connect(self.url, user=self._user, password=self._password, name="hazard-service",
                                          allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                          connect_timeout=5)
            self._js = self._nc.jetstream()
            await ensure_streams(self._js, self._replicas)
            events = await self._js.pull_subscribe("evt.>", durable=EVENTS_DURABLE, stream="EVENTS")
            tel = await self._js.pull_subscribe(
                "tel.>", durable=TELEMETRY_DURABLE, stream="TELEMETRY",
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.ALL))
        except Exception as e:  # noqa: BLE001 - reported to start() as a StreamError
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        tasks = [asyncio.create_task(self._consume(events, self._on_event, 256, ack_all=False)),
                 asyncio.create_task(self._consume(tel, self._on_telemetry, 1024, ack_all=True)),
                 asyncio.create_task(self._rounds())]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)  # each loop also ends by itself at its next fetch timeout
        try:
            await self._nc.close()
        except Exception as e:  # noqa: BLE001 - closing a broken connection: nothing left to save
            logger.info("hazard service: close: %s", e)

    async def _consume(self, sub: Any, handle: Any, batch: int, ack_all: bool) -> None:
        """Fetch, handle and ack (each message, or the last of a batch under AckPolicy.ALL), then publish."""
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                msgs = await fetch_prompt(sub, batch, FETCH_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a broker outage: the connection reconnects, so do we
                logger.info("hazard service: fetch failed (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            now = time.time()
            for msg in msgs:
                try:
                    handle(msg.subject, msg.data, now)
                except StreamError as e:
                    self.counts["bad_messages"] += 1
                    logger.warning("hazard service: dropped a bad message on %s: %s", msg.subject, e)
            if msgs:
                await (msgs[-1].ack() if ack_all else asyncio.gather(*(m.ack() for m in msgs)))
                await self._publish_due(now)

    def _on_event(self, subject: str, data: bytes, now: float) -> None:
        ev = decode_event(data, subject)
        self.counts["events"] += 1
        if self.book.on_event(ev, now) is not None:
            self.counts["hazard_events"] += 1

    def _on_telemetry(self, subject: str, data: bytes, now: float) -> None:
        tel = decode_telemetry(data, subject)
        self.counts["telemetry"] += 1
        self.counts["cancelled"] += len(self.book.on_telemetry(tel, now))

    async def _rounds(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            await asyncio.sleep(ROUND_S)
            await self._publish_due(time.time())

    async def _publish_due(self, now: float) -> None:
        due = self.book.due(now)
        for hazard in due:
            data = encode_hazard(self.signer.sign(hazard))
            for cell in hazard_cells(hazard.relevance.cells, hazard.direction):
                await self._nc.publish(hazard_subject(hazard.road, cell), data,
                                       headers={"Nats-Msg-Id": hazard_msg_id(data, cell)})
            self.counts["published"] += 1
        if due:
            try:
                await self._nc.flush(timeout=2)
            except Exception as e:  # noqa: BLE001 - a broker outage; repetitions cover what was lost
                logger.info("hazard service: flush failed: %s", e)
        self._write_active(now)

    def _write_active(self, now: float) -> None:
        rows = [self.signer.sign(h).model_dump(mode="json") for h in self.book.active(now)]  # as vehicles get them
        if rows == self._written:
            return
        self._written = rows
        try:
            write_atomic(self.directory / ACTIVE_NAME, (json.dumps({"hazards": rows}, indent=1) + "\n").encode())
        except OSError as e:
            logger.warning("hazard service: cannot write %s: %s", self.directory / ACTIVE_NAME, e)

    def active_rows(self) -> list[dict[str, Any]]:
        """The active hazards as last written to ``active.json`` (signed, JSON-ready); safe from any thread."""
        return list(self._written or [])

    def stats(self) -> dict[str, int]:
        """Counts so far and how many hazards are active (as last written: the book is the loop thread's)."""
        return {**self.counts, "active": len(self._written or [])}
