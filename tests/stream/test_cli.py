"""``driveloop stream status|tail``: one JSON object, one-line errors, no broker left running."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from driveloop.cli import main
from driveloop.contracts.stream import encode
from tests.stream.conftest import pid_alive, tel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DRIVELOOP_NATS_URL", raising=False)
    return tmp_path / "home"


def _server_pids(home: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"nats-server") and str(home).encode() in b" ".join(cmd):
                out.append(int(p.name))
    return out


def test_status_and_tail_on_the_embedded_broker(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream", "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in report["streams"]} == {"TELEMETRY", "EVENTS", "HAZARDS", "LOGS"}
    assert all(s["messages"] == 0 for s in report["streams"])
    assert [p for p in _server_pids(home) if pid_alive(p)] == []  # stopped with the command

    # a vehicle's data lands while a broker runs (the same store, as the CLI's service user)
    from driveloop.cloud.broker import EmbeddedBroker

    password = (home / "nats" / "svc-cli.secret").read_text().strip()
    from driveloop.cloud.broker import Credentials

    with EmbeddedBroker.embedded(home / "nats", Credentials(home / "nats").users) as b:
        async def publish() -> None:
            nc = await nats.connect(b.url, user="svc-cli", password=password)
            js = nc.jetstream()
            for i in range(12):
                await js.publish("tel.v1", encode(tel("v1", i)))
            await js.publish("tel.v2", encode(tel("v2", 0)))
            await nc.close()

        asyncio.run(publish())

    assert main(["stream", "tail", "tel.v1", "--count", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["messages"]
    assert [r["data"]["seq"] for r in rows] == [9, 10, 11] and {r["subject"] for r in rows} == {"tel.v1"}
    assert main(["stream", "status", "--json"]) == 0
    tel_stream = next(s for s in json.loads(capsys.readouterr().out)["streams"] if s["name"] == "TELEMETRY")
    assert tel_stream["messages"] == 13


def test_unknown_subject_is_one_line_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream", "tail", "nothing.here"]) == 11
    err = capsys.readouterr().err.strip()
    assert err == "driveloop: error: no stream holds subject 'nothing.here'"


def test_unreachable_cluster_is_one_line_error(home: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cloud.broker import free_port

    monkeypatch.setenv("DRIVELOOP_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    assert main(["stream", "status"]) == 11
    err = capsys.readouterr().err
    assert err.startswith("driveloop: error: cannot connect to the broker") and err.count("\n") == 1
