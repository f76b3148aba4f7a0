"""Vehicle logs over the stream: batches cut to the LOGS limit, checked whole by the LOGS consumer, and with a
real nats-server: shipped lines are searchable, a broker outage within the spool cap loses nothing (every line
indexed exactly once), a vehicle cannot ship lines as another, and a malformed batch is dropped and counted."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from prometheus_client import generate_latest

from driveloop.cloud.broker import EmbeddedBroker
from driveloop.cloud.log_stream import LogStreamService, StreamedBatch, parse_log_batch
from driveloop.cloud.logindex import LogIndex, LogQuery
from driveloop.cloud.stream_sinks import Rejected
from driveloop.contracts.stream import MAX_LOG_BATCH_BYTES, MAX_LOG_PAYLOAD_BYTES, log_batch_msg_id, log_subject
from driveloop.core.exceptions import StreamError
from driveloop.core.logfmt import render_json
from driveloop.edge.logship import batch_body
from driveloop.edge.logspool import LogSpool
from driveloop.edge.logstream import StreamLogShipper, body_bytes, cut_batch
from driveloop.edge.stream_client import VehicleStream
from tests.fakes.wait import wait_until


def _fields(vid: str, i: int, level: str = "info", message: str | None = None) -> dict[str, object]:
    return {"@timestamp": "2030-01-01T00:00:00.000Z", "log.level": level, "service.name": "vehicle",
            "message": message or f"line {i:05d} of {vid}", "vehicle.id": vid}


def _line(vid: str, seq: int, **kw: object) -> str:
    return render_json({**_fields(vid, seq), "event.sequence": seq, **kw})


# -- pure: cutting batches, checking them ---------------------------------------------------------------------


def test_a_batch_is_cut_to_the_byte_and_line_limits() -> None:
    pending = [(i, _line("v1", i)) for i in range(50)]
    one = len(batch_body([pending[0][1]]))
    batch, too_big = cut_batch(pending, max_bytes=one * 3, max_lines=500)
    assert too_big == [] and 1 < len(batch) < 4
    assert body_bytes([t for _, t in batch]) == len(batch_body([t for _, t in batch])) <= one * 3
    longer = batch + [pending[len(batch)]]
    assert len(batch_body([t for _, t in longer])) > one * 3  # the longest prefix that fits, not a shorter one
    assert cut_batch(pending, MAX_LOG_BATCH_BYTES, 7) == (pending[:7], [])
    assert cut_batch(pending, one - 1, 500) == ([], [pending[0]])  # alone it cannot fit: handed back as such
    assert cut_batch([], MAX_LOG_BATCH_BYTES, 10) == ([], [])


def _body(*lines: object) -> bytes:
    return json.dumps({"lines": list(lines)}).encode()


GOOD = json.loads(_line("v1", 0))
PARSE_CASES = [
    ("valid", "log.v1", _body(GOOD, json.loads(_line("v1", 1))), None, 2, 0),
    ("dotted vehicle", "log.v~2", _body(json.loads(_line("v.2", 0))), None, 1, 0),
    ("oversized", "log.v1", b" " * (MAX_LOG_BATCH_BYTES + 1), "oversized", 0, 0),
    ("not a log subject", "tel.v1", _body(GOOD), "bad_subject", 0, 0),
    ("two-token subject", "log.v1.x", _body(GOOD), "bad_subject", 0, 0),
    ("not JSON", "log.v1", b"{nope", "malformed", 0, 0),
    ("not a batch", "log.v1", json.dumps([GOOD]).encode(), "malformed", 0, 0),
    ("extra key", "log.v1", json.dumps({"lines": [GOOD], "x": 1}).encode(), "malformed", 0, 0),
    ("empty", "log.v1", _body(), "malformed", 0, 0),
    ("a line of another vehicle", "log.v1", _body(GOOD, json.loads(_line("v3", 1))), "subject_mismatch", 0, 0),
    ("a line naming no vehicle", "log.v1", _body(GOOD, {k: v for k, v in GOOD.items() if k != "vehicle.id"}),
     "subject_mismatch", 0, 0),
    ("a line that is no object", "log.v1", _body(GOOD, "hello"), "subject_mismatch", 0, 0),
    ("unknown vehicle", "log.ghost", _body(json.loads(_line("ghost", 0))), "unknown_vehicle", 0, 0),
    ("one invalid line among valid ones", "log.v1", _body(GOOD, {**json.loads(_line("v1", 1)), "log.level": "loud"},
                                                          json.loads(_line("v1", 2))), None, 2, 1),
]


@pytest.mark.parametrize("name,subject,data,reason,lines,rejected", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_log_batch(name: str, subject: str, data: bytes, reason: str | None, lines: int, rejected: int) -> None:
    got = parse_log_batch(subject, data, known=lambda v: v != "ghost")
    if reason is None:
        assert isinstance(got, StreamedBatch)
        assert (len(got.lines), got.rejected) == (lines, rejected)
        assert {line.vehicle_id for line in got.lines} == {subject.split(".")[1].replace("~", ".")}
        assert (got.error is None) == (rejected == 0)
    else:
        assert isinstance(got, Rejected) and got.reason == reason, got


def test_the_batch_id_names_the_vehicle_and_its_line_range() -> None:
    assert log_batch_msg_id("v.2", 10, 19) == "v.2:log:10-19"
    assert log_batch_msg_id("v1", 0, 9) != log_batch_msg_id("v1", 0, 8)


# -- with a real nats-server ------------------------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LogIndex]:
    ix = LogIndex(f"sqlite:///{tmp_path / 'logs.db'}")
    yield ix
    ix.close()


def _vehicle_lines(ix: LogIndex, vid: str) -> list[dict]:
    return ix.search(LogQuery(vehicle=vid, limit=10_000))


def test_shipped_lines_are_searchable(secured, index: LogIndex, tmp_path: Path) -> None:
    broker, passwords, service_pw = secured
    spool = LogSpool(tmp_path / "spool" / "v.2.db")
    spool.append_many([_fields("v.2", i) for i in range(1200)])
    spool.append(_fields("v.2", 1200, level="warning", message="aeb activated at 24.1 m/s"))
    stream = VehicleStream("v.2", broker.url, tmp_path / "stream", user="v.2", password=passwords["v.2"])
    try:
        with LogStreamService(broker.url, index, "svc-test", service_pw) as service:
            shipper = StreamLogShipper("v.2", spool, stream)
            need = math.ceil(body_bytes([t for _, t in spool.pending(5000)]) / MAX_LOG_BATCH_BYTES)
            result = shipper.ship(timeout_s=60)
            assert result.error is None, result.error
            assert result.sent == result.accepted == 1201 and result.duplicates == result.rejected == 0
            assert need >= 2 and result.batches >= need  # 1,201 lines do not fit one 64 KiB message
            assert spool.stats().lines == 0  # every line acked by the broker left the spool
            assert service.drain(60)
            hits = index.search(LogQuery(text="aeb", vehicle="v.2"))
            assert [h["message"] for h in hits] == ["aeb activated at 24.1 m/s"]
            assert hits[0]["vehicle.id"] == "v.2" and hits[0]["event.sequence"] == 1200
            assert len(_vehicle_lines(index, "v.2")) == 1201
            assert service.stats()["indexed"] == 1201 and service.stats()["dropped_batches"] == {}
    finally:
        stream.close()
        spool.close()


def test_a_broker_outage_within_the_cap_loses_nothing(broker: EmbeddedBroker, index: LogIndex,
                                                      tmp_path: Path) -> None:
    spool = LogSpool(tmp_path / "spool" / "v1.db", cap_bytes=4 << 20)
    stream = VehicleStream("v1", broker.url, tmp_path / "stream", ack_timeout_s=1.0)
    service = LogStreamService(broker.url, index).start()
    try:
        shipper = StreamLogShipper("v1", spool, stream, batch_lines=100)
        spool.append_many([_fields("v1", i) for i in range(300)])
        assert shipper.ship(timeout_s=60).error is None
        broker.kill()  # kill -9: no goodbye to anyone
        assert wait_until(lambda: not stream.connected(), 30)
        for i in range(300, 3300, 100):  # the vehicle keeps logging through the outage
            spool.append_many([_fields("v1", j) for j in range(i, i + 100)])
            shipper.pump()
        down = shipper.ship(timeout_s=2)
        assert down.accepted == 0 and down.error is not None and "kept" in down.error
        assert spool.stats().lines == 3000 and spool.stats().evicted_total == 0  # all held, nothing evicted
        assert shipper.in_flight() == shipper.window  # only a window's copies went to the stream's spool
        broker.start()
        result = shipper.ship(timeout_s=120)
        assert result.error is None and result.accepted + result.duplicates == 3000
        assert spool.stats().lines == 0
        assert service.drain(120)
        seqs = sorted(line["event.sequence"] for line in _vehicle_lines(index, "v1"))
        assert seqs == list(range(3300))  # every line once: none lost, none doubled
        assert index.count() == 3300
        assert service.stats()["indexed"] == 3300  # stored once each, whatever was re-sent around the outage
    finally:
        service.stop()
        stream.close()
        spool.close()


def test_a_warning_ships_ahead_of_a_backlog(broker: EmbeddedBroker, index: LogIndex, tmp_path: Path) -> None:
    """3,000 lines of chatter wait (as after an outage), then an AEB line: the first batch answered carries the AEB
    line, and the chatter still arrives whole afterwards, each line once."""
    spool = LogSpool(tmp_path / "spool" / "v1.db", cap_bytes=4 << 20)
    stream = VehicleStream("v1", broker.url, tmp_path / "stream", ack_timeout_s=1.0)
    service = LogStreamService(broker.url, index).start()
    try:
        shipper = StreamLogShipper("v1", spool, stream, batch_lines=100, window=1)
        spool.append_many([_fields("v1", i) for i in range(3000)])
        aeb = spool.append(_fields("v1", 3000, level="error", message="aeb full braking at 21.0 m/s"))
        first = shipper.pump()
        assert first.sent == 1  # the window's one batch: the AEB line alone, not the oldest 100 lines
        assert wait_until(lambda: shipper.pump().batches == 1, 30)
        assert spool.stats().lines == 3000  # the chatter still waits
        assert service.drain(30)
        hits = index.search(LogQuery(text="aeb", vehicle="v1"))
        assert [h["event.sequence"] for h in hits] == [aeb]
        assert shipper.ship(timeout_s=120).error is None
        assert service.drain(120)
        assert sorted(line["event.sequence"] for line in _vehicle_lines(index, "v1")) == list(range(3001))
    finally:
        service.stop()
        stream.close()
        spool.close()


async def _publish_as(url: str, user: str, password: str, subject: str, payload: bytes) -> list[Exception]:
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    nc = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False)
    await nc.publish(subject, payload, headers={"Nats-Msg-Id": f"test-{time.monotonic_ns()}"})
    await nc.flush()
    await asyncio.sleep(0.3)
    await nc.close()
    return errors


async def _log_messages(url: str, user: str | None, password: str | None) -> int:
    nc = await nats.connect(url, user=user, password=password)
    try:
        return int((await nc.jetstream().stream_info("LOGS")).state.messages)
    finally:
        await nc.close()


def test_a_vehicle_cannot_ship_lines_as_another(secured, index: LogIndex, tmp_path: Path) -> None:
    broker, passwords, service_pw = secured
    with LogStreamService(broker.url, index, "svc-test", service_pw) as service:
        # the broker refuses v1 the subject of v.2
        errors = asyncio.run(_publish_as(broker.url, "v1", passwords["v1"], log_subject("v.2"),
                                         batch_body([_line("v.2", 0)])))
        assert any("permissions violation" in str(e).lower() for e in errors), errors
        assert asyncio.run(_log_messages(broker.url, "svc-test", service_pw)) == 0
        # the client does not even try
        stream = VehicleStream("v1", broker.url, tmp_path / "stream", user="v1", password=passwords["v1"])
        try:
            with pytest.raises(StreamError, match="may publish raw only on"):
                stream.publish_raw(log_subject("v.2"), batch_body([_line("v.2", 0)]))
        finally:
            stream.close()
        # on its own subject, lines naming v.2: the whole batch is dropped, counted, acked
        errors = asyncio.run(_publish_as(broker.url, "v1", passwords["v1"], log_subject("v1"),
                                         batch_body([_line("v1", 0), _line("v.2", 1)])))
        assert errors == []
        assert wait_until(lambda: service.stats()["dropped_batches"].get("subject_mismatch") == 1)
        assert service.drain(30)  # acked: nothing redelivers
        assert _vehicle_lines(index, "v.2") == [] and _vehicle_lines(index, "v1") == []
        assert service.stats()["indexed"] == 0


def test_a_malformed_batch_is_dropped_and_counted(secured, index: LogIndex) -> None:
    broker, passwords, service_pw = secured
    with LogStreamService(broker.url, index, "svc-test", service_pw) as service:
        for payload in (b"{nope", json.dumps({"lines": []}).encode(),
                        batch_body([_line("v1", 0), _line("v1", 1, **{"log.level": "loud"}), _line("v1", 2)])):
            assert asyncio.run(_publish_as(broker.url, "v1", passwords["v1"], log_subject("v1"), payload)) == []
        assert wait_until(lambda: service.stats()["batches"] == 1 and
                     service.stats()["dropped_batches"].get("malformed") == 2)
        assert service.drain(30)
        stats = service.stats()
        # the two malformed batches dropped; in the third, the invalid line refused and its neighbours kept
        assert stats["dropped_batches"] == {"malformed": 2}
        assert (stats["indexed"], stats["rejected_lines"]) == (2, 1)
        assert sorted(line["event.sequence"] for line in _vehicle_lines(index, "v1")) == [0, 2]
        text = generate_latest(service.metrics.registry).decode()
        assert 'driveloop_stream_dropped_total{reason="malformed",stream="LOGS"} 2.0' in text
        assert 'driveloop_stream_log_lines_total{outcome="rejected"} 1.0' in text
        assert 'driveloop_stream_log_lines_total{outcome="indexed"} 2.0' in text


def test_logs_consume_once_indexes_the_stream_for_logs_search(broker: EmbeddedBroker, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cli import main

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DRIVELOOP_NATS_URL", broker.url)
    spool = LogSpool(tmp_path / "spool" / "v1.db")
    spool.append_many([_fields("v1", i) for i in range(40)])
    spool.append(_fields("v1", 40, level="error", message="watchdog: model reply late, fallback braking"))
    stream = VehicleStream("v1", broker.url, tmp_path / "stream")
    try:
        assert StreamLogShipper("v1", spool, stream).ship(timeout_s=60).accepted == 41
    finally:
        stream.close()
        spool.close()
    assert main(["logs", "consume", "--once", "--json"]) == 0
    stats = json.loads(capsys.readouterr()[0])
    assert (stats["indexed"], stats["duplicates"], stats["dropped_batches"]) == (41, 0, {})
    assert main(["logs", "consume", "--once", "--json"]) == 0  # the durable consumer remembers: nothing again
    assert json.loads(capsys.readouterr()[0])["indexed"] == 0
    assert main(["logs", "search", "watchdog", "--json"]) == 0
    found = json.loads(capsys.readouterr()[0])
    assert found["count"] == 1 and found["lines"][0]["vehicle.id"] == "v1"
    assert found["lines"][0]["log.level"] == "error"


def test_a_batch_at_the_payload_limit_is_stored_with_its_header(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """JetStream counts the Nats-Msg-Id header against LOGS' max message size: the largest payload publish_raw
    takes, under the longest message id a vehicle makes, is stored, not refused for good."""
    vid = "v" * 64
    stream = VehicleStream(vid, broker.url, tmp_path / "stream")
    try:
        with pytest.raises(StreamError, match="exceeds"):
            stream.publish_raw(log_subject(vid), b" " * (MAX_LOG_PAYLOAD_BYTES + 1))
        mid = log_batch_msg_id(vid, 2**62, 2**63 - 1)
        stream.publish_raw(log_subject(vid), b" " * MAX_LOG_PAYLOAD_BYTES, mid)
        settled: list[tuple[str, str]] = []
        assert wait_until(lambda: settled.extend(stream.settled_raw()) or settled, 30)
        assert settled == [(mid, "stored")] and stream.stats()["dropped"] == 0
    finally:
        stream.close()
    assert asyncio.run(_log_messages(broker.url, None, None)) == 1
