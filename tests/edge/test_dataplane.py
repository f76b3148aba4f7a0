"""Hazards end to end against a real nats-server: relevance, forged and vehicle-made hazards, a broker that is down,
and what the fleet publishes (telemetry every tick, events at their onset)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.cloud.broker import Credentials, EmbeddedBroker, free_port, vehicle_inbox
from driveloop.cloud.hazard_service import HazardService, hazard_dir, read_active
from driveloop.cloud.hazards import HazardPolicy
from driveloop.contracts.hazard import (
    ActionId,
    Hazard,
    HazardAdvisory,
    HazardSigner,
    HazardVerifier,
    encode_hazard,
    relevance_area,
)
from driveloop.contracts.stream import Telemetry, VehicleEvent, encode, event_subject, hazard_subject
from driveloop.edge.agent import AgentConfig
from driveloop.edge.dataplane import SHARED_ROAD, StreamDataPlane, road_of
from driveloop.edge.fleet import BatchResult, VehiclePlan, run_fleet
from driveloop.edge.hazards import HazardFilter
from driveloop.edge.stream_client import StreamLoop, VehicleStream
from tests.fakes.wait import wait_until
from tests.stream.conftest import ensure

VEHICLES = ("in-near", "in-far", "out-behind", "out-past", "reporter")
POSITIONS = {"in-near": 4500.0, "in-far": 3000.0, "out-behind": 0.0, "out-past": 6500.0}


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, dict[str, str], str, HazardService]]:
    """A secured broker, vehicles with their own credentials, and the hazard service running on it."""
    creds = Credentials(tmp_path / "nats")
    passwords = creds.issue_vehicles(VEHICLES)
    service_password = creds.issue_service("hazards")
    creds.save()
    broker = EmbeddedBroker.embedded(tmp_path / "nats", creds.users)
    try:
        broker.start()
        ensure(broker.url, user="svc-hazards", password=service_password)
        with HazardService(broker.url, hazard_dir(tmp_path / "cloud"), "svc-hazards", service_password,
                           HazardPolicy(repetition_s=0.5)) as service:  # repetitions within the test's window
            yield broker, passwords, service_password, service
    finally:
        broker.stop()
    assert not broker.running()


def _streams(broker: EmbeddedBroker, passwords: dict[str, str], tmp_path: Path, loop: StreamLoop
             ) -> dict[str, VehicleStream]:
    return {vid: VehicleStream(vid, broker.url, tmp_path / "spool", user=vid, password=passwords[vid], loop=loop)
            for vid in VEHICLES}


def test_a_hazard_reaches_the_vehicles_whose_road_ahead_is_in_its_area_and_no_other(cloud, tmp_path: Path) -> None:
    broker, passwords, _, service = cloud
    loop = StreamLoop("test")
    streams = _streams(broker, passwords, tmp_path, loop)
    try:
        assert wait_until(lambda: all(s.connected() for s in streams.values()))
        verifier = HazardVerifier([service.signer.public_bytes()])
        filters = {vid: HazardFilter(verifier) for vid in POSITIONS}
        for vid, x in POSITIONS.items():
            cells = filters[vid].cells(x)
            streams[vid].watch_cells(SHARED_ROAD, cells)
            filters[vid].watching({hazard_subject(SHARED_ROAD, c) for c in cells}, time.time())
        time.sleep(0.5)  # the subscriptions are made on the client's loop
        reporter = streams["reporter"]
        reporter.publish(VehicleEvent(vehicle_id="reporter", seq=reporter.next_seq(), t_s=30.0, wall_ts=time.time(),
                                      road=SHARED_ROAD, x_m=5900.0, y_m=0.0, lane=1, speed_mps=29.0, kind="aeb_full",
                                      decel_mps2=9.0, detail={"gap_m": 100.0, "lead_speed_mps": 0.0}))
        got: dict[str, list[str]] = {vid: [] for vid in POSITIONS}

        def pump() -> bool:
            for vid, f in filters.items():
                got[vid] += [f.offer(s, p, t) for s, p, t in streams[vid].received()]
            return "accepted" in got["in-near"] and "accepted" in got["in-far"]

        assert wait_until(pump, 30)
        time.sleep(service.book.policy.repetition_s * 2.5)  # repetitions went out meanwhile, on every cell
        pump()
    finally:
        for s in streams.values():
            s.close()
        loop.close()
    assert got["out-behind"] == [] and got["out-past"] == []  # never delivered outside the area
    assert got["in-near"].count("accepted") == 1 and set(got["in-near"]) <= {"accepted", "replayed"}
    now = time.time()
    near = filters["in-near"].advisory(POSITIONS["in-near"], now)
    assert near is not None and near.speed_mps == pytest.approx(50 / 3.6) and near.time_gap_s == 3.0
    assert filters["in-far"].advisory(POSITIONS["in-far"], now) is None  # told, but the area starts ahead
    assert len(filters["in-near"].latencies_ms) == 1  # it was watching before the event: a latency sample
    (listed,) = read_active(service.directory)
    assert (listed["cause"], listed["x_m"], listed["relevance"]["cells"][0]) == (27, 6000.0, 16)
    assert service.stats()["events"] == 1


def test_a_repetition_reaches_live_subscribers_and_is_stored_once_per_cell(cloud) -> None:
    """Repetitions are for a copy lost on the way (every live subscriber gets each), the stream is for late
    joiners: it keeps one copy of a version per cell, however often it was repeated."""
    broker, passwords, service_password, service = cloud
    cell_subject = hazard_subject(SHARED_ROAD, 16)  # the first cell of the area of an event at x = 5,900 m
    live: list[bytes] = []

    async def run() -> dict[str, int]:
        async def on_copy(msg: Any) -> None:
            live.append(msg.data)

        svc = await nats.connect(broker.url, user="svc-hazards", password=service_password)
        try:
            await svc.subscribe(cell_subject, cb=on_copy)
            await svc.flush()
            reporter = await nats.connect(broker.url, user="reporter", password=passwords["reporter"],
                                          inbox_prefix=vehicle_inbox("reporter"))
            event = VehicleEvent(vehicle_id="reporter", seq=1, t_s=30.0, wall_ts=time.time(), road=SHARED_ROAD,
                                 x_m=5900.0, y_m=0.0, lane=1, speed_mps=29.0, kind="aeb_full", decel_mps2=9.0,
                                 detail={"gap_m": 100.0, "lead_speed_mps": 0.0})
            await reporter.jetstream().publish(event_subject("reporter", "aeb_full"), encode(event))
            await reporter.close()
            deadline = time.monotonic() + 30
            while len(live) < 4 and time.monotonic() < deadline:  # the first copy and three repetitions (0.5 s)
                await asyncio.sleep(0.05)
            info = await svc.jetstream().stream_info("HAZARDS", subjects_filter="haz.>")
            return dict(info.state.subjects or {})
        finally:
            await svc.close()

    stored = asyncio.run(run())
    assert len(live) >= 4 and len(set(live)) == 1  # the same signed version, live each time
    assert service.stats()["published"] >= 4
    assert stored[cell_subject] == 1
    assert set(stored.values()) == {1} and len(stored) > 1  # one copy on every cell it went to


def test_vehicles_cannot_publish_hazards_and_forged_ones_are_dropped(cloud, tmp_path: Path) -> None:
    broker, passwords, service_password, service = cloud
    subject = hazard_subject(SHARED_ROAD, 20)
    loop = StreamLoop("test")
    victim = VehicleStream("in-near", broker.url, tmp_path / "spool", user="in-near", password=passwords["in-near"],
                           loop=loop)
    errors: list[str] = []
    fake = Hazard(action_id=ActionId(station_id="driveloop-cloud", sequence_number=99), detection_time=time.time(),
                  reference_time=time.time(), validity_s=600.0, cause=27, road=SHARED_ROAD, x_m=5500.0,
                  relevance=relevance_area(SHARED_ROAD, 5500.0, "increasing", 2000.0, 100.0),
                  advisory=HazardAdvisory(speed_mps=0.0))
    forged = encode_hazard(HazardSigner(Ed25519PrivateKey.generate()).sign(fake))

    async def attack() -> int:
        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(broker.url, user="reporter", password=passwords["reporter"],
                                inbox_prefix=vehicle_inbox("reporter"), error_cb=on_error)
        await nc.publish(subject, forged)  # a vehicle publishing a hazard: refused by the server
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.close()
        svc = await nats.connect(broker.url, user="svc-hazards", password=service_password)
        stored = (await svc.jetstream().stream_info("HAZARDS")).state.messages
        await svc.publish(subject, forged)  # a stolen service login, but not the signing key
        await svc.publish(subject, encode_hazard(fake))  # unsigned
        await svc.flush()
        await svc.close()
        return int(stored)

    try:
        assert wait_until(victim.connected)
        victim.watch_cells(SHARED_ROAD, [20])
        time.sleep(0.5)
        stored_before = asyncio.run(attack())
        f = HazardFilter(HazardVerifier([service.signer.public_bytes()]))

        def judged() -> bool:
            for r in victim.received():
                f.offer(*r)
            return sum(f.counts.values()) >= 2

        assert wait_until(judged, 30)
    finally:
        victim.close()
        loop.close()
    assert any(f'permissions violation for publish to "{subject}"' in e for e in errors)
    assert stored_before == 0  # nothing the vehicle sent was stored
    assert sorted(f.counts.elements()) == ["bad_signature", "unsigned"]
    assert f.active(time.time()) == [] and f.advisory(5000.0, time.time()) is None


class HoldSpeed:
    """An inference client whose model keeps the speed and the wheel straight (sees nothing)."""

    def infer(self, batch: dict[str, np.ndarray], deadline_s: float) -> BatchResult:
        n = len(batch["kinematics"])
        return BatchResult(np.zeros((n, 2), np.float32), np.full((n, 1), 0.9, np.float32), 0.001, alive=True,
                           delay_s=0.0)

    def inject(self, kind: str, count: int | None = 1) -> None:
        raise AssertionError("no faults here")


def test_a_broker_that_is_down_never_stops_the_fleet(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    loop = StreamLoop("test")
    streams = {vid: VehicleStream(vid, url, tmp_path / "spool", loop=loop) for vid in ("veh000", "veh001")}
    verifier = HazardVerifier([HazardSigner(Ed25519PrivateKey.generate()).public_bytes()])
    plane = StreamDataPlane(streams, verifier, "1")
    try:
        report = run_fleet([VehiclePlan("veh000", "jam-tail", 0), VehiclePlan("veh001", "highway", 1)],
                           {"default": HoldSpeed()}, 3.0, AgentConfig(), data_plane=plane)
        stats = {vid: s.stats() for vid, s in streams.items()}
    finally:
        for s in streams.values():
            s.close()
        loop.close()
    assert report.summary()["ticks"] == 60 and report.summary()["collisions"] == 0
    # every tick's telemetry taken, none acked, all of it kept (queued or in the spool) for when the broker is back
    assert all(st["acked"] == 0 and st["pending"] == st["published"] >= 30 for st in stats.values()), stats
    assert plane.errors == {}  # nothing failed on the vehicle's side: the client holds what it cannot send
    assert plane.summary()["hazards_received"] == 0


class FakeStream:
    """Records what a vehicle publishes and watches (the data plane's logic without a broker)."""

    def __init__(self) -> None:
        self.published: list[Telemetry | VehicleEvent] = []
        self.watched: list[tuple[str, tuple[int, ...]]] = []
        self.seq = 0

    def publish(self, message: Telemetry | VehicleEvent) -> None:
        self.published.append(message)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def watch_cells(self, road: str, cells: Any) -> None:
        self.watched.append((road, tuple(cells)))

    def received(self) -> list[tuple[str, bytes, float]]:
        return []


def test_the_fleet_publishes_telemetry_every_tick_and_events_at_their_onset() -> None:
    jam, highway = FakeStream(), FakeStream()
    verifier = HazardVerifier([HazardSigner(Ed25519PrivateKey.generate()).public_bytes()])
    plane = StreamDataPlane({"veh000": jam, "veh001": highway}, verifier, "3")
    report = run_fleet([VehiclePlan("veh000", "jam-tail", 0), VehiclePlan("veh001", "highway", 1)],
                       {"default": HoldSpeed()}, 45.0, AgentConfig(), data_plane=plane)
    assert report.summary()["collisions"] == 0
    tel = [m for m in jam.published if isinstance(m, Telemetry)]
    events = [m for m in jam.published if isinstance(m, VehicleEvent)]
    assert len(tel) == 450 and [m.seq for m in jam.published] == list(range(len(jam.published)))
    assert {m.road for m in jam.published} == {SHARED_ROAD} and tel[0].scenario == "jam-tail"
    assert tel[0].model_version == "3" and tel[0].x_m < tel[-1].x_m
    # every fallback activation the report counts is an intervention event of its class, on its tick
    took_over = [e for e in events if e.kind == "intervention"]
    assert len(took_over) == report.vehicles[0].interventions >= 1
    assert {e.scenario for e in took_over} == set(report.vehicles[0].interventions_by_kind) == {"jam-tail"}
    assert not [e for e in events if e.kind == "collision"]
    kinds = [e.kind for e in events if e.kind != "intervention"]
    assert kinds[0] == "aeb_full" and "slow_traffic" in kinds  # braked hard, then stood in the queue
    first = next(e for e in events if e.kind != "intervention")
    assert first.decel_mps2 == 9.0 and first.detail["lead_speed_mps"] == pytest.approx(0.0, abs=0.5)
    assert 0.0 < float(first.detail["gap_m"]) <= 100.0
    assert report.vehicles[0].aeb_activations == kinds.count("aeb") + kinds.count("aeb_full") - \
        sum(1 for a, b in zip(kinds, kinds[1:]) if (a, b) == ("aeb", "aeb_full"))
    # a vehicle in a world of its own: its own road, and it watches no cells
    assert {m.road for m in highway.published} == {road_of("veh001", "highway")} != {SHARED_ROAD}
    assert highway.watched == [] and jam.watched and jam.watched[0][0] == SHARED_ROAD
    assert all(b[1][0] >= a[1][0] for a, b in zip(jam.watched, jam.watched[1:]))  # the window moves ahead


class Delivering(FakeStream):
    """A fake stream that hands the data plane the hazard messages queued on it."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: list[tuple[str, bytes, float]] = []

    def received(self) -> list[tuple[str, bytes, float]]:
        out, self.inbox = self.inbox, []
        return out


def test_a_long_drive_prunes_its_hazard_filter() -> None:
    """A terminated action is remembered while a copy could still be live, then forgotten at the next prune."""
    from types import SimpleNamespace

    from driveloop.contracts.stream import HAZARD_MAX_VALIDITY_S
    from driveloop.edge.dataplane import PRUNE_EVERY_S
    from driveloop.edge.hazards import MAX_CLOCK_SKEW_S

    signer = HazardSigner(Ed25519PrivateKey.generate())
    t0 = 1_900_000_000.0
    now = [t0]
    stream = Delivering()
    plane = StreamDataPlane({"veh000": stream}, HazardVerifier([signer.public_bytes()]), clock=lambda: now[0])
    agent = SimpleNamespace(vehicle_id="veh000", spec=SimpleNamespace(kind="highway"))  # a road of its own
    ended = Hazard(action_id=ActionId(station_id="driveloop-cloud", sequence_number=1), detection_time=t0 - 1.0,
                   reference_time=t0, validity_s=60.0, termination="cancellation", cause=27, road=SHARED_ROAD,
                   x_m=5000.0, relevance=relevance_area(SHARED_ROAD, 5000.0, "increasing", 2000.0, 100.0),
                   advisory=HazardAdvisory(speed_mps=10.0))
    stream.inbox.append((hazard_subject(SHARED_ROAD, ended.relevance.cells[0]), encode_hazard(signer.sign(ended)), t0))
    filt = plane._vehicles["veh000"].filter
    assert plane.advisories([agent]) == [None] and filt.counts["terminated"] == 1
    forget_at = t0 + HAZARD_MAX_VALIDITY_S + MAX_CLOCK_SKEW_S + 1.0
    now[0] = forget_at - PRUNE_EVERY_S / 2  # pruned, but a copy could still be live: remembered
    plane.advisories([agent])
    assert len(filt._actions) == 1
    now[0] = forget_at + 1.0  # less than PRUNE_EVERY_S after that prune: not pruned yet
    plane.advisories([agent])
    assert len(filt._actions) == 1
    now[0] = forget_at - PRUNE_EVERY_S / 2 + PRUNE_EVERY_S
    plane.advisories([agent])
    assert filt._actions == {}


def test_interventions_and_crashes_are_published_once_in_the_class_they_happened_in() -> None:
    """What the cloud's shift detector counts: an intervention event on an activation's tick, a collision event for
    each crash the agent counted (in the class it was counted in), never twice."""
    import math
    from types import SimpleNamespace

    stream = FakeStream()
    plane = StreamDataPlane({"veh000": stream}, None, "3", clock=lambda: 1_900_000_000.0)
    ego = SimpleNamespace(x_m=10.0, y_m=0.0, lane_index=1)
    agent = SimpleNamespace(vehicle_id="veh000", t_s=1.0, observation=None, spec=SimpleNamespace(kind="fog", visibility_m=math.inf),
                            snapshot=SimpleNamespace(ego=ego, speed_mps=20.0, accel_mps2=0.0),
                            metrics=SimpleNamespace(collisions_by_kind={}, episodes=0))

    def tick(activation: bool, crashes: dict[str, int]) -> list[tuple[str, str]]:
        agent.last_decision = SimpleNamespace(source="fallback" if activation else "model", activation=activation,
                                              reason="aeb" if activation else None, parts={}, aeb=False, watchdog=None)
        agent.metrics.collisions_by_kind = dict(crashes)
        before = len(stream.published)
        plane.publish([agent])
        return [(m.kind, m.scenario) for m in stream.published[before:] if isinstance(m, VehicleEvent)]

    assert tick(False, {}) == []
    assert tick(True, {}) == [("intervention", "fog")]
    assert tick(False, {"dense": 1}) == [("collision", "dense")]  # counted in the episode before, in dense
    assert tick(False, {"dense": 1}) == []
    assert tick(True, {"dense": 1, "fog": 2}) == [("intervention", "fog"), ("collision", "fog"), ("collision", "fog")]
    assert plane.errors == {}
