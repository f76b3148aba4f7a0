"""The vehicle's stream client against a real nats-server: round trip, broker outages, kill -9, restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from driveloop.cloud.broker import EmbeddedBroker
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.stream_sinks import EventIndex, SinkRunner, StreamMetrics, replay_vehicle, standard_consumers
from driveloop.contracts.stream import decode_telemetry
from driveloop.edge import stream_client
from driveloop.edge.stream_client import VehicleStream
from tests.fakes.wait import wait_until
from tests.stream.conftest import ensure, evt, tel


def _replay(url: str, vid: str) -> list[int]:
    async def run() -> list[int]:
        nc = await nats.connect(url)
        try:
            return [m.seq for m in await replay_vehicle(nc.jetstream(), vid, 0.0)]
        finally:
            await nc.close()

    return asyncio.run(run())


def test_publish_round_trip(broker: EmbeddedBroker, tmp_path: Path) -> None:
    vs = VehicleStream("v.1", broker.url, tmp_path / "spool")
    try:
        assert wait_until(vs.connected, 30)  # before the connection is up, messages would go to the spool
        seqs = [vs.next_seq() for _ in range(50)]
        for s in seqs:
            vs.publish(tel("v.1", s, x_m=float(s)))
        assert vs.flush(30)
        stats = vs.stats()
        assert stats["acked"] == 50 and stats["spooled"] == 0 and stats["pending"] == 0
    finally:
        vs.close()
    assert _replay(broker.url, "v.1") == seqs

    async def first() -> bytes:
        nc = await nats.connect(broker.url)
        msg = await nc.jetstream().get_msg("TELEMETRY", subject="tel.v~1", direct=True, next=True, seq=1)
        await nc.close()
        return msg.data

    assert decode_telemetry(asyncio.run(first()), "tel.v~1").seq == 0


def test_seq_survives_restart(broker: EmbeddedBroker, tmp_path: Path) -> None:
    a = VehicleStream("v1", broker.url, tmp_path / "spool")
    used = [a.next_seq() for _ in range(5)]
    a.close()
    b = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        assert b.next_seq() > max(used)
    finally:
        b.close()


def test_offline_ten_minutes_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    """6,000 messages (10 minutes at 10 Hz) generated while the broker is down, then it comes up."""
    broker = EmbeddedBroker.embedded(tmp_path / "nats")  # not started: the vehicle is offline
    vs = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        for _ in range(6000):
            vs.publish(tel("v1", vs.next_seq()))
        assert wait_until(lambda: vs.stats()["spooled"] == 6000, 30)
        assert vs.stats()["acked"] == 0
        broker.start()
        ensure(broker.url)
        assert vs.flush(120)
        stats = vs.stats()
        assert stats["acked"] == 6000 and stats["replayed"] == 6000 and stats["dropped"] == 0
        assert _replay(broker.url, "v1") == list(range(6000))
    finally:
        vs.close()
        broker.stop()


def test_spool_survives_a_vehicle_restart(tmp_path: Path) -> None:
    broker = EmbeddedBroker.embedded(tmp_path / "nats")
    first = VehicleStream("v1", broker.url, tmp_path / "spool")
    for _ in range(300):
        first.publish(tel("v1", first.next_seq()))
    first.close()  # the vehicle powers off with 300 unsent messages
    second = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        later = second.next_seq()
        second.publish(tel("v1", later))
        broker.start()
        ensure(broker.url)
        assert second.flush(60)
        assert _replay(broker.url, "v1") == [*range(300), later]
    finally:
        second.close()
        broker.stop()


def test_kill_9_mid_stream_loses_nothing_acked_and_sink_has_no_duplicate(tmp_path: Path) -> None:
    broker = EmbeddedBroker.embedded(tmp_path / "nats")
    broker.start()
    ensure(broker.url)
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    metrics = StreamMetrics()
    sinks = SinkRunner(broker.url, standard_consumers(EventIndex(catalog), metrics), metrics).start()
    vs = VehicleStream("v1", broker.url, tmp_path / "spool", ack_timeout_s=2.0)
    total = 1500
    try:
        for i in range(total):
            vs.publish(evt("v1", vs.next_seq()))
            if i == 600:  # once the broker has acked some (a loaded machine may not have connected yet)
                assert wait_until(lambda: vs.stats()["acked"] > 0, 60)
                acked_before = vs.stats()["acked"]
                broker.kill()  # kill -9 with acks in flight
            if i == 900:
                broker.start()
            if i % 50 == 0:
                time.sleep(0.02)
        assert vs.flush(120), vs.stats()
        assert acked_before > 0
        stats = vs.stats()
        assert stats["acked"] >= total and stats["spooled"] > 0 and stats["reconnects"] >= 1
        assert _replay_events(broker.url) == list(range(total))  # stored once each, in order
        assert wait_until(lambda: len(catalog.stream_events(vehicle="v1")) == total, 60)
        assert [e.seq for e in catalog.stream_events(vehicle="v1")] == list(range(total))
    finally:
        vs.close()
        sinks.stop()
        catalog.close()
        broker.stop()


def _replay_events(url: str) -> list[int]:
    async def run() -> list[int]:
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(url)
        js = nc.jetstream()
        psub = await js.pull_subscribe("evt.v1.>", stream="EVENTS", config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        out: list[int] = []
        while True:
            try:
                msgs = await psub.fetch(1000, timeout=1)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                break
            out += [int(m.headers["Nats-Msg-Id"].split(":")[1]) for m in msgs]
            if msgs[-1].metadata.num_pending == 0:
                break
        await nc.close()
        return out

    return asyncio.run(run())


async def _js_publish(url: str, *pairs: tuple[str, bytes]) -> None:
    """Store ``(subject, payload)`` pairs in their stream, as the cloud's hazard service does."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    for subject, data in pairs:
        await js.publish(subject, data)
    await nc.close()


def test_watch_cells_live_and_late_join(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Stored hazards of newly watched cells arrive once (late join); live ones only for watched cells."""

    asyncio.run(_js_publish(broker.url, ("haz.hw1.2", b"stored-2"), ("haz.hw1.9", b"stored-9"), ("haz.hw2.2", b"other-road")))
    vs = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        assert wait_until(vs.connected, 30)
        vs.watch_cells("hw1", [1, 2, 3])
        got: list[tuple[str, bytes]] = []
        assert wait_until(lambda: got.extend((s, d) for s, d, _ in vs.received()) or len(got) >= 1, 30)
        asyncio.run(_js_publish(broker.url, ("haz.hw1.3", b"live-3"), ("haz.hw1.4", b"live-4")))
        assert wait_until(lambda: got.extend((s, d) for s, d, _ in vs.received()) or len(got) >= 2, 30)
        time.sleep(0.3)
        got.extend((s, d) for s, d, _ in vs.received())
        assert got == [("haz.hw1.2", b"stored-2"), ("haz.hw1.3", b"live-3")]
        vs.watch_cells("hw1", [4, 9])  # moved on: 1-3 dropped, 4 and 9 read from the stream
        assert wait_until(lambda: got.extend((s, d) for s, d, _ in vs.received()) or len(got) >= 4, 30)
        assert sorted(got[2:]) == [("haz.hw1.4", b"live-4"), ("haz.hw1.9", b"stored-9")]
        asyncio.run(_js_publish(broker.url, ("haz.hw1.2", b"after-unwatch")))
        time.sleep(0.3)
        assert vs.received() == []
    finally:
        vs.close()


def test_one_watched_cell_reads_only_its_stored_hazards_and_says_when_settled(broker: EmbeddedBroker,
                                                                               tmp_path: Path) -> None:
    """A driving vehicle watches its own cell: the late-join read takes that subject's stored hazards (not the
    road's), and ``watch_settled`` turns true only once they are read, so a caller can wait for it."""

    asyncio.run(_js_publish(broker.url, ("haz.hw1.8", b"before-8"), ("haz.hw1.9", b"a-9"), ("haz.hw1.10", b"after-10"),
                        ("haz.hw1.9", b"b-9")))
    vs = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        assert wait_until(vs.connected, 30)
        vs.watch_cells("hw1", [9])
        assert wait_until(vs.watch_settled, 30)
        assert [(s, d) for s, d, _ in vs.received()] == [("haz.hw1.9", b"a-9"), ("haz.hw1.9", b"b-9")]
        vs.watch_cells("hw1", [10])  # moved on
        assert wait_until(vs.watch_settled, 30)
        assert [(s, d) for s, d, _ in vs.received()] == [("haz.hw1.10", b"after-10")]
    finally:
        vs.close()


def test_a_hazard_on_several_watched_cells_is_handed_out_once(broker: EmbeddedBroker, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes are handed out once — on several watched cells, and on the next cell a vehicle moves into
    (each copy would cost its filter a decode and a signature check, only to be found a replay) — until they can
    no longer be live (``HANDED_OUT_FOR_S``)."""

    async def publish(*pairs: tuple[str, bytes]) -> None:
        nc = await nats.connect(broker.url)
        for subject, data in pairs:
            await nc.publish(subject, data)
        await nc.flush()
        await nc.close()

    def until(got: list[tuple[str, bytes]], last: bytes) -> bool:
        got.extend((s, d) for s, d, _ in vs.received())
        return any(d == last for _, d in got)

    asyncio.run(publish(("haz.hw1.2", b"marker")))  # stored: its late-join read shows the watch is in place
    vs = VehicleStream("v1", broker.url, tmp_path / "spool")
    try:
        assert wait_until(vs.connected, 30)
        vs.watch_cells("hw1", [2, 3])
        got: list[tuple[str, bytes]] = []
        assert wait_until(lambda: until(got, b"marker"), 30)
        asyncio.run(publish(("haz.hw1.2", b"h"), ("haz.hw1.3", b"h"), ("haz.hw1.3", b"g")))
        assert wait_until(lambda: until(got, b"g"), 30)
        assert got == [("haz.hw1.2", b"marker"), ("haz.hw1.2", b"h"), ("haz.hw1.3", b"g")]
        vs.watch_cells("hw1", [3, 4])  # cell 3 still holds "h": its copy on cell 4 is not news
        asyncio.run(publish(("haz.hw1.4", b"h"), ("haz.hw1.4", b"k")))
        got.clear()
        assert wait_until(lambda: until(got, b"k"), 30)
        assert got == [("haz.hw1.4", b"k")]
        vs.watch_cells("hw1", [5])  # moved on: no watched cell holds "h", but its bytes were handed out
        assert wait_until(vs.watch_settled, 30)
        asyncio.run(publish(("haz.hw1.5", b"h"), ("haz.hw1.5", b"z")))
        got.clear()
        assert wait_until(lambda: until(got, b"z"), 30)
        assert got == [("haz.hw1.5", b"z")]  # the copy on the next cell (read again on each move) is no news
        monkeypatch.setattr(stream_client, "HANDED_OUT_FOR_S", 0.2)  # once it can no longer be live, it would be
        time.sleep(0.2 + 3 * stream_client.TICK_S)
        asyncio.run(publish(("haz.hw1.5", b"h")))
        got.clear()
        assert wait_until(lambda: until(got, b"h"), 30)
        assert got == [("haz.hw1.5", b"h")]
    finally:
        vs.close()
