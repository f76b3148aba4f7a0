"""The director repository (Uptane): per-vehicle signed assignments, lazy re-signing, key rotation, and the
fleet server end to end — `/v1/update` signs, `/director/<vehicle>/` serves, the vehicle follows the
signature (the attacks on it are in test_attacks.py)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata

from driveloop.edge.ota_client import OtaClient
from driveloop.edge.updater import VehicleUpdater
from driveloop.ota.director_repo import DirectorRepo
from driveloop.ota.release import ReleaseService, RepoPolicy
from tests.fakes.tuf_repo import FakeRegistry, serve_asgi, tuf_client

NOW_S = float(int(time.time()))  # clients check expiry against the real clock
ADMIN = "admin-token-0123456789"


@pytest.fixture
def ota(tmp_path: Path) -> tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]:
    reg = FakeRegistry(tmp_path / "registry")
    for v in ("0", "1", "2"):
        reg.add(v, seed=int(v))
    ota_dir = tmp_path / "ota"
    svc = ReleaseService(ota_dir / "repo", ota_dir / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    svc.release("1")
    director = DirectorRepo.at(ota_dir, clock=lambda: NOW_S)
    return ota_dir, svc, director, reg


def test_no_root_no_signature(ota: tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]) -> None:
    _, _, director, _ = ota
    assert director.assign("veh-1", "1") is None
    assert not director.vehicles_dir.exists()


def test_assignment_is_signed_per_vehicle_and_only_when_it_changes(
        ota: tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]) -> None:
    _, svc, director, _ = ota
    director.bootstrap()
    assert director.assign("veh-1", "1") == 1
    assert director.assign("veh-1", "1") == 1  # unchanged, fresh: not re-signed
    assert director.assign("veh-1", "1", "2") == 1  # release 2 is not in the image repository: left out
    svc.release("2")
    assert director.assign("veh-1", "1", "2") == 2
    assert director.assign("veh-2", None) == 1
    md = director.vehicle_repo("veh-1").load_targets()
    assert md.signed.unrecognized_fields["custom"] == {"vehicle_id": "veh-1"}
    image = svc.repo.load_targets().signed.targets
    roles = {}
    for path, t in md.signed.targets.items():
        assert (t.length, t.hashes) == (image[path].length, {"sha256": image[path].hashes["sha256"]})
        roles[t.unrecognized_fields["custom"]["role"]] = path
    assert roles == {"active": "models/1/model.onnx", "shadow": "models/2/model.onnx"}
    assert director.vehicle_repo("veh-2").load_targets().signed.targets == {}
    with pytest.raises(Exception, match="invalid vehicle id"):
        director.assign("../veh-1", "1")


def test_director_key_rotation_resigns_each_vehicle_on_its_next_assignment(
        tmp_path: Path, ota: tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]) -> None:
    _, _, director, _ = ota
    director.bootstrap()
    root_v1 = director.trusted_root()
    assert director.assign("veh-1", "1") == 1
    old = director.top.active_keyids()["targets"]
    new = director.rotate_key("targets")
    assert new != old and director.top.root_version() == 2
    assert director.assign("veh-1", "1") == 2  # same assignment, re-signed with the new key
    repo = director.vehicle_repo("veh-1")
    assert (repo.metadata_dir / "2.root.json").is_file()
    assert set(repo.load_targets().signatures) == set(new)
    client = tuf_client(repo.repo_dir, tmp_path / "client", root_v1)  # a vehicle provisioned with root v1
    client.refresh()
    assert client.get_targetinfo("models/1/model.onnx") is not None


def test_fleet_server_signs_what_the_vehicle_installs(
        tmp_path: Path, ota: tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]) -> None:
    from driveloop.ota.server import ServerConfig, create_app

    ota_dir, svc, director, reg = ota
    director.bootstrap()
    svc.release("2")
    factory = reg.get("1")
    vid = "veh-0007"
    vdir = tmp_path / vid
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump(),
                             release_seq=1, director_root=director.trusted_root(), vehicle_id=vid)
    tol = {"min_vehicles": 1, "min_hours": 0.0, "min_control_hours": 0.0, "min_shadow_ticks": 0}
    plan = {"stages": [{"name": "shadow", "fraction": 1.0, "shadow": True, "min_duration_s": 0.0,
                        "min_evaluations": 1, "tolerances": tol},
                       {"name": "100%", "fraction": 1.0, "min_duration_s": 0.0, "min_evaluations": 1,
                        "tolerances": tol}]}
    app = create_app(ServerConfig(ota_dir, ADMIN, background_eval=False))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        token = http.post("/v1/vehicles", json={"vehicle_id": vid}, headers=admin).json()["token"]
        client = OtaClient(vid, url, token, vdir, http=http)
        active = client.start()
        assert client.sync(active)["action"] == "none"  # no rollout: the director signs "keep installed"
        assert http.get(f"/director/{vid}/metadata/timestamp.json").status_code == 200
        r = http.post("/v1/rollouts", json={"version": "2", "previous_version": "1", "plan": plan}, headers=admin)
        assert r.status_code == 201, r.text
        offer = client.sync(active)
        assert (offer["shadow_version"], offer["action"]) == ("2", "shadow")
        assert client.shadow is not None and client.shadow.version == "2"
        assert http.post("/v1/rollouts/1/promote", json={"reason": "test"}, headers=admin).status_code == 200
        assert client.sync(active)["action"] == "pending"  # the shadow slot boots as a trial
    trusted = Metadata.from_bytes((vdir / "director" / "targets.json").read_bytes()).signed
    assert trusted.unrecognized_fields["custom"]["vehicle_id"] == vid
    assert [t.unrecognized_fields["custom"]["role"] for t in trusted.targets.values()] == ["active"]
    assert VehicleUpdater(vdir, svc.repo.repo_dir).state().pending is not None


def test_switch_back_needs_the_directors_signature_too(
        tmp_path: Path, ota: tuple[Path, ReleaseService, DirectorRepo, FakeRegistry]) -> None:
    """An aborted rollout sends a vehicle back to the model in its other slot without a download; the
    director must sign that model's sha256 too, so its key alone cannot name other bytes for it."""
    import hashlib

    from tuf.api.metadata import TargetFile

    from driveloop.core.exceptions import SignatureError

    _, svc, director, reg = ota
    director.bootstrap()
    svc.release("2")
    vid, vdir = "veh-0009", tmp_path / "veh-0009"
    factory = reg.get("0")
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump(),
                             director_root=director.trusted_root(), vehicle_id=vid)
    start = lambda: VehicleUpdater(vdir, svc.repo.repo_dir, director=director.vehicles_dir / vid)
    for version in ("1", "2"):  # 1 committed in slot b, then 2 committed in slot a
        director.assign(vid, version)
        u = start()
        u.boot()
        assert u.update(version)
        u = start()
        u.boot()
        u.commit()
    repo = director.vehicle_repo(vid)
    path = "models/1/model.onnx"
    evil = b"not release 1"
    repo.publish({path: TargetFile(len(evil), {"sha256": hashlib.sha256(evil).hexdigest()}, path,
                                   {"custom": {"role": "active", "model_version": "1"}})},
                 repo.highest_targets_version(), NOW_S, {"vehicle_id": vid})
    with pytest.raises(SignatureError, match="differs from the verified model in slot b"):
        start().check("1")
    director.assign(vid, "1")  # the honest abort
    offer = start().check("1")
    assert offer is not None and offer.model_target is None and offer.sha256 == reg.get("1").manifest.sha256
