"""The fleet server's live view against a real embedded nats-server: vehicles publish telemetry with their own
credentials, the cloud's signed hazard (issued before the server started) and a forged one are on the HAZARDS
stream; ``GET /v1/live`` shows the 3 vehicles and the signed hazard only, ``/v1/live/events`` streams snapshots
and refuses streams beyond its bound (429), and a server without a data plane says so (404)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.cloud.broker import Credentials, EmbeddedBroker, ensure_streams, free_port
from driveloop.cloud.hazard_service import hazard_dir, load_signer, public_key
from driveloop.contracts.hazard import (
    CAUSES,
    ActionId,
    Hazard,
    HazardAdvisory,
    HazardSigner,
    encode_hazard,
    relevance_area,
)
from driveloop.contracts.stream import Telemetry, encode, hazard_subject, telemetry_subject
from driveloop.ota.live_feed import LiveSource
from driveloop.ota.server import ServerConfig, create_app
from tests.fakes.serve import ota_serve
from tests.ota.test_server import ADMIN, Running, serve_in_thread, start_server

VEHICLES = {"veh-001": (300.0, "model"), "veh-002": (650.0, "fallback"), "veh-003": (1000.0, "model")}
SERVICE = "dashboard"


@dataclass
class LivePlane:
    """A broker with vehicle and service users, the cloud's signer, and a way to publish as either."""

    broker: EmbeddedBroker
    passwords: dict[str, str]
    service_password: str
    signer: HazardSigner
    seqs: dict[str, int]

    def _run(self, user: str, password: str, messages: list[tuple[str, bytes]]) -> None:
        async def go() -> None:
            import nats

            nc = await nats.connect(self.broker.url, user=user, password=password)
            for subject, data in messages:
                await nc.publish(subject, data)
            await nc.flush()
            await nc.close()

        with ThreadPoolExecutor(1) as pool:  # its own thread: the caller may be inside a loop (playwright's)
            pool.submit(asyncio.run, go()).result()

    def drive(self, vid: str, x_m: float, mode: str = "model", speed_mps: float = 30.0) -> None:
        """Vehicle ``vid`` publishes its next telemetry under its own credentials."""
        self.seqs[vid] = self.seqs.get(vid, 0) + 1
        t = Telemetry(vehicle_id=vid, seq=self.seqs[vid], t_s=self.seqs[vid] * 0.1, wall_ts=time.time(), x_m=x_m,
                      y_m=0.0, lane=1, speed_mps=speed_mps, accel_mps2=0.0, mode=mode)  # type: ignore[arg-type]
        self._run(vid, self.passwords[vid], [(telemetry_subject(vid), encode(t))])

    def raw_telemetry(self, vid: str, data: bytes) -> None:
        self._run(vid, self.passwords[vid], [(telemetry_subject(vid), data)])

    def hazard(self, hazard: Hazard, signer: HazardSigner) -> None:
        """Published on every cell of its relevance area, as the hazard service does (a service user)."""
        data = encode_hazard(signer.sign(hazard))
        self._run(f"svc-{SERVICE}", self.service_password,
                  [(hazard_subject(hazard.road, c), data) for c in hazard.relevance.cells])

    def source(self, cloud_dir: Path, **kw: Any) -> LiveSource:
        return LiveSource(self.broker.url, f"svc-{SERVICE}", self.service_password,
                          hazard_keys=(public_key(hazard_dir(cloud_dir)),), **kw)


def jam(seq: int, x_m: float = 1200.0, station: str = "cloud") -> Hazard:
    now = time.time()
    return Hazard(action_id=ActionId(station_id=station, sequence_number=seq), detection_time=now - 1.0,
                  reference_time=now, validity_s=300.0, cause=CAUSES["dangerousEndOfQueue"], road="hw1", x_m=x_m,
                  relevance=relevance_area("hw1", x_m, "increasing", 600.0, 50.0),
                  advisory=HazardAdvisory(speed_mps=15.0))


@contextlib.contextmanager
def live_plane(tmp: Path) -> Iterator[LivePlane]:
    creds = Credentials(tmp / "nats")
    passwords = creds.issue_vehicles(VEHICLES)
    service_password = creds.issue_service(SERVICE)
    creds.save()
    with EmbeddedBroker.embedded(tmp / "nats", creds.users) as broker:
        async def streams() -> None:
            import nats

            nc = await nats.connect(broker.url, user=f"svc-{SERVICE}", password=service_password)
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(streams())
        yield LivePlane(broker, passwords, service_password, load_signer(hazard_dir(tmp / "cloud")), {})


def wait_for(url: str, ok: Callable[[dict[str, Any]], bool], what: str, tries: int = 200) -> dict[str, Any]:
    """Poll ``GET /v1/live`` until ``ok(view)``; fails with the last view (no wall-clock bound on speed)."""
    view: dict[str, Any] = {}
    for _ in range(tries):
        view = httpx.get(f"{url}/v1/live").json()
        if ok(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"{what}: last view {json.dumps(view)[:2000]}")


@contextlib.contextmanager
def live_fleet_server(tmp: Path, **source_kw: Any) -> Iterator[tuple[Running, LivePlane]]:
    """A broker, the cloud's signed hazard already on it, then a fleet server whose live view is subscribed,
    the 3 vehicles driving and a forged hazard published after it: what the tests (and the page) look at."""
    with live_plane(tmp) as plane:
        plane.hazard(jam(1), plane.signer)  # before the server: read back from the HAZARDS stream
        with start_server(tmp, live=plane.source(tmp / "cloud", **source_kw)) as srv:
            wait_for(srv.url, lambda v: v["connected"], "the live view never connected")
            for vid, (x, mode) in VEHICLES.items():
                plane.drive(vid, x, mode)
            forger = HazardSigner(Ed25519PrivateKey.generate())
            plane.hazard(jam(2, x_m=900.0, station="cloud"), forger)
            yield srv, plane


@pytest.fixture(scope="module")
def live_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, LivePlane]]:
    with live_fleet_server(tmp_path_factory.mktemp("live"), max_streams=2) as running:
        yield running


def test_live_shows_the_vehicles_and_the_signed_hazard_only(live_srv: tuple[Running, LivePlane]) -> None:
    srv, _ = live_srv
    view = wait_for(srv.url, lambda v: len(v["vehicles"]) == 3 and v["counts"]["hazards"].get("bad_signature"),
                    "3 vehicles and the forged hazard judged")
    assert [(v["vehicle_id"], v["x_m"], v["mode"], v["road"]) for v in view["vehicles"]] == \
        [(vid, x, mode, "hw1") for vid, (x, mode) in VEHICLES.items()]
    [hazard] = view["hazards"]
    assert (hazard["action"], hazard["cause_name"], hazard["x_m"], hazard["from_x_m"], hazard["to_x_m"]) == \
        ("cloud/1", "dangerousEndOfQueue", 1200.0, 600.0, 1250.0)
    assert 0 < hazard["remaining_s"] <= 300.0
    # each copy (one per cell of its area) of the forged one is refused; the signed one's extra copies are repeats
    assert view["counts"]["hazards"]["bad_signature"] == len(jam(2, x_m=900.0).relevance.cells)
    assert view["counts"]["hazards"]["accepted"] == 1
    assert view["roads"] == ["hw1"] and view["hazard_verification"] is True


def test_malformed_telemetry_is_dropped_and_counted(live_srv: tuple[Running, LivePlane]) -> None:
    srv, plane = live_srv
    before = httpx.get(f"{srv.url}/v1/live").json()["counts"]["telemetry"].get("malformed", 0)
    plane.raw_telemetry("veh-003", b'{"vehicle_id":"veh-003","seq":"many"}')
    view = wait_for(srv.url, lambda v: v["counts"]["telemetry"].get("malformed", 0) == before + 1,
                    "the malformed message counted")
    assert [v["x_m"] for v in view["vehicles"] if v["vehicle_id"] == "veh-003"] == [1000.0]  # unchanged


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The ``snapshot`` events of an SSE body, parsed."""
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind == "snapshot":
            yield json.loads(line[6:])


def test_event_stream_follows_a_moving_vehicle_and_is_bounded(live_srv: tuple[Running, LivePlane]) -> None:
    srv, plane = live_srv
    wait_for(srv.url, lambda v: len(v["vehicles"]) == 3, "3 vehicles")
    with httpx.Client(timeout=30.0) as client, contextlib.ExitStack() as streams:
        first = streams.enter_context(client.stream("GET", f"{srv.url}/v1/live/events"))
        assert first.status_code == 200 and first.headers["content-type"].startswith("text/event-stream")
        second = streams.enter_context(client.stream("GET", f"{srv.url}/v1/live/events"))
        assert second.status_code == 200
        third = client.get(f"{srv.url}/v1/live/events")  # max_streams=2 in this server's source
        assert third.status_code == 429 and "at most 2 live streams" in third.json()["error"]

        events = _events(first.iter_lines())
        snap = next(events)
        assert {v["vehicle_id"] for v in snap["vehicles"]} == set(VEHICLES)
        moved_to = next(v["x_m"] for v in snap["vehicles"] if v["vehicle_id"] == "veh-002") + 25.0
        plane.drive("veh-002", moved_to, "model")
        for snap in events:
            row = next(v for v in snap["vehicles"] if v["vehicle_id"] == "veh-002")
            if row["x_m"] == moved_to:
                assert row["mode"] == "model"
                break
        else:
            raise AssertionError("the stream ended without showing veh-002 moved")
    # both clients gone: their slots are free again
    for _ in range(100):
        with httpx.Client(timeout=30.0) as client, client.stream("GET", f"{srv.url}/v1/live/events") as again:
            if again.status_code == 200:
                break
        time.sleep(0.05)
    assert again.status_code == 200


def test_a_stream_ends_cleanly_by_itself_and_at_shutdown(tmp_path: Path) -> None:
    with live_plane(tmp_path) as plane:
        app = create_app(ServerConfig(tmp_path / "ota", ADMIN, background_eval=False,
                                      live=plane.source(tmp_path / "cloud", max_stream_s=1.0)))
        url, server, thread = serve_in_thread(app)
        try:
            with httpx.Client(timeout=30.0) as client, client.stream("GET", f"{url}/v1/live/events") as r:
                body = "".join(r.iter_text())  # returns: the server ended the stream after max_stream_s
            assert body.startswith("retry: 1000\n\n") and body.count("event: snapshot") >= 1

            opened, done = threading.Event(), threading.Event()

            def hold() -> None:
                with httpx.Client(timeout=30.0) as c, c.stream("GET", f"{url}/v1/live/events") as held:
                    opened.set()
                    "".join(held.iter_text())
                done.set()

            holder = threading.Thread(target=hold, daemon=True)
            holder.start()
            assert opened.wait(30)  # a stream is open when the server is told to stop
        finally:
            server.should_exit = True
            thread.join(timeout=60)
        assert not thread.is_alive(), "an open event stream held the server up"
        holder.join(timeout=60)
        assert done.is_set()


def test_a_broker_that_is_down_leaves_the_dashboard_serving(tmp_path: Path) -> None:
    source = LiveSource(f"nats://127.0.0.1:{free_port()}", hazard_keys=())
    with start_server(tmp_path, live=source) as srv:
        view = httpx.get(f"{srv.url}/v1/live").json()
        assert (view["connected"], view["vehicles"], view["hazard_verification"]) == (False, [], False)
        assert httpx.get(f"{srv.url}/v1/dashboard").status_code == 200


def test_without_a_data_plane_live_is_404(tmp_path: Path) -> None:
    with start_server(tmp_path) as srv:
        for path in ("/v1/live", "/v1/live/events"):
            r = httpx.get(f"{srv.url}{path}")
            assert r.status_code == 404 and "no live data plane configured" in r.json()["error"]


def test_ota_serve_reads_the_broker_from_settings(tmp_path: Path) -> None:
    """``driveloop ota serve`` with ``DRIVELOOP_NATS_URL`` (+ service user) and the hazard service's key under
    its home: the live panel's view is connected, shows a driving vehicle and the signed hazard."""
    from tests.ota.test_server import write_release

    with live_plane(tmp_path) as plane:  # the signer's public key lands in <home>/cloud/hazards
        plane.hazard(jam(7), plane.signer)
        write_release(tmp_path / "ota", ["1"])
        env = {"DRIVELOOP_OTA_ADMIN_TOKEN": ADMIN, "DRIVELOOP_NATS_URL": plane.broker.url,
               "DRIVELOOP_NATS_USER": f"svc-{SERVICE}", "DRIVELOOP_NATS_PASSWORD": plane.service_password}
        with ota_serve(tmp_path, lambda url: httpx.get(f"{url}/v1/live", timeout=1.0).json().get("connected"),
                       env) as url:
            plane.drive("veh-001", 420.0)
            view = wait_for(url, lambda v: len(v["vehicles"]) == 1 and len(v["hazards"]) == 1, "vehicle and hazard")
            assert view["vehicles"][0]["x_m"] == 420.0 and view["hazards"][0]["action"] == "cloud/7"
