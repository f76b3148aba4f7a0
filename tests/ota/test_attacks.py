"""Attack suite (issue 7, acceptance 2): a real python-tuf client on a vehicle talks to a real HTTP
server on 127.0.0.1 that serves a signed repository — and lies. Every attack must be rejected with a
driveloop OTA error, and the vehicle must still boot its verified, committed model afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from driveloop.edge.updater import VehicleUpdater, sha256_file
from driveloop.ota.release import RepoPolicy
from driveloop.ota.release import ReleaseService
from tuf.api.metadata import Metadata, Targets
from tuf.api.serialization.json import JSONSerializer

from driveloop.core.exceptions import OtaError, RollbackAttackError, SignatureError
from tests.fakes.tuf_repo import FakeRegistry, RepoServer, ServerBehaviour

NOW_S = float(int(time.time()))  # clients check expiry against the real clock


@dataclass
class World:
    tmp: Path
    svc: ReleaseService
    reg: FakeRegistry
    vdir: Path
    server: RepoServer
    old_timestamp: bytes  # signed timestamp from before the vehicle's last refresh

    @property
    def meta(self) -> Path:
        return self.svc.repo.metadata_dir

    def vehicle(self) -> VehicleUpdater:
        u = VehicleUpdater(self.vdir, self.server.url)
        u.boot()
        return u

    def serve_instead(self, rel: str, data: bytes) -> None:
        self.server.behaviour.overrides[rel] = data


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    reg = FakeRegistry(tmp_path / "registry")
    factory = reg.add("0", seed=0)
    for v in ("1", "2", "3"):
        reg.add(v, seed=int(v))
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    vdir = tmp_path / "vehicle"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    svc.release("1")
    old_timestamp = (svc.repo.metadata_dir / "timestamp.json").read_bytes()
    svc.release("2")
    with RepoServer(svc.repo.repo_dir, ServerBehaviour()) as server:
        w = World(tmp_path, svc, reg, vdir, server, old_timestamp)
        u = w.vehicle()
        assert u.update("2")
        w.vehicle().commit()  # the vehicle runs verified release 2, with fresh trusted metadata
        yield w


def _still_on_verified(w: World, version: str = "2") -> None:
    u = VehicleUpdater(w.vdir, w.server.url)
    path = u.boot()
    state = u.state()
    assert state.slot(state.active).version == version and not state.trial and state.pending is None
    assert sha256_file(path) == w.reg.get(version).manifest.sha256


# -- the attacks ---------------------------------------------------------------------------------
def attack_older_release(w: World) -> str:
    return "1"  # a validly signed but older model: the director (or an attacker) offers a downgrade


def attack_metadata_rollback(w: World) -> str:
    w.svc.release("3")
    w.serve_instead("metadata/timestamp.json", w.old_timestamp)  # validly signed, older than trusted
    return "3"


def attack_freeze(w: World) -> str:
    w.svc.release("3")
    w.svc.refresh_timestamp(datetime.now(UTC) - timedelta(hours=1))  # stale, expired timestamp
    return "3"


def attack_mix_and_match_snapshot(w: World) -> str:
    old_snapshot_version = w.svc.repo.load_timestamp().signed.snapshot_meta.version
    old = (w.meta / f"{old_snapshot_version}.snapshot.json").read_bytes()
    w.svc.release("3")
    new_version = w.svc.repo.load_timestamp().signed.snapshot_meta.version
    w.serve_instead(f"metadata/{new_version}.snapshot.json", old)  # snapshot from another repo state
    return "3"


def attack_mix_and_match_targets(w: World) -> str:
    # targets metadata of an older state, re-signed by nobody, served under the new version's name
    old_version = w.svc.repo.load_targets().signed.version
    old = (w.meta / f"{old_version}.targets.json").read_bytes()
    w.svc.release("3")
    new_version = w.svc.repo.load_targets().signed.version
    w.serve_instead(f"metadata/{new_version}.targets.json", old)
    return "3"


def attack_tampered_payload(w: World) -> str:
    info = w.svc.release("3")
    real = (w.svc.repo.targets_dir / "models" / "3" / f"{info.sha256}.model.onnx").read_bytes()
    evil = real[:-8] + b"EVILEVIL"  # same length, different bytes
    w.serve_instead(f"targets/models/3/{info.sha256}.model.onnx", evil)
    return "3"


def attack_arbitrary_manifest(w: World) -> str:
    info = w.svc.release("3")
    man = w.svc.repo.load_targets().signed.targets["models/3/manifest.json"]
    w.serve_instead(f"targets/models/3/{man.hashes['sha256']}.manifest.json", b'{"sha256": "' + info.sha256.encode() + b'"}')
    return "3"


def attack_endless_data(w: World) -> str:
    w.svc.release("3")
    w.server.behaviour.endless_suffix = ".model.onnx"
    return "3"


def attack_wrong_hardware(w: World) -> str:
    w.svc.release("3", hardware_class="cuda")
    return "3"


def _revoked_key_attack(role: str) -> Callable[[World], str]:
    def attack(w: World) -> str:
        old_keyid = w.svc.repo.active_keyids()[role][0]
        stolen = w.svc.repo.keys.signer(role, old_keyid)  # the attacker kept the key we revoke next
        w.svc.rotate_key(role)
        w.svc.release("3")
        if role == "targets":
            version = w.svc.repo.load_targets().signed.version
            md = Metadata.from_bytes((w.meta / f"{version}.targets.json").read_bytes())
            assert isinstance(md.signed, Targets)
            md.signatures.clear()
            md.sign(stolen)
            w.serve_instead(f"metadata/{version}.targets.json", md.to_bytes(JSONSerializer(compact=False)))
        else:
            md = Metadata.from_bytes((w.meta / "timestamp.json").read_bytes())
            md.signed.version += 1
            md.signatures.clear()
            md.sign(stolen)
            w.serve_instead("metadata/timestamp.json", md.to_bytes(JSONSerializer(compact=False)))
        return "3"

    return attack


ATTACKS: list[tuple[str, Callable[[World], str], type[OtaError], str]] = [
    ("rollback: older release", attack_older_release, RollbackAttackError, "not newer"),
    ("rollback: metadata version", attack_metadata_rollback, RollbackAttackError, "rollback"),
    ("freeze: expired timestamp", attack_freeze, OtaError, "expired"),
    ("mix-and-match: snapshot", attack_mix_and_match_snapshot, RollbackAttackError, "mix-and-match"),
    ("mix-and-match: targets", attack_mix_and_match_targets, RollbackAttackError, "mix-and-match"),
    ("tampered payload", attack_tampered_payload, SignatureError, "tampered"),
    ("arbitrary manifest", attack_arbitrary_manifest, SignatureError, "tampered"),
    ("endless data", attack_endless_data, OtaError, "endless data"),
    ("wrong hardware class", attack_wrong_hardware, OtaError, "hardware class 'cuda'"),
    ("revoked targets key", _revoked_key_attack("targets"), SignatureError, "not signed by a trusted key"),
    ("revoked timestamp key", _revoked_key_attack("timestamp"), SignatureError, "not signed by a trusted key"),
]


@pytest.mark.parametrize(("name", "attack", "error", "match"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_rejected_and_vehicle_stays_verified(
    world: World, name: str, attack: Callable[[World], str], error: type[OtaError], match: str
) -> None:
    target = attack(world)
    u = world.vehicle()
    with pytest.raises(error, match=match):
        u.update(target)
    _still_on_verified(world)
    slot_b = u.state().slot(u.state().inactive)
    assert slot_b.status == "ready" and slot_b.version == "0", "the fallback slot must be untouched"


def test_honest_server_after_attacks_still_updates(world: World) -> None:
    """Control: the same setup without lies installs release 3 (so the attacks above fail for the
    reason they test, not because the setup is broken)."""
    world.svc.release("3")
    assert world.vehicle().update("3")
    u = world.vehicle()
    assert u.state().slot(u.state().running).version == "3"
