"""Vehicle logs into the cloud index over a real ingest server on 127.0.0.1: batches from the spool
(no line lost across a disconnect, a resend stored once), a vehicle speaking only for itself, OTLP/HTTP
JSON accepted and bad bodies refused with a 4xx, search filters, FTS fallback, retention."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from driveloop.cloud.auth import register_vehicle
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.ingest import IngestConfig, create_app, serve_in_thread
from driveloop.cloud.log_ingest import LocalLogSink, LogIngest
from driveloop.cloud.logindex import LogIndex, LogQuery, index_url_for
from driveloop.cloud.store import ObjectStore
from driveloop.contracts.logline import LogLine
from driveloop.core.exceptions import ConfigError, UploadError
from driveloop.core.logfmt import log_context, log_event, new_trace_id
from driveloop.core.tokens import hash_token
from driveloop.edge.logship import HttpLogSink, LogShipper
from driveloop.edge.logspool import LogSpool, VehicleLogHandler

ADMIN = "log-admin-token-0123456789"
T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@dataclass
class Cloud:
    app: object
    index: LogIndex
    tokens: dict[str, str]
    clock: Clock
    url: str = ""


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    clock = Clock()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    index = LogIndex(index_url_for(f"sqlite:///{tmp_path / 'catalog.db'}"), clock=clock)
    config = IngestConfig(staging_dir=tmp_path / "uploads", admin_token_hash=hash_token(ADMIN))
    app = create_app(ObjectStore(tmp_path / "store"), catalog, config, clock=clock, logs=index)
    tokens = {v: register_vehicle(catalog, v, clock()) for v in ("veh001", "veh002")}
    yield Cloud(app, index, tokens, clock)
    index.close()
    catalog.close()


def _line(i: int, level: str = "info", vehicle: str | None = "veh001", **kw: object) -> dict[str, object]:
    d: dict[str, object] = {"@timestamp": f"2030-01-01T00:00:{i % 60:02d}.000Z", "log.level": level,
                            "service.name": "vehicle", "message": f"tick {i}", "event.sequence": i, **kw}
    if vehicle is not None:
        d["vehicle.id"] = vehicle
    return d


def _spool_lines(spool: LogSpool, n: int, start: int = 0) -> None:
    spool.append_many([{k: v for k, v in _line(start + i).items() if k != "event.sequence"} for i in range(n)])


def test_no_line_lost_across_a_disconnect(cloud: Cloud, tmp_path: Path) -> None:
    spool = LogSpool(tmp_path / "veh001.db", cap_bytes=10**7)
    with serve_in_thread(cloud.app) as url:
        port = int(url.rsplit(":", 1)[1])
        sink = HttpLogSink(url, cloud.tokens["veh001"])
        shipper = LogShipper("veh001", spool, sink, batch_lines=100)
        _spool_lines(spool, 250)
        first = shipper.ship()
        assert (first.batches, first.sent, first.accepted, first.error) == (3, 250, 250, None)
    # The server is gone: the vehicle keeps logging and keeps every line.
    _spool_lines(spool, 400, start=250)
    cut = shipper.ship()
    assert cut.batches == 0 and cut.error is not None and "UploadError" in cut.error
    assert spool.stats().lines == 400
    with serve_in_thread(cloud.app, port=port):
        back = shipper.ship()
    assert (back.sent, back.accepted, back.duplicates, back.error) == (400, 400, 0, None)
    assert spool.stats().lines == 0 and spool.stats().evicted_total == 0
    held = cloud.index.search(LogQuery(vehicle="veh001", limit=10_000))
    assert sorted(x["event.sequence"] for x in held) == list(range(650))


def test_a_resent_batch_is_stored_once(cloud: Cloud) -> None:
    with serve_in_thread(cloud.app) as url:
        sink = HttpLogSink(url, cloud.tokens["veh001"])
        lines = [json.dumps(_line(i)) for i in range(20)]
        assert sink.send("veh001", lines).accepted == 20
        again = sink.send("veh001", lines)  # the first answer was "lost": the vehicle sends again
    assert (again.accepted, again.duplicates) == (0, 20)
    assert cloud.index.count() == 20


def test_a_vehicle_speaks_only_for_itself(cloud: Cloud) -> None:
    with serve_in_thread(cloud.app) as url:
        sink = HttpLogSink(url, cloud.tokens["veh001"])
        ack = sink.send("veh001", [json.dumps(_line(0)), json.dumps(_line(1, vehicle="veh002")),
                                   json.dumps(_line(2, vehicle=None))])
        bad = sink.send("veh001", [json.dumps(_line(3)), '{"message": "not a line"}'])
    assert (ack.accepted, ack.rejected) == (2, 1)
    assert ack.error is not None and "veh002" in ack.error
    assert (bad.accepted, bad.rejected) == (1, 1) and bad.error == "line 1: @timestamp: Field required"
    held = cloud.index.search(LogQuery(limit=100))
    assert sorted((x["vehicle.id"], x["event.sequence"]) for x in held) == [("veh001", 0), ("veh001", 2),
                                                                            ("veh001", 3)]


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("veh001.wrong", 401), ("garbage", 401)])
def test_batch_needs_a_vehicle_token(cloud: Cloud, token: str | None, status: int) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs/batch", json={"lines": [_line(0)]}, headers=headers)
    assert r.status_code == status
    assert cloud.index.count() == 0


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 422),
    (b'{"lines": []}', 422),
    (b'{"lines": "x"}', 422),
    (b'{"lines": [], "extra": 1}', 422),
    (b'[' * 40 + b']' * 40, 422),
])
def test_bad_batch_bodies_are_4xx(cloud: Cloud, body: bytes, status: int) -> None:
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs/batch", content=body,
                       headers={"Authorization": f"Bearer {cloud.tokens['veh001']}"})
    assert r.status_code == status and "error" in r.json()
    assert cloud.index.count() == 0


@pytest.mark.parametrize("depth", [40, 100_000])  # under and over the fast parser's own recursion limit
def test_a_deep_batch_is_refused_by_the_depth_guard_before_the_slow_parser(cloud: Cloud, depth: int) -> None:
    # The fast path parses only; a body it refuses reaches json.loads only after the nesting check.
    deep = b'{"lines":[' + json.dumps(_line(0)).encode()[:-1] + b',"labels":' + b'{"a":' * depth + b'1' + b'}' * depth
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs/batch", content=deep + b'}]}',
                       headers={"Authorization": f"Bearer {cloud.tokens['veh001']}"})
    assert r.status_code == 422 and "nested deeper than" in r.json()["error"]
    assert cloud.index.count() == 0


def _otlp(records: list[dict[str, object]], resource: dict[str, str] | None = None) -> dict[str, object]:
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in (resource or {"service.name": "collector"}).items()]
    return {"resourceLogs": [{"resource": {"attributes": attrs},
                              "scopeLogs": [{"scope": {"name": "otel.scope"}, "logRecords": records}]}]}


def test_otlp_json_accepted(cloud: Cloud) -> None:
    trace = new_trace_id()
    records = [
        {"timeUnixNano": str(int(T0 * 1e9)), "severityNumber": 13, "body": {"stringValue": "AEB braking hard"},
         "traceId": trace, "spanId": "00f067aa0ba902b7",
         "attributes": [{"key": "vehicle.id", "value": {"stringValue": "veh002"}},
                        {"key": "event.action", "value": {"stringValue": "aeb"}},
                        {"key": "ttc_s", "value": {"doubleValue": 1.25}}]},
        {"timeUnixNano": int(T0 * 1e9) + 1, "severityText": "INFO", "body": {"stringValue": "cruising"}},
        {"severityNumber": 99, "body": {"stringValue": "bad severity"}},
    ]
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs", json=_otlp(records), headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    assert r.json()["partialSuccess"]["rejectedLogRecords"] == "1"
    (aeb,) = cloud.index.search(LogQuery(text="aeb", limit=10))
    assert aeb["vehicle.id"] == "veh002" and aeb["trace.id"] == trace and aeb["log.level"] == "warning"
    assert aeb["service.name"] == "collector" and aeb["labels"] == {"ttc_s": 1.25}
    assert aeb["log.logger"] == "otel.scope"
    assert cloud.index.count() == 2


def test_otlp_from_a_vehicle_is_its_own(cloud: Cloud) -> None:
    rec = {"severityNumber": 9, "body": {"stringValue": "hello"},
           "attributes": [{"key": "vehicle.id", "value": {"stringValue": "veh002"}}]}
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs", json=_otlp([rec, {"severityNumber": 9, "body": {"stringValue": "mine"}}]),
                       headers={"Authorization": f"Bearer {cloud.tokens['veh001']}"})
    assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedLogRecords"] == "1"
    assert [x["vehicle.id"] for x in cloud.index.search(LogQuery(limit=10))] == ["veh001"]


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b"not json", {}, 400),
    (b'{"resourceLogs": 3}', {}, 400),
    (b'{"resourceLogs": [{"scopeLogs": [{"logRecords": {}}]}]}', {}, 400),
    (b'{"resourceLogs": [{"resource": {"attributes": [{"key": 1}]}}]}', {}, 400),
    (b'{"resourceLogs": []}', {"Content-Type": "application/x-protobuf"}, 415),
])
def test_bad_otlp_is_4xx(cloud: Cloud, body: bytes, headers: dict[str, str], status: int) -> None:
    with serve_in_thread(cloud.app) as url:
        r = httpx.post(f"{url}/v1/logs", content=body,
                       headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json", **headers})
    assert r.status_code == status and "error" in r.json()
    assert cloud.index.count() == 0


def test_search_filters_and_fts_fallback(cloud: Cloud) -> None:
    ingest = LogIngest(cloud.index)
    lines = [LogLine.model_validate(x) for x in (
        _line(0, "info", message="model call failed (hang)"),
        _line(1, "warning", message="aeb activation", **{"event.action": "aeb", "rollout.id": 4}),
        _line(2, "warning", vehicle="veh002", message="fcw warning", **{"event.action": "fcw"}),
        _line(3, "debug", message="aeb considered"),
    )]
    ingest.accept(None, lines)
    texts = lambda q: sorted(x["message"] for x in cloud.index.search(q))  # noqa: E731
    assert texts(LogQuery(text="aeb OR fcw")) == ["aeb activation", "aeb considered", "fcw warning"]
    assert texts(LogQuery(text="aeb OR fcw", level="warning")) == ["aeb activation", "fcw warning"]
    assert texts(LogQuery(text="aeb OR fcw", vehicle="veh002")) == ["fcw warning"]
    assert texts(LogQuery(rollout_id=4)) == ["aeb activation"]
    assert texts(LogQuery(since_s=LogLine.model_validate(_line(2)).time_s)) == ["aeb considered", "fcw warning"]
    assert texts(LogQuery(text="failed (hang")) == ["model call failed (hang)"]  # not FTS5 syntax: its words
    with pytest.raises(ConfigError):
        LogQuery(level="loud")


def test_retention_by_received_time(cloud: Cloud) -> None:
    ingest = LogIngest(cloud.index)
    ingest.accept(None, [LogLine.model_validate(_line(i)) for i in range(3)])
    cloud.clock.t += cloud.index.retention_s - 1
    ingest.accept(None, [LogLine.model_validate(_line(i)) for i in range(3, 5)])
    assert cloud.index.prune() == 0
    cloud.clock.t += 2  # the first three are now older than the retention
    assert cloud.index.prune() == 3
    assert sorted(x["event.sequence"] for x in cloud.index.search(LogQuery())) == [3, 4]
    assert cloud.index.search(LogQuery(text="tick")) and len(cloud.index.search(LogQuery(text="tick"))) == 2


def test_local_sink_is_the_same_ingest(cloud: Cloud, tmp_path: Path) -> None:
    """The embedded local cloud: the vehicle's real log lines, through the same validation."""
    handler = VehicleLogHandler(tmp_path / "spools")
    log = logging.getLogger("driveloop.test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    trace = new_trace_id()
    try:
        with log_context(vehicle_id="veh001", model_version="7", trace_id=trace):
            log_event(log, logging.INFO, "aeb", "aeb activation: ttc %.2f s", 0.9, labels={"ttc_s": 0.9})
    finally:
        log.removeHandler(handler)
    result = LogShipper("veh001", handler.spool("veh001"), LocalLogSink(LogIngest(cloud.index))).ship()
    handler.close()
    assert (result.accepted, result.error) == (1, None)
    (hit,) = cloud.index.search(LogQuery(text="aeb"))
    assert (hit["vehicle.id"], hit["model.version"], hit["trace.id"], hit["event.action"]) == ("veh001", "7", trace,
                                                                                             "aeb")


def test_ingest_metrics_count_log_lines_and_answers(cloud: Cloud) -> None:
    with serve_in_thread(cloud.app) as url:
        HttpLogSink(url, cloud.tokens["veh001"]).send("veh001", [json.dumps(_line(0)), '{"bad": 1}'])
        httpx.post(f"{url}/v1/logs/batch", content=b"{}")  # no token: 401
        text = httpx.get(f"{url}/metrics").text
    assert 'driveloop_ingest_log_lines_total{outcome="accepted"} 1.0' in text
    assert 'driveloop_ingest_log_lines_total{outcome="rejected"} 1.0' in text
    assert 'driveloop_ingest_requests_total{code="2xx"} 1.0' in text
    assert 'driveloop_ingest_requests_total{code="4xx"} 1.0' in text


def test_unreachable_server_is_a_retry_not_a_loss(tmp_path: Path) -> None:
    sink = HttpLogSink("http://127.0.0.1:9", "veh001.secret")  # discard port: nothing listens
    with pytest.raises(UploadError):
        sink.send("veh001", [json.dumps(_line(0))])
