"""Shipping a vehicle's log spool through the fleet's event stream (``log.<vehicle>``), beside HTTPS.

Same spool, same batch body (:func:`~driveloop.edge.logship.batch_body`), same (vehicle, ``event.sequence``)
keys and the same :class:`~driveloop.edge.logship.ShipResult` as :class:`~driveloop.edge.logship.LogShipper`;
what differs is the transport and so the moment a line may leave the spool.

Rules it keeps:
- A batch is one message of at most ``MAX_LOG_BATCH_BYTES`` (headers included: its body at most
  ``MAX_LOG_PAYLOAD_BYTES``) on ``log.<vehicle>`` whose message id is derived from (vehicle, first seq, last
  seq) (``contracts.stream.log_batch_msg_id``): a re-sent batch is stored once by the broker inside its de-dup
  window, and the index keys lines on (vehicle, seq) beyond it.
- Lines leave the log spool only once the broker acked their batch (stored, or a duplicate of a stored one).
  Not when the VehicleStream's own disk spool took it: that spool is a byte-capped FIFO evicting its oldest
  segment, blind to levels, so handing lines over would move them out of the log spool's cap (DEBUG evicted
  first, every eviction counted) into one that can lose an AEB line. The stream's spool holds only copies.
- WARNING and above go first, as over HTTPS (``logship.URGENT_LEVEL``): after an outage an AEB line does not
  wait behind the backlog of chatter. Urgent batches hold only urgent lines; a line already in a batch in
  flight is never put in a second one (the index keys lines on (vehicle, seq), so order of arrival is free).
- At most ``window`` batches await their ack: during an outage the log spool grows within its cap, the
  stream keeps the window's copies and replays them after reconnecting, and shipping carries on from there.
- A batch still unanswered after ``resend_after_s`` of *connected* time (its copy was lost) is published
  again under the same id. A batch the broker refuses for good, or a line that cannot fit one message, is
  dropped and counted as rejected: sending it again cannot help, and it would hold back every later line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from driveloop.contracts.stream import MAX_LOG_PAYLOAD_BYTES, log_batch_msg_id, log_subject
from driveloop.core.exceptions import ConfigError, DriveloopError
from driveloop.edge.logship import DEFAULT_BATCH_LINES, URGENT_LEVEL, ShipResult, batch_body
from driveloop.edge.logspool import LogSpool

__all__ = ["RawPublisher", "StreamLogShipper", "StreamLogPump", "cut_batch", "body_bytes"]

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 4  # batches awaiting their ack per vehicle (4 x 64 KiB in the stream's spool at most)
RESEND_AFTER_S = 60.0  # connected seconds without an answer before a batch goes again (< the de-dup window)
_EMPTY_BODY = len(batch_body([]))


class RawPublisher(Protocol):
    """What the shipper needs of ``edge.stream_client.VehicleStream``."""

    def publish_raw(self, subject: str, payload: bytes, message_id: str | None = None) -> None: ...

    def settled_raw(self) -> list[tuple[str, str]]: ...

    def connected(self) -> bool: ...


def body_bytes(lines: Sequence[str]) -> int:
    """The size of :func:`batch_body` of ``lines`` without building it."""
    return _EMPTY_BODY + sum(len(s.encode("utf-8")) for s in lines) + max(0, len(lines) - 1)


def cut_batch(pending: Sequence[tuple[int, str]], max_bytes: int, max_lines: int
              ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(the longest prefix of ``pending`` whose batch fits ``max_bytes`` and ``max_lines``, the first line if it
    cannot fit a batch even alone). Exactly one of the two is non-empty when ``pending`` is."""
    batch: list[tuple[int, str]] = []
    size = _EMPTY_BODY - 1  # the first line adds no comma
    for seq, line in pending[:max_lines]:
        n = len(line.encode("utf-8")) + 1
        if size + n > max_bytes:
            break
        batch.append((seq, line))
        size += n
    if not batch and pending:
        return [], [pending[0]]
    return batch, []


@dataclass
class _Batch:
    msg_id: str
    seqs: list[int]
    payload: bytes
    urgent: bool = False  # cut from the WARNING-and-above lines only
    waited_s: float = 0.0  # connected time since it was (last) published


class StreamLogShipper:
    """Drains one vehicle's spool through its stream (see the module docstring). :meth:`pump` never blocks
    (a drive calls it periodically); :meth:`ship` pumps until the spool is empty or ``timeout_s`` passes."""

    def __init__(self, vehicle_id: str, spool: LogSpool, stream: RawPublisher, batch_lines: int = DEFAULT_BATCH_LINES,
                 window: int = DEFAULT_WINDOW, resend_after_s: float = RESEND_AFTER_S,
                 max_batch_bytes: int = MAX_LOG_PAYLOAD_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        if batch_lines < 1 or window < 1:
            raise ConfigError(f"batch_lines and window must be >= 1, got {batch_lines} and {window}")
        if not _EMPTY_BODY < max_batch_bytes <= MAX_LOG_PAYLOAD_BYTES:
            raise ConfigError(f"max_batch_bytes must be in ({_EMPTY_BODY}, {MAX_LOG_PAYLOAD_BYTES}]")
        self.vehicle_id, self.spool, self.stream = vehicle_id, spool, stream
        self.batch_lines, self.window, self.resend_after_s = batch_lines, window, resend_after_s
        self.max_batch_bytes = max_batch_bytes
        self.subject = log_subject(vehicle_id)
        self._clock = clock
        self._last = clock()
        self._inflight: dict[str, _Batch] = {}  # msg id -> batch, in publish order
        self._lock = threading.Lock()  # pump() from a drive's thread, ship() from the caller's at the end

    def in_flight(self) -> int:
        return len(self._inflight)

    def pump(self) -> ShipResult:
        """Settle answered batches (their lines leave the spool), resend overdue ones, publish new ones."""
        with self._lock:
            result = ShipResult()
            try:
                self._settle(result)
                self._resend()
                self._publish(result)
            except DriveloopError as e:  # a closed stream, a full disk: the lines stay for the next attempt
                result.error = f"{type(e).__name__}: {e}"
                logger.info("log shipping of %s over the stream paused: %s", self.vehicle_id, e)
            return result

    def ship(self, max_batches: int | None = None, timeout_s: float = 10.0, poll_s: float = 0.01) -> ShipResult:
        """Pump until the spool is empty and every batch is answered, ``max_batches`` were answered, or
        ``timeout_s`` passed (then ``error`` says how many lines wait; they are still in the spool)."""
        total = ShipResult()
        deadline = self._clock() + timeout_s
        while True:
            step = self.pump()
            for key in ("batches", "sent", "accepted", "duplicates", "rejected"):
                setattr(total, key, getattr(total, key) + getattr(step, key))
            total.error = step.error or total.error
            if (not self._inflight and not self.spool.pending(1)) or (
                    max_batches is not None and total.batches >= max_batches):
                if not total.rejected:  # a pause that recovered is no error; a refusal stays reported
                    total.error = None
                return total
            if self._clock() >= deadline:
                waiting = self.spool.stats().lines
                total.error = step.error or (f"{waiting} line(s) not acknowledged by the broker within {timeout_s:g} s "
                                             f"({'connected' if self.stream.connected() else 'disconnected'}); kept")
                return total
            time.sleep(poll_s)

    # -- the steps ----------------------------------------------------------------------------------------
    def _settle(self, result: ShipResult) -> None:
        for mid, outcome in self.stream.settled_raw():
            batch = self._inflight.pop(mid, None)
            if batch is None:  # the answer to a copy already settled (a resend)
                continue
            self.spool.ack(batch.seqs)
            result.batches += 1
            if outcome == "stored":
                result.accepted += len(batch.seqs)
            elif outcome == "duplicate":
                result.duplicates += len(batch.seqs)
            else:
                result.rejected += len(batch.seqs)
                result.error = f"the broker refused log batch {mid} for good"
                logger.warning("vehicle %s: %d log line(s) dropped: the broker refused batch %s", self.vehicle_id,
                               len(batch.seqs), mid)

    def _resend(self) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if not self.stream.connected():
            return
        for batch in self._inflight.values():
            batch.waited_s += elapsed
            if batch.waited_s >= self.resend_after_s:
                logger.info("vehicle %s: log batch %s unanswered for %.0f s, sending it again", self.vehicle_id,
                            batch.msg_id, batch.waited_s)
                batch.waited_s = 0.0
                self.stream.publish_raw(self.subject, batch.payload, batch.msg_id)

    def _publish(self, result: ShipResult) -> None:
        taken = {s for b in self._inflight.values() for s in b.seqs}
        # One cursor per kind of batch: urgent batches run ahead of the others through the spool.
        after = {kind: max((b.seqs[-1] for b in self._inflight.values() if b.urgent is kind), default=-1)
                 for kind in (True, False)}
        while len(self._inflight) < self.window:
            urgent = True
            pending = self._untaken(after[True], taken, URGENT_LEVEL)
            if not pending:
                urgent = False
                pending = self._untaken(after[False], taken, None)
            if not pending:
                return
            lines, too_big = cut_batch(pending, self.max_batch_bytes, self.batch_lines)
            if too_big:
                seq = too_big[0][0]
                self.spool.ack([seq])
                result.rejected += 1
                logger.warning("vehicle %s: log line %d is too large for one stream message, dropped",
                               self.vehicle_id, seq)
                after[urgent] = seq
                continue
            seqs = [s for s, _ in lines]
            batch = _Batch(log_batch_msg_id(self.vehicle_id, seqs[0], seqs[-1]), seqs,
                           batch_body([line for _, line in lines]), urgent)
            self.stream.publish_raw(self.subject, batch.payload, batch.msg_id)
            self._inflight[batch.msg_id] = batch
            taken.update(seqs)
            result.sent += len(seqs)
            after[urgent] = seqs[-1]

    def _untaken(self, after: int, taken: set[int], min_level: str | None) -> list[tuple[int, str]]:
        """The oldest ``batch_lines`` spooled lines above ``after`` not already in a batch in flight."""
        skip = sum(1 for s in taken if s > after)  # those the query can return (mostly the other kind's)
        rows = self.spool.pending(self.batch_lines + skip, after=after, min_level=min_level)
        return [row for row in rows if row[0] not in taken][:self.batch_lines]


class StreamLogPump:
    """Pumps every vehicle's shipper every ``interval_s`` in one daemon thread while a drive runs (a line is
    in the cloud seconds after it was logged, not after the drive)."""

    def __init__(self, shippers: Sequence[StreamLogShipper], interval_s: float = 0.2) -> None:
        self.shippers, self.interval_s = list(shippers), interval_s
        self.totals = ShipResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-stream-pump", daemon=True)

    def start(self) -> StreamLogPump:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for shipper in self.shippers:
                try:
                    step = shipper.pump()
                except Exception:  # a bug must not end shipping for the other vehicles; the lines stay spooled
                    logger.exception("log stream pump failed for %s", shipper.vehicle_id)
                    continue
                for key in ("batches", "sent", "accepted", "duplicates", "rejected"):
                    setattr(self.totals, key, getattr(self.totals, key) + getattr(step, key))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
