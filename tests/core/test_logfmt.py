"""The one log format: ECS fields and context, redaction of every kind of secret (table), strict JSON
valid against the wire schema, the terminal's rendering, and where lines go (file vs a quiet terminal,
Ray's and Flower's loggers taken over)."""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
import threading
from pathlib import Path

import jsonschema
import pytest

from driveloop.contracts.logline import log_line_schema, parse_line
from driveloop.core.logfmt import (
    ConsoleFormatter,
    JsonFormatter,
    log_context,
    log_event,
    new_span_id,
    new_trace_id,
    redact,
)
from driveloop.core.logsetup import adopt_library_logs, configure_logging

TOKEN = secrets.token_urlsafe(32)


@pytest.mark.parametrize(("text", "secret"), [
    (f"Authorization: Bearer {TOKEN}", TOKEN),
    (f"authorization: bearer {TOKEN}", TOKEN),
    (f"vehicle token veh-007.{TOKEN} refused", TOKEN),
    (f"cloud_token={TOKEN}", TOKEN),
    ("password: hunter2-is-long-enough", "hunter2-is-long-enough"),
    ("api_key=abc123abc123abc123", "abc123abc123abc123"),
    ("postgresql+psycopg://alice:s3cretpw@db:5432/catalog", "s3cretpw"),
    ("key -----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY----- end", "MIGHAgEAMBMG"),
    (f"admin token {secrets.token_urlsafe(24)} used", None),  # checked below: whatever was generated is gone
])
def test_secrets_are_redacted(text: str, secret: str | None) -> None:
    out = redact(text)
    assert "[REDACTED" in out
    if secret is not None:
        assert secret not in out
    else:
        assert text.split()[2] not in out


@pytest.mark.parametrize("text", [
    "uploaded 1796434821141948393-veh001 (d410df8276d9, 180099 bytes)",
    "cataloged d410df8276d9cd3159734f8ac93cca5f7e032abd7d271c5ac2329d6de589441a from veh001",  # a sha256 stays
    "driveloop_ota_health_rejected_total went up",
    "/tmp/pytest-of-root/pytest-12/test_drive_then_search0/home/spool/closed",
    "trace 6f727f8c8d8e79e3f7e6fff31bf79e31 span 7d64b0296cb27f3a",
    "missing bearer token",  # a word, not a credential
    "rotated token of vehicle veh-001",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def _capture(fmt: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(fmt)
    lg = logging.getLogger(f"driveloop.test.logfmt.{id(buf)}")
    lg.handlers[:] = [h]
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    return lg, buf


def test_lines_carry_context_and_validate() -> None:
    lg, buf = _capture(JsonFormatter("vehicle"))
    trace, span = new_trace_id(), new_span_id()
    with log_context(vehicle_id="veh-3", model_version=4, trace_id=trace, span_id=span):
        log_event(lg, logging.INFO, "aeb", "aeb activation at ttc %.2f s with Bearer %s", 1.25, TOKEN,
                  labels={"ttc_s": 1.25, "nan": float("nan")})
        with log_context(rollout_id=7, fl_round=2):
            lg.warning("inner")
        lg.info("outer again")
    lg.info("outside")
    try:
        raise ValueError(f"boom token={TOKEN}")
    except ValueError:
        lg.exception("failed")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    schema = log_line_schema()
    for x in lines:
        jsonschema.validate(x, schema)
    assert TOKEN not in buf.getvalue()
    aeb, inner, outer, outside, failed = lines
    assert (aeb["event.action"], aeb["vehicle.id"], aeb["model.version"], aeb["trace.id"], aeb["span.id"]) == \
        ("aeb", "veh-3", "4", trace, span)
    assert aeb["message"].startswith("aeb activation at ttc 1.25 s") and aeb["labels"] == {"ttc_s": 1.25, "nan": None}
    assert (inner["rollout.id"], inner["fl.round"], inner["vehicle.id"]) == (7, 2, "veh-3")
    assert "rollout.id" not in outer and outer["vehicle.id"] == "veh-3"
    assert "vehicle.id" not in outside and outside["log.level"] == "info"
    assert failed["error.type"] == "ValueError" and "Traceback" in failed["error.stack_trace"]
    assert parse_line(json.dumps(aeb)).vehicle_id == "veh-3"


def test_context_is_per_thread() -> None:
    lg, buf = _capture(JsonFormatter("t"))

    def vehicle(vid: str) -> None:
        with log_context(vehicle_id=vid):
            for i in range(50):
                lg.info("%s tick %d", vid, i)

    threads = [threading.Thread(target=vehicle, args=(f"veh-{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 200
    assert all(x["message"].startswith(x["vehicle.id"] + " ") for x in lines)


def test_unknown_context_field_is_refused() -> None:
    with pytest.raises(TypeError):
        with log_context(vehicel_id="typo"):
            pass


def test_console_rendering_is_readable() -> None:
    lg, buf = _capture(ConsoleFormatter("drive"))
    with log_context(vehicle_id="veh-1"):
        log_event(lg, logging.WARNING, "collision", "collision in %s", "dense")
    line = buf.getvalue().strip()
    assert " WARNING test.logfmt." in line and line.endswith("collision in dense  vehicle.id=veh-1  event.action=collision")
    assert not line.startswith("{")


def test_a_library_handler_on_a_closed_stream_is_dropped_not_an_error() -> None:
    """Ray binds a handler to the stderr of the moment it is imported; if that stream is closed since (a test's
    captured stderr), taking the logger over drops the handler instead of failing on the closed file."""
    lg = logging.getLogger("driveloop-test.closed-stream")
    dead = io.StringIO()
    lg.addHandler(logging.StreamHandler(dead))
    alive = io.StringIO()  # an open, non-terminal stream: the library's own business, kept
    lg.addHandler(logging.StreamHandler(alive))
    dead.close()
    try:
        assert adopt_library_logs("driveloop-test.closed-stream") == 1
        assert [h.stream for h in lg.handlers] == [alive]  # type: ignore[attr-defined]
    finally:
        for h in list(lg.handlers):
            lg.removeHandler(h)


def test_configure_logging_file_and_quiet_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVELOOP_LOG_FORMAT", "json")
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        path = configure_logging("svc", logging.WARNING, home=tmp_path)
        configure_logging("svc", logging.WARNING, home=tmp_path)  # again: replaces, never doubles
        assert path == (tmp_path / "logs" / "svc.jsonl").absolute()
        ray = logging.getLogger("ray.data")
        kept = logging.FileHandler(tmp_path / "ray-session.log")  # Ray's own session file stays
        for h in list(ray.handlers):  # an earlier test's import of Ray Data may have left its handler
            ray.removeHandler(h)
        ray.addHandler(logging.StreamHandler(sys.stderr))  # what Ray does on import
        ray.addHandler(kept)
        ray.propagate = False
        assert adopt_library_logs("ray.data") == 1 and ray.propagate and ray.handlers == [kept]
        ray.removeHandler(kept)
        kept.close()
        logging.getLogger("driveloop.x").info("info for the file only")
        logging.getLogger("driveloop.x").warning("a warning for both")
        ray.warning("Ray internals: the file only")
        logging.getLogger("flwr").warning("DEPRECATED FEATURE: the file only")
        logging.getLogger("uvicorn.error").error("a server error for both")
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
    err = capsys.readouterr().err
    console = [json.loads(x)["message"] for x in err.splitlines()]
    assert console == ["a warning for both", "a server error for both"]
    in_file = [json.loads(x)["message"] for x in path.read_text().splitlines()]
    assert in_file == ["info for the file only", "a warning for both", "Ray internals: the file only",
                       "DEPRECATED FEATURE: the file only", "a server error for both"]
