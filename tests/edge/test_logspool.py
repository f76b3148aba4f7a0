"""The vehicle's log spool: numbering, the cap with DEBUG evicted first and every eviction counted,
durability across a reopen, acknowledgement, and the logging handler that feeds it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from driveloop.contracts.logline import LogAck, parse_line
from driveloop.core.exceptions import ConfigError
from driveloop.core.logfmt import log_context, render_json
from driveloop.edge.logship import LogShipper
from driveloop.edge.logspool import LogSpool, VehicleLogHandler


def _fields(level: str, i: int) -> dict[str, object]:
    return {"@timestamp": "2030-01-01T00:00:00.000Z", "log.level": level, "service.name": "vehicle",
            "message": f"line {i:04d}", "vehicle.id": "veh001"}


def _size(level: str, i: int, seq: int) -> int:
    return len(render_json({**_fields(level, i), "event.sequence": seq}).encode())


def test_lines_are_numbered_stored_and_acked(tmp_path: Path) -> None:
    sp = LogSpool(tmp_path / "veh001.db", cap_bytes=10**6)
    seqs = sp.append_many([_fields("info", i) for i in range(5)])
    assert seqs == [0, 1, 2, 3, 4]
    pending = sp.pending(3)
    assert [s for s, _ in pending] == [0, 1, 2]
    assert [parse_line(t).sequence for _, t in pending] == [0, 1, 2]
    assert sp.ack([0, 1, 2]) == 3
    assert [s for s, _ in sp.pending()] == [3, 4]
    assert sp.ack([0]) == 0  # already gone: acknowledging twice is harmless
    st = sp.stats()
    assert (st.lines, st.next_sequence, st.acked_through, st.evicted_total) == (2, 5, 2, 0)
    sp.close()
    again = LogSpool(tmp_path / "veh001.db", cap_bytes=10**6)  # reopened: the same lines, numbering goes on
    assert [s for s, _ in again.pending()] == [3, 4]
    assert again.append(_fields("info", 9)) == 5
    again.close()


def test_cap_evicts_debug_first_and_counts_exactly(tmp_path: Path) -> None:
    # 10 DEBUG lines then 10 INFO lines fill the cap exactly; 6 more INFO lines need 6 lines' room.
    # All lines of one kind have the same size (4-digit counters, 1-2 digit sequences are padded below).
    lines = [("debug", i) for i in range(10)] + [("info", i) for i in range(10, 20)]
    cap = sum(_size(lvl, i, seq) for seq, (lvl, i) in enumerate(lines))
    sp = LogSpool(tmp_path / "v.db", cap_bytes=cap)
    sp.append_many([_fields(lvl, i) for lvl, i in lines])
    assert sp.stats().bytes == cap and sp.stats().evicted_total == 0
    for k in range(6):
        sp.append(_fields("info", 20 + k))
    st = sp.stats()
    assert st.bytes <= cap
    assert st.evicted == {"debug": 6}  # only DEBUG lines went, exactly as many as the room needed
    kept = [parse_line(t) for _, t in sp.pending(100)]
    assert [ln.message for ln in kept if ln.level == "debug"] == [f"line {i:04d}" for i in range(6, 10)]
    assert sum(ln.level == "info" for ln in kept) == 16  # no INFO line was touched
    # 10 more INFO lines: the 4 remaining DEBUG lines go, then the oldest INFO lines.
    for k in range(10):
        sp.append(_fields("info", 26 + k))
    st = sp.stats()
    assert st.evicted == {"debug": 10, "info": 6}
    kept = [parse_line(t) for _, t in sp.pending(100)]
    assert all(ln.level == "info" for ln in kept)
    assert kept[0].message == "line 0016" and kept[-1].message == "line 0035"
    assert st.lines == len(kept) == 20
    sp.close()
    assert LogSpool(tmp_path / "v.db", cap_bytes=cap).stats().evicted == {"debug": 10, "info": 6}  # persisted


def test_warnings_outlive_info_under_pressure(tmp_path: Path) -> None:
    one = _size("info", 0, 0)
    sp = LogSpool(tmp_path / "v.db", cap_bytes=one * 4)
    sp.append(_fields("warning", 0))
    for i in range(1, 30):
        sp.append(_fields("info", i))
    kept = [parse_line(t) for _, t in sp.pending(100)]
    assert kept[0].level == "warning" and kept[0].message == "line 0000"
    assert sp.stats().evicted == {"info": 29 - (len(kept) - 1)}


@pytest.mark.parametrize("cap", [0, -1, 1.5])
def test_bad_cap_refused(tmp_path: Path, cap: object) -> None:
    with pytest.raises(ConfigError):
        LogSpool(tmp_path / "v.db", cap_bytes=cap)  # type: ignore[arg-type]


def test_a_line_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    sp = LogSpool(tmp_path / "v.db", cap_bytes=100)
    with pytest.raises(ConfigError):
        sp.append(_fields("info", 0))
    assert sp.stats().lines == 0 and sp.stats().next_sequence == 0


def test_handler_routes_by_bound_vehicle(tmp_path: Path) -> None:
    handler = VehicleLogHandler(tmp_path / "spools", cap_bytes=10**6)
    log = logging.getLogger("driveloop.test.logspool")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("no vehicle: not the spool's business")
        with log_context(vehicle_id="veh-a", model_version=3):
            log.info("a says hello")
            log.debug("below the handler's level")
        with log_context(vehicle_id="veh-b"):
            log.warning("b warns")
    finally:
        log.removeHandler(handler)
    a = [json.loads(t) for _, t in handler.spool("veh-a").pending()]
    b = [json.loads(t) for _, t in handler.spool("veh-b").pending()]
    handler.close()
    assert [x["message"] for x in a] == ["a says hello"] and a[0]["model.version"] == "3"
    assert [x["message"] for x in b] == ["b warns"] and b[0]["log.level"] == "warning"
    assert sorted(p.name for p in (tmp_path / "spools").glob("*.db")) == ["veh-a.db", "veh-b.db"]


def test_acking_a_large_scattered_set_keeps_the_byte_count_exact(tmp_path: Path) -> None:
    # More sequence numbers than one ack statement takes, some already gone, some never stored.
    sp = LogSpool(tmp_path / "veh001.db", cap_bytes=10**8)
    sp.append_many([_fields("info", i % 10_000) for i in range(1500)])
    assert sp.ack(list(range(0, 1500, 3))) == 500
    kept = [s for s, _ in sp.pending(2000)]
    assert kept == [s for s in range(1500) if s % 3]
    assert sp.ack([*range(1, 1200), 5000, 5001]) == len([s for s in range(1, 1200) if s % 3])
    expected = sum(_size("info", s % 10_000, s) for s in range(1200, 1500) if s % 3)
    st = sp.stats()
    assert (st.lines, st.bytes) == (200, expected)
    sp.close()
    again = LogSpool(tmp_path / "veh001.db", cap_bytes=10**8)  # the counted bytes match what SQLite holds
    assert again.stats().bytes == expected
    again.close()


def test_pending_at_a_minimum_level(tmp_path: Path) -> None:
    sp = LogSpool(tmp_path / "veh001.db", cap_bytes=10**6)
    sp.append_many([_fields(lvl, i) for i, lvl in enumerate(["info", "warning", "debug", "error", "info"])])
    assert [s for s, _ in sp.pending(10, min_level="warning")] == [1, 3]
    assert [s for s, _ in sp.pending(1, min_level="warning")] == [1]
    assert [s for s, _ in sp.pending(10, min_level="error")] == [3]
    assert [s for s, _ in sp.pending(10)] == [0, 1, 2, 3, 4]
    sp.close()


class _RecordingSink:
    """A sink that stores every batch it is sent, in order."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def send(self, vehicle_id: str, lines: list[str]) -> LogAck:
        self.batches.append([json.loads(t)["event.sequence"] for t in lines])
        return LogAck(accepted=len(lines), duplicates=0, rejected=0)

    def close(self) -> None:
        pass


def test_warnings_ship_ahead_of_an_older_backlog(tmp_path: Path) -> None:
    sp = LogSpool(tmp_path / "veh001.db", cap_bytes=10**7)
    sp.append_many([_fields("info", i) for i in range(25)])  # a backlog: 25 lines, 3 batches of 10
    sp.append(_fields("warning", 25))  # the AEB event, logged last
    sp.append_many([_fields("info", i) for i in range(26, 30)])
    sink = _RecordingSink()
    result = LogShipper("veh001", sp, sink, batch_lines=10).ship()
    assert sink.batches[0] == [25]  # first out, ahead of the 25 older lines
    assert sink.batches[1:] == [list(range(0, 10)), list(range(10, 20)), [*range(20, 25), 26, 27, 28, 29]]
    assert (result.sent, result.accepted, sp.stats().lines) == (30, 30, 0)
    sp.close()
