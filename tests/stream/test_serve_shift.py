"""``driveloop stream serve`` runs the live shift detector beside its embedded broker (a real nats-server): the
fleet's vehicles publish as themselves, a new class with a high intervention rate gets one campaign, approved only
where the operator's ``DRIVELOOP_CAMPAIGN_AUTO_APPROVE`` names it, and ``driveloop cloud shift status`` shows it
while the server runs; SIGTERM stops the consumers and the nats-server (by the pids the server wrote). With
``--no-shift`` no detector consumer exists; a corrupt operator baseline is a one-line error before any server
starts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import nats
import pytest

from driveloop.cloud.broker import Credentials, vehicle_inbox
from driveloop.cloud.campaigns import STATE_APPROVED, STATE_CREATED
from tests.fakes.serve import driveloop_command
from tests.fakes.wait import wait_until
from tests.stream.conftest import pid_alive
from tests.stream.test_shift_live import Vehicle

CLI = driveloop_command()
BASELINE = {"per_class": {"highway": 60.0}, "fleet": 60.0}  # the operator's: 60 interventions/h


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVELOOP_")}
    return {**env, "DRIVELOOP_HOME": str(home), "DRIVELOOP_CAMPAIGN_AUTO_APPROVE": "fog"}


def _vehicles(home: Path) -> dict[str, str]:
    """Broker users for v1 and v2 (the fleet's credentials), issued before the server starts."""
    creds = Credentials(home / "nats")
    passwords = creds.issue_vehicles(["v1", "v2"])
    creds.save()
    return passwords


def _publish(url: str, user: str, password: str, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish as vehicle ``user`` (its own subjects and reply inbox only)."""

    async def go() -> None:
        nc = await nats.connect(url, user=user, password=password, inbox_prefix=vehicle_inbox(user))
        js = nc.jetstream()
        for subject, data in messages:
            await js.publish(subject, data)
        await nc.close()

    asyncio.run(go())


def _cli_json(home: Path, *args: str) -> dict:
    done = subprocess.run([*CLI, *args, "--json"], env=_env(home), capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start ``driveloop stream serve --port 0 [args]`` in a home; stopped (SIGTERM, then SIGKILL) by its pid."""
    started: list[subprocess.Popen[str]] = []

    def start(home: Path, *args: str) -> tuple[subprocess.Popen[str], dict]:
        proc = subprocess.Popen([*CLI, "stream", "serve", "--port", "0", *args], env=_env(home),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        info_path = home / "nats" / "server.json"
        assert wait_until(lambda: info_path.is_file() or proc.poll() is not None, timeout_s=60), "serve did not start"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return proc, json.loads(info_path.read_text())

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_serve_runs_the_shift_detector_with_the_operators_policy(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    passwords = _vehicles(home)
    (home / "cloud" / "shift").mkdir(parents=True)
    (home / "cloud" / "shift" / "baseline.json").write_text(json.dumps(BASELINE))
    proc, info = serve(home)
    url = info["url"]

    # v1 drives fog, v2 construction: 60 s each with 6 interventions = 360/h > max(2 x 60, 60 + 20) = 120/h
    start = time.time() - 120.0
    v1, v2 = Vehicle("v1"), Vehicle("v2")
    _publish(url, "v1", passwords["v1"], v1.drive("fog", start, 60, [5, 10, 15, 20, 25, 30]))
    _publish(url, "v2", passwords["v2"], v2.drive("construction", start, 60, [5, 10, 15, 20, 25, 30]))

    status = home / "cloud" / "shift" / "status.json"

    def campaigns() -> dict:
        try:
            return json.loads(status.read_text())["campaigns"]
        except (OSError, ValueError):
            return {}

    assert wait_until(lambda: len(campaigns()) == 2, timeout_s=60)
    report = _cli_json(home, "cloud", "shift", "status")  # what an operator sees while the server runs
    assert {c["class"]: c["state"] for c in report["campaigns"]} == {"fog": STATE_APPROVED,
                                                                    "construction": STATE_CREATED}
    det = report["detector"]
    assert det["baseline"]["source"].endswith("baseline.json") and det["baseline"]["fleet"] == pytest.approx(60.0)
    assert det["classes"]["fog"]["interventions"] == 6
    assert det["classes"]["fog"]["per_hour"] == pytest.approx(360.0)
    assert det["classes"]["fog"]["threshold_per_hour"] == pytest.approx(120.0)
    streams = _cli_json(home, "stream", "status")["streams"]
    consumers = {c["name"]: c["lag"] for s in streams for c in s["consumers"]}
    assert consumers == {"shift-telemetry": 0, "shift-events": 0}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert not (home / "nats" / "server.json").exists()
    assert wait_until(lambda: not pid_alive(int(info["server_pid"])), timeout_s=10)  # its nats-server stopped too
    assert json.loads(status.read_text())["classes"]["construction"]["interventions"] == 6  # flushed at the stop


def test_no_shift_runs_the_broker_alone(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    passwords = _vehicles(home)
    proc, info = serve(home, "--no-shift")
    _publish(info["url"], "v1", passwords["v1"], Vehicle("v1").drive("fog", time.time() - 60, 10, [1, 2, 3]))
    streams = _cli_json(home, "stream", "status")["streams"]
    assert {s["name"]: s["messages"] for s in streams}["EVENTS"] == 3
    assert [c for s in streams for c in s["consumers"]] == []  # nobody consumes: no detector
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not (home / "cloud" / "shift" / "status.json").exists()


def test_a_corrupt_baseline_is_one_line_before_any_server_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "cloud" / "shift").mkdir(parents=True)
    (home / "cloud" / "shift" / "baseline.json").write_text('{"per_class": {"fog": -3}, "fleet": 1}')
    done = subprocess.run([*CLI, "stream", "serve", "--port", "0"], env=_env(home), capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "baseline.json" in lines[0] and "Traceback" not in done.stderr
    assert not (home / "nats" / "server.json").exists()
