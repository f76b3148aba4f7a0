"""The log index on a real PostgreSQL server (JSONB + generated tsvector with a GIN index): the same
ingest, dedup, search and retention as on SQLite, on a throwaway cluster started by the test."""

from __future__ import annotations

import json

import pytest

from driveloop.cloud.log_ingest import LocalLogSink, LogIngest
from driveloop.cloud.logindex import LogIndex, LogQuery, index_url_for
from driveloop.core.exceptions import ConfigError
from tests.cloud.test_postgres import _fresh_database, pytestmark, server  # noqa: F401  (the cluster fixture)

__all__ = ["pytestmark"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


def _line(i: int, message: str, level: str = "info", vehicle: str = "veh-pg", **kw: object) -> str:
    return json.dumps({"@timestamp": f"2030-01-01T00:00:{i:02d}.000Z", "log.level": level, "service.name": "vehicle",
                       "message": message, "event.sequence": i, "vehicle.id": vehicle, **kw})


def test_log_index_on_postgres(server: str) -> None:  # noqa: F811
    url = _fresh_database(server)
    assert index_url_for(url) == url  # the index lives in the catalog's database
    clock = Clock()
    index = LogIndex(url, clock=clock)
    try:
        sink = LocalLogSink(LogIngest(index))
        lines = [_line(0, "model call failed (hang)"),
                 _line(1, "aeb activation", "warning", **{"event.action": "aeb", "trace.id": "a" * 32}),
                 _line(2, "fcw warning", "warning", **{"event.action": "fcw"}),
                 _line(3, "aeb considered", "debug")]
        assert sink.send("veh-pg", lines).accepted == 4
        again = sink.send("veh-pg", lines)
        assert (again.accepted, again.duplicates) == (0, 4)
        texts = lambda q: sorted(x["message"] for x in index.search(q))  # noqa: E731
        assert texts(LogQuery(text="aeb or fcw")) == ["aeb activation", "aeb considered", "fcw warning"]
        assert texts(LogQuery(text="aeb or fcw", level="warning")) == ["aeb activation", "fcw warning"]
        assert texts(LogQuery(text="failed (hang")) == ["model call failed (hang)"]
        (hit,) = index.search(LogQuery(text="aeb", level="warning"))
        assert hit["trace.id"] == "a" * 32 and hit["vehicle.id"] == "veh-pg"
        with pytest.raises(ConfigError):
            LogQuery(level="nope")
        clock.t += index.retention_s + 1
        assert index.prune() == 4 and index.count() == 0
    finally:
        index.close()
