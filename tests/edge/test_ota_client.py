"""OtaClient.sync: what a vehicle does with the director's offer, against a real signed repository.

The director is an httpx MockTransport answering ``GET /v1/update``; the TUF repository is a local
directory written by the real ReleaseService.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from driveloop.edge.health_window import HealthWindowResult
from driveloop.edge.ota_client import OtaClient
from driveloop.edge.updater import VehicleUpdater
from driveloop.ota.release import ReleaseService, RepoPolicy
from tests.fakes.tuf_repo import FakeRegistry

NOW_S = float(int(time.time()))  # clients check expiry against the real clock
HEALTHY = HealthWindowResult(model_loaded=True, ticks=200)
UNHEALTHY = HealthWindowResult(model_loaded=True, ticks=200, collisions=1)


class Director:
    """What the fleet server's director answers, settable per test step."""

    def __init__(self) -> None:
        self.offer: dict[str, Any] = {"version": None, "shadow_version": None}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/update"
        return httpx.Response(200, json={"vehicle_id": request.url.params["vehicle"], **self.offer})


@pytest.fixture
def vehicle(tmp_path: Path) -> tuple[ReleaseService, Director, Path]:
    reg = FakeRegistry(tmp_path / "registry")
    factory = reg.add("0", seed=0)
    reg.add("1", seed=1)
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    svc.release("1")
    vdir = tmp_path / "veh-0001"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    return svc, Director(), vdir


def client(svc: ReleaseService, director: Director, vdir: Path) -> OtaClient:
    """One vehicle process start's client: director over HTTP (mocked), TUF from the local repository."""
    http = httpx.Client(transport=httpx.MockTransport(director))
    c = OtaClient(vdir.name, "http://fleet.test", "token", vdir, http=http)
    c.updater = VehicleUpdater(vdir, svc.repo.repo_dir)
    return c


def shadow_then_canary(svc: ReleaseService, director: Director, vdir: Path) -> OtaClient:
    """Shadow stage: v1 installed beside the running v0; then the canary stage offers v1 to actuate."""
    c = client(svc, director, vdir)
    active = c.start()
    director.offer = {"version": "0", "shadow_version": "1"}
    assert c.sync(active)["action"] == "shadow"
    state = c.updater.state()
    assert (state.slot("b").version, state.slot("b").status, state.pending) == ("1", "ready", None)
    director.offer = {"version": "1", "shadow_version": None}
    assert c.sync(active)["action"] == "pending"  # before the fix: "reverted", committed on the spot
    return c


def test_canary_after_shadow_boots_the_shadow_slot_as_a_trial(vehicle: tuple[ReleaseService, Director, Path]) -> None:
    svc, director, vdir = vehicle
    shadow_then_canary(svc, director, vdir)
    state = VehicleUpdater(vdir, svc.repo.repo_dir).state()
    assert (state.active, state.pending, state.committed_seq) == ("a", "b", 0)  # not committed yet
    c = client(svc, director, vdir)
    model = c.start()
    assert (model.version, model.trial) == ("1", True)
    c.close_window(HEALTHY)
    state = c.updater.state()
    assert (state.active, state.pending, state.trial, state.committed_seq) == ("b", None, False, 1)


def test_canary_after_shadow_that_fails_its_health_window_returns_to_the_committed_model(
        vehicle: tuple[ReleaseService, Director, Path]) -> None:
    svc, director, vdir = vehicle
    shadow_then_canary(svc, director, vdir)
    c = client(svc, director, vdir)
    assert c.start().trial
    c.close_window(UNHEALTHY)
    state = c.updater.state()
    assert (state.active, state.slot("b").status, state.committed_seq) == ("a", "failed", 0)
    assert client(svc, director, vdir).start().version == "0"


def test_abort_after_commit_still_switches_back_without_a_trial(vehicle: tuple[ReleaseService, Director, Path]) -> None:
    """The switch-back path proper: the previous model, committed before, is not tried again."""
    svc, director, vdir = vehicle
    c = client(svc, director, vdir)
    director.offer = {"version": "1", "shadow_version": None}  # a canary without a shadow stage
    assert c.sync(c.start())["action"] == "pending"
    c = client(svc, director, vdir)
    active = c.start()
    assert active.trial
    c.close_window(HEALTHY)  # v1 committed (seq 1); slot a still holds v0 (seq 0)
    director.offer = {"version": "0", "shadow_version": None}  # the rollout was aborted
    assert c.sync(active)["action"] == "reverted"
    state = c.updater.state()
    assert (state.active, state.pending, state.trial, state.slot("a").version) == ("a", None, False, "0")
    model = client(svc, director, vdir).start()
    assert (model.version, model.trial) == ("0", False)
