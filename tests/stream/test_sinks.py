"""The cloud's stream consumers: bad input dropped and counted, per-vehicle order with 4 workers, an event
index idempotent on (vehicle, seq) beyond the broker's de-dup window, and segments with live events first."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import nats
import pytest
from prometheus_client import generate_latest

from driveloop.cloud.broker import EmbeddedBroker
from driveloop.cloud.catalog import Catalog, SegmentRecord
from driveloop.cloud.stream_sinks import (
    ConsumerSpec,
    EventIndex,
    Rejected,
    SinkRunner,
    StreamMetrics,
    parse_message,
    run_consumer,
    shard_of,
    standard_consumers,
)
from driveloop.contracts.segment import SegmentMeta
from driveloop.contracts.stream import MAX_MESSAGE_BYTES, VehicleEvent, encode
from tests.fakes.wait import wait_until
from tests.stream.conftest import ensure, evt, tel

PARSE_CASES = [
    ("ok telemetry", "tel.v1", encode(tel("v1", 1)), None),
    ("ok event", "evt.v1.aeb", encode(evt("v1", 1)), None),
    ("oversized", "tel.v1", b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
    ("malformed", "tel.v1", b"{", "malformed"),
    ("body names another vehicle", "tel.v1", encode(tel("v2", 1)), "subject_mismatch"),
    ("kind differs from subject", "evt.v1.fcw", encode(evt("v1", 1, "aeb")), "subject_mismatch"),
    ("unknown vehicle", "tel.ghost", encode(tel("ghost", 1)), "unknown_vehicle"),
    ("not a vehicle subject", "tel.a.b", encode(tel("a.b", 1)), "bad_subject"),
]


@pytest.mark.parametrize("name,subject,data,reason", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_message(name: str, subject: str, data: bytes, reason: str | None) -> None:
    got = parse_message(subject, data, known=lambda v: v != "ghost")
    if reason is None:
        assert not isinstance(got, Rejected) and got.vehicle_id == "v1"
    else:
        assert isinstance(got, Rejected) and got.reason == reason


def test_bad_messages_are_dropped_counted_and_acked(broker: EmbeddedBroker, tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    metrics = StreamMetrics()
    sinks = SinkRunner(broker.url, standard_consumers(EventIndex(catalog), metrics), metrics,
                       known=lambda v: v in {"v1"}).start()

    async def publish() -> None:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        await js.publish("evt.v1.aeb", b"{not json")
        await js.publish("evt.ghost.aeb", encode(evt("ghost", 1)))
        await js.publish("evt.v1.fcw", encode(evt("v1", 2, "aeb")))
        await js.publish("evt.v1.aeb", encode(evt("v1", 3)))
        await nc.close()

    try:
        asyncio.run(publish())
        assert wait_until(lambda: metrics.lag.labels("event-index")._value.get() == 0
                     and len(catalog.stream_events()) == 1)
        assert [e.seq for e in catalog.stream_events()] == [3]
        text = generate_latest(metrics.registry).decode()
        for reason in ("malformed", "unknown_vehicle", "subject_mismatch"):
            assert f'driveloop_stream_dropped_total{{reason="{reason}",stream="EVENTS"}} 2.0' in text  # index + metrics
        assert 'driveloop_stream_events_total{kind="aeb"} 1.0' in text
    finally:
        sinks.stop()
        catalog.close()

    async def pending() -> int:  # acked: nothing left to redeliver
        nc = await nats.connect(broker.url)
        info = await nc.jetstream().consumer_info("EVENTS", "event-index")
        await nc.close()
        return info.num_pending + info.num_ack_pending

    assert asyncio.run(pending()) == 0


def test_per_vehicle_order_with_four_parallel_workers(broker: EmbeddedBroker) -> None:
    vehicles = [f"v{i}" for i in range(8)]
    per_vehicle = 150
    handled: dict[str, list[int]] = {v: [] for v in vehicles}
    workers_of: dict[str, set[int]] = {v: set() for v in vehicles}
    lock = threading.Lock()
    rng = random.Random(3)

    def slow_handler(batch: list) -> None:
        time.sleep(rng.uniform(0.0, 0.01))  # workers finish out of step with each other

    def on_handled(worker: int, batch: list) -> None:
        with lock:
            for m in batch:
                handled[m.vehicle_id].append(m.seq)
                workers_of[m.vehicle_id].add(worker)

    async def run() -> None:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        for seq in range(per_vehicle):  # interleaved across vehicles, as a fleet publishes
            for v in vehicles:
                await js.publish_async(f"tel.{v}", encode(tel(v, seq)))
        await js.publish_async_completed()
        stop = asyncio.Event()
        spec = ConsumerSpec("order-test", "TELEMETRY", "tel.>", slow_handler, workers=4, batch=64)
        task = asyncio.create_task(run_consumer(js, spec, StreamMetrics(), stop, on_handled=on_handled))
        deadline = time.monotonic() + 120
        while sum(len(s) for s in handled.values()) < len(vehicles) * per_vehicle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await nc.close()

    asyncio.run(run())
    for v in vehicles:
        assert handled[v] == list(range(per_vehicle)), v
        assert workers_of[v] == {shard_of(v, 4)}
    assert len({shard_of(v, 4) for v in vehicles}) >= 2  # the fixture really spreads over workers


def test_event_index_is_idempotent_beyond_the_dedup_window(tmp_path: Path) -> None:
    broker = EmbeddedBroker.embedded(tmp_path / "nats").start()
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    metrics = StreamMetrics()
    try:
        ensure(broker.url, dedup_s=0.5)
        sinks = SinkRunner(broker.url, standard_consumers(EventIndex(catalog), metrics), metrics).start()
        data = encode(evt("v1", 42))

        async def publish_twice() -> int:
            nc = await nats.connect(broker.url)
            js = nc.jetstream()
            await js.publish("evt.v1.aeb", data, headers={"Nats-Msg-Id": "v1:42"})
            await asyncio.sleep(1.5)  # past the broker's de-dup window: it stores the resend again
            ack = await js.publish("evt.v1.aeb", data, headers={"Nats-Msg-Id": "v1:42"})
            stored = (await js.stream_info("EVENTS")).state.messages
            await nc.close()
            assert not ack.duplicate
            return stored

        try:
            assert asyncio.run(publish_twice()) == 2
            assert wait_until(lambda: metrics.consumed.labels("EVENTS")._value.get() >= 4)  # index + metrics, twice
            assert [(e.vehicle, e.seq) for e in catalog.stream_events()] == [("v1", 42)]
        finally:
            sinks.stop()
    finally:
        catalog.close()
        broker.stop()


def _segment(vehicle: str, start: float, sha: str) -> SegmentRecord:
    meta = SegmentMeta(vehicle=vehicle, scenario="nominal", seed=0, model_version="1", start_s=start,
                       end_s=start + 20.0, n_ticks=200, events={}, has_event=False, priority=0,
                       recorded_at_unix_s=0.0)
    return SegmentRecord(sha256=sha * 64, meta=meta, size=1, ingested_at_s=0.0)


def test_segments_with_live_events_come_first(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        for start, sha in ((0.0, "a"), (20.0, "b"), (40.0, "c")):
            catalog.add_segment(_segment("v1", start, sha))
        assert [r.sha256[0] for r in catalog.new_segments()] == ["a", "b", "c"]  # no live events: by time
        index = EventIndex(catalog)
        index.add([evt("v1", 7, "aeb_full", t_s=45.0), evt("v2", 8, "aeb_full", t_s=5.0)])  # v2 has no segment
        assert [r.sha256[0] for r in catalog.new_segments()] == ["c", "a", "b"]
        assert [r.sha256[0] for r in catalog.new_segments(limit=1)] == ["c"]
        assert index.vehicles_with_recent("aeb_full", since_wall_ts=time.time() - 60) == ["v1", "v2"]
        assert [e.seq for e in index.events_near("v1", 44.0, window_s=2.0)] == [7]
        assert index.events_near("v1", 30.0, window_s=2.0) == []
    finally:
        catalog.close()


def test_vehicle_event_kinds_are_a_closed_set() -> None:
    with pytest.raises(ValueError):
        VehicleEvent.model_validate({**evt("v1", 1).model_dump(), "kind": "made_up"})
