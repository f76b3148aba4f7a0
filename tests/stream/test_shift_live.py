"""The shift detector on the live stream, against a real nats-server: the fleet drives a familiar class (the
reference period becomes the baseline), then two new classes with a high intervention rate: exactly one campaign
each, the one the operator's policy names approved, the other waiting for a person; malformed, forged and
unknown-vehicle messages dropped and counted; a redelivered message counted once; `driveloop cloud shift
status --json` shows the live rates against the baseline and the campaigns."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nats
import pytest
from prometheus_client import generate_latest

from driveloop.cloud.broker import EmbeddedBroker
from driveloop.cloud.campaigns import STATE_APPROVED, STATE_CREATED
from driveloop.cloud.shift import ApprovalPolicy, LiveShift, ShiftPolicy
from driveloop.cloud.stream_sinks import ShiftDetector, SinkRunner, StreamMetrics
from driveloop.contracts.stream import MAX_MESSAGE_BYTES, Telemetry, VehicleEvent, encode, event_subject, telemetry_subject
from tests.fakes.wait import wait_until

HZ = 10  # telemetry per second of driving (contracts.stream.TELEMETRY_PERIOD_S)


def hours(seconds: float) -> float:
    return round(seconds / 3600, 5)  # as the detector's status writes them


class Vehicle:
    """One vehicle's messages: telemetry every tick of its drive in a class, interventions at given seconds."""

    def __init__(self, vid: str) -> None:
        self.vid, self.seq = vid, 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def drive(self, scenario: str, start: float, seconds: int, interventions: Sequence[float] = (),
              collisions: Sequence[float] = ()) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        marks = sorted([(start + s, "intervention") for s in interventions] + [(start + s, "collision") for s in collisions])
        for tick in range(seconds * HZ):
            wall = start + tick / HZ
            out.append((telemetry_subject(self.vid), encode(Telemetry(
                vehicle_id=self.vid, seq=self._next(), t_s=tick / HZ, wall_ts=wall, x_m=float(tick), y_m=0.0, lane=1,
                speed_mps=25.0, accel_mps2=0.0, mode="model", scenario=scenario))))
            while marks and marks[0][0] <= wall:
                _, kind = marks.pop(0)
                out.append((event_subject(self.vid, kind), encode(self.event(scenario, wall, kind))))
        return out

    def event(self, scenario: str, wall: float, kind: str = "intervention", seq: int | None = None) -> VehicleEvent:
        return VehicleEvent(vehicle_id=self.vid, seq=self._next() if seq is None else seq, t_s=1.0, wall_ts=wall,
                            x_m=0.0, y_m=0.0, lane=1, speed_mps=20.0, kind=kind, scenario=scenario)


def publish(url: str, messages: Sequence[tuple[str, bytes]]) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for subject, data in messages:
            await js.publish(subject, data)
        await nc.close()

    asyncio.run(go())


def _campaigns(home: Path) -> dict[str, list[str]]:
    from driveloop.cloud.catalog import Catalog

    catalog = Catalog(f"sqlite:///{(home / 'cloud' / 'catalog.db').resolve()}")
    try:
        out: dict[str, list[str]] = {}
        for c in catalog.campaigns():
            out.setdefault(c.spec.name, []).append(c.state)
        return out
    finally:
        catalog.close()


def test_a_new_class_with_a_high_rate_gets_one_campaign_approved_by_the_policy(
        broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from driveloop._cli_shift import shift_dir
    from driveloop._demo_shift import local_ingest
    from driveloop.settings import load_settings

    home = tmp_path / "home"
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    settings = load_settings()
    policy = ShiftPolicy(min_exposure_h=0.01, min_interventions=3, rise_factor=2.0, rise_abs_per_h=20.0)

    def detector() -> ShiftDetector:
        return ShiftDetector(shift_dir(settings), lambda: local_ingest(settings), ApprovalPolicy.parse("fog"), policy,
                             LiveShift(window_s=3600.0, reference_s=60.0), status_every_s=0.0)

    shift = detector()
    metrics = StreamMetrics()
    runner = SinkRunner(broker.url, shift.consumers(workers=2), metrics, known=lambda v: v in {"v1", "v2"}).start()
    v1, v2 = Vehicle("v1"), Vehicle("v2")
    base = time.time() - 1200.0  # the drive happened in the last 20 minutes (inside the window)
    try:
        # the familiar world: 2 vehicles x 120 s on the highway, one intervention each in and after the reference
        publish(broker.url, v1.drive("highway", base, 120, [30, 90]) + v2.drive("highway", base, 120, [30, 90]))
        assert wait_until(lambda: shift.status()["classes"].get("highway", {}).get("exposure_h") == hours(60 * 2))
        st = shift.status()
        # baseline: the first 60 s of the stream, 2 x 60 s with 2 interventions = 60/h, for highway and the fleet
        assert st["baseline"]["per_class"] == {"highway": pytest.approx(60.0)} and st["baseline"]["fleet"] == pytest.approx(60.0)
        assert json.loads((shift_dir(settings) / "baseline.json").read_text())["fleet"] == pytest.approx(60.0)
        assert st["classes"]["highway"]["interventions"] == 2 and st["campaigns"] == {}  # 60/h, not risen

        # bad input on both streams: dropped and counted, never counted as driving or interventions
        bad = [("tel.v1", b"{not json"),
               ("tel.v1", encode(Telemetry(vehicle_id="v2", seq=10_000, t_s=0.0, wall_ts=base + 125, x_m=0.0,  # body
                                           y_m=0.0, lane=1, speed_mps=1.0, accel_mps2=0.0, mode="model", scenario="fog"))),
               (event_subject("v1", "intervention"), encode(v2.event("highway", base + 125, seq=10_001))),  # forged
               (event_subject("ghost", "intervention"), encode(Vehicle("ghost").event("highway", base + 125))),
               ("evt.v1.intervention", b"x" * (MAX_MESSAGE_BYTES - 600))]  # under the broker's limit, not JSON
        # the shifted world: v1 drives fog (approved classes), v2 construction (not named by the policy):
        # 60 s each with 6 interventions = 360/h > max(2 x 60, 60 + 20) = 120/h
        fog = v1.drive("fog", base + 120, 60, [5, 10, 15, 20, 25, 30])
        construction = v2.drive("construction", base + 120, 60, [5, 10, 15, 20, 25, 30], collisions=[31])
        publish(broker.url, bad + fog + construction)
        assert wait_until(lambda: len(shift.status()["campaigns"]) == 2)
        assert wait_until(lambda: shift.status()["classes"].get("construction", {}).get("exposure_h") == hours(60))
        st = shift.status()
        assert st["classes"]["fog"]["interventions"] == 6 and st["classes"]["fog"]["per_hour"] == pytest.approx(360.0)
        assert st["classes"]["construction"]["collisions"] == 1
        assert st["classes"]["highway"]["interventions"] == 2  # the forged one named highway: not counted
        assert st["campaigns"]["fog"]["approved"] and st["campaigns"]["fog"]["state"] == STATE_APPROVED
        assert "env_fog" in st["campaigns"]["fog"]["condition"]  # collected only inside the class
        assert not st["campaigns"]["construction"]["approved"]
        assert st["campaigns"]["construction"]["state"] == STATE_CREATED  # waits for a person
        text = generate_latest(metrics.registry).decode()
        for stream, reason in (("TELEMETRY", "malformed"), ("TELEMETRY", "subject_mismatch"), ("EVENTS", "malformed"),
                               ("EVENTS", "subject_mismatch"), ("EVENTS", "unknown_vehicle")):
            assert f'driveloop_stream_dropped_total{{reason="{reason}",stream="{stream}"}} 1.0' in text, (stream, reason)

        # the shift goes on, and a spool replay re-sends fog's interventions: still one campaign, counted once
        replayed = [m for m in fog if m[0].startswith("evt.")]
        more = v1.drive("fog", base + 180, 20, [5, 10, 15])
        publish(broker.url, replayed + more)
        assert wait_until(lambda: shift.status()["classes"]["fog"]["interventions"] == 9)
        assert wait_until(lambda: shift.status()["duplicates"] == len(replayed))
        assert wait_until(lambda: shift.status()["classes"]["fog"]["exposure_h"] == hours(80))
    finally:
        runner.stop()
        shift.flush()
    assert _campaigns(home) == {"shift-fog": [STATE_APPROVED], "shift-construction": [STATE_CREATED]}

    # a restarted detector takes the stored baseline and does not open the shift's campaign again
    again = detector()
    assert again.status()["baseline"]["source"].endswith("baseline.json")
    runner = SinkRunner(broker.url, again.consumers(workers=2), StreamMetrics()).start()  # same durables: nothing new
    try:
        publish(broker.url, v1.drive("fog", time.time() - 60, 40, [2, 4, 6, 8]))  # 360/h over 40 s
        assert wait_until(lambda: "fog" in again.status()["campaigns"])
    finally:
        runner.stop()
    assert _campaigns(home) == {"shift-fog": [STATE_APPROVED], "shift-construction": [STATE_CREATED]}

    # what an operator sees
    env = {**os.environ, "DRIVELOOP_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", "from driveloop.cli import main; main()", "cloud", "shift", "status",
                           "--json"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {c["class"]: c["state"] for c in report["campaigns"]} == {"fog": STATE_APPROVED, "construction": STATE_CREATED}
    assert report["detector"]["classes"]["fog"]["per_hour"] > report["detector"]["classes"]["fog"]["threshold_per_hour"]
    text = subprocess.run([sys.executable, "-c", "from driveloop.cli import main; main()", "cloud", "shift", "status"],
                          env=env, capture_output=True, text=True, check=True).stdout
    assert "campaign" in text and "fog" in text and "baseline 60.0/h" in text
