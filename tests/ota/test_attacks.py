"""Attack suite (issue 7, acceptance 2; fleet trust §2): a vehicle runs two real python-tuf clients —
the image repository and its director repository (Uptane) — against real HTTP servers on 127.0.0.1
that serve signed repositories, and lie. Every attack must be rejected with a driveloop OTA error, and
the vehicle must still boot its verified, committed model afterwards.

Unless an attack rigs the director itself, the honest director signs the attack's target for the
vehicle, so each image-repository attack is stopped by the image checks, not by a missing assignment.
The director attacks: its online keys compromised alone, the image repository's online keys compromised
alone, replayed or frozen director metadata, and mix-and-match between the two repositories.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from driveloop.core.exceptions import OtaError, RollbackAttackError, SignatureError
from driveloop.edge.updater import VehicleUpdater, sha256_file
from driveloop.ota.director_repo import DirectorRepo
from driveloop.ota.release import ReleaseService, RepoPolicy
from tests.fakes.tuf_repo import FakeRegistry, RepoServer, ServerBehaviour

NOW_S = float(int(time.time()))  # clients check expiry against the real clock
VID = "veh-0001"
OTHER = "veh-0002"
_JSON = JSONSerializer(compact=False)


@dataclass
class World:
    tmp: Path
    svc: ReleaseService
    director: DirectorRepo
    reg: FakeRegistry
    vdir: Path
    server: RepoServer  # the image repository
    dserver: RepoServer  # the director: one repository per vehicle under /<vehicle_id>/
    old_timestamp: bytes  # signed image timestamp from before the vehicle's last refresh
    old_director_timestamp: bytes  # signed director timestamp from before the vehicle's last refresh
    rigged: bool = False  # the attack set the director's answer itself

    @property
    def meta(self) -> Path:
        return self.svc.repo.metadata_dir

    def vehicle(self) -> VehicleUpdater:
        u = VehicleUpdater(self.vdir, self.server.url, director=f"{self.dserver.url}/{VID}")
        u.boot()
        return u

    def serve_instead(self, rel: str, data: bytes) -> None:
        self.server.behaviour.overrides[rel] = data

    def director_serves_instead(self, rel: str, data: bytes) -> None:
        self.rigged = True
        self.dserver.behaviour.overrides[f"{VID}/{rel}"] = data


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    reg = FakeRegistry(tmp_path / "registry")
    factory = reg.add("0", seed=0)
    for v in ("1", "2", "3"):
        reg.add(v, seed=int(v))
    ota = tmp_path / "ota"
    svc = ReleaseService(ota / "repo", ota / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    director = DirectorRepo.at(ota, clock=lambda: NOW_S)
    director.bootstrap()
    vdir = tmp_path / "vehicle"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump(),
                             director_root=director.trusted_root(), vehicle_id=VID)
    svc.release("1")
    old_timestamp = (svc.repo.metadata_dir / "timestamp.json").read_bytes()
    director.assign(VID, "1")
    old_director_timestamp = (director.vehicle_repo(VID).metadata_dir / "timestamp.json").read_bytes()
    svc.release("2")
    director.assign(VID, "2")
    with RepoServer(svc.repo.repo_dir, ServerBehaviour()) as server, \
            RepoServer(director.vehicles_dir, ServerBehaviour()) as dserver:
        w = World(tmp_path, svc, director, reg, vdir, server, dserver, old_timestamp, old_director_timestamp)
        u = w.vehicle()
        assert u.update("2")
        w.vehicle().commit()  # the vehicle runs verified release 2, with fresh trusted metadata of both
        yield w


def _still_on_verified(w: World, version: str = "2") -> None:
    u = VehicleUpdater(w.vdir, w.server.url, director=f"{w.dserver.url}/{VID}")
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


# -- the director (Uptane): each repository's online keys alone must not be enough -------------------
def _evil(w: World) -> tuple[bytes, str]:
    real = w.reg.get("3").onnx_path.read_bytes()
    evil = real[:-8] + b"EVILEVIL"
    return evil, hashlib.sha256(evil).hexdigest()


def _director_signs(w: World, entries: dict[str, TargetFile], vehicle_id: str = VID) -> None:
    """The attacker holds the director's online keys: it signs whatever it likes for ``vehicle_id``."""
    w.rigged = True
    repo = w.director.vehicle_repo(vehicle_id)
    repo.publish(entries, repo.highest_targets_version(), NOW_S, {"vehicle_id": vehicle_id})


def _directed(version: str, data: bytes, role: str = "active") -> dict[str, TargetFile]:
    path = f"models/{version}/model.onnx"
    return {path: TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, path,
                             {"custom": {"role": role, "model_version": version}})}


def attack_director_key_evil_image(w: World) -> str:
    w.svc.release("3")
    evil, digest = _evil(w)
    _director_signs(w, _directed("3", evil))  # the director names release 3 with the attacker's bytes
    w.serve_instead(f"targets/models/3/{digest}.model.onnx", evil)
    return "3"


def attack_director_key_unreleased_image(w: World) -> str:
    evil, digest = _evil(w)
    _director_signs(w, _directed("7", evil))  # an image the image repository never signed
    w.serve_instead(f"targets/models/7/{digest}.model.onnx", evil)
    return "7"


def _image_keys_sign(w: World, add: dict[str, TargetFile]) -> None:
    """The attacker holds the image repository's online targets key: it re-signs the targets the
    vehicle will fetch (same version, so snapshot and timestamp still match) with ``add`` in them."""
    version = w.svc.repo.load_targets().signed.version
    md = Metadata.from_bytes((w.meta / f"{version}.targets.json").read_bytes())
    assert isinstance(md.signed, Targets)
    md.signed.targets.update(add)
    md.signatures.clear()
    for keyid in w.svc.repo.active_keyids()["targets"]:
        md.sign(w.svc.repo.keys.signer("targets", keyid), append=True)
    w.serve_instead(f"metadata/{version}.targets.json", md.to_bytes(_JSON))


def _image_target(version: str, data: bytes, seq: int) -> TargetFile:
    t = TargetFile.from_data(f"models/{version}/model.onnx", data, ["sha256"])
    t.unrecognized_fields["custom"] = {"model_version": version, "sha256": t.hashes["sha256"],
                                       "hardware_class": "any", "release_seq": seq}
    return t


def _forge_release(w: World, version: str, seq: int) -> None:
    """Model and manifest targets of the attacker's bytes, signed with the stolen image targets key:
    everything the image repository alone checks is consistent."""
    evil, digest = _evil(w)
    manifest = (b'{"name": "policy", "sha256": "%s", "version": "%s"}' % (digest.encode(), version.encode()))
    man_t = TargetFile.from_data(f"models/{version}/manifest.json", manifest, ["sha256"])
    _image_keys_sign(w, {f"models/{version}/model.onnx": _image_target(version, evil, seq), man_t.path: man_t})
    w.serve_instead(f"targets/models/{version}/{digest}.model.onnx", evil)
    w.serve_instead(f"targets/models/{version}/{man_t.hashes['sha256']}.manifest.json", manifest)


def attack_image_key_evil_image(w: World) -> str:
    info = w.svc.release("3")  # the director honestly assigns the real release 3
    _forge_release(w, "3", info.release_seq)
    return "3"


def attack_image_key_unassigned_image(w: World) -> str:
    _forge_release(w, "4", 99)
    w.rigged = True  # the director still assigns release 2: nobody assigned the attacker's release 4
    return "4"


def attack_director_replay(w: World) -> str:
    w.svc.release("3")
    w.director.assign(VID, "3")
    w.director_serves_instead("metadata/timestamp.json", w.old_director_timestamp)  # validly signed, older
    return "3"


def attack_director_freeze(w: World) -> str:
    w.svc.release("3")
    w.director.assign(VID, "3")
    repo = w.director.vehicle_repo(VID)
    md = Metadata.from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    md.signed.version += 1
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    md.signatures.clear()
    md.sign(w.director.keys.signer("timestamp", repo.active_keyids()["timestamp"][0]))
    w.director_serves_instead("metadata/timestamp.json", md.to_bytes(_JSON))  # stale: an expired timestamp
    return "3"


def attack_mix_other_vehicles_director(w: World) -> str:
    w.svc.release("3")
    for version in ("1", "2", "3"):  # the other vehicle's director metadata, at higher versions than ours
        w.director.assign(OTHER, version)
    w.director.assign(OTHER, "3", "2")
    for path in (w.director.vehicles_dir / OTHER / "metadata").glob("*.json"):
        if not path.name.endswith("root.json"):
            w.director_serves_instead(f"metadata/{path.name}", path.read_bytes())
    return "3"


def attack_mix_image_metadata_signed_by_director(w: World) -> str:
    w.svc.release("3")
    version = w.svc.repo.load_targets().signed.version
    md = Metadata.from_bytes((w.meta / f"{version}.targets.json").read_bytes())
    md.signatures.clear()
    keyid = w.director.top.active_keyids()["targets"][0]
    md.sign(w.director.keys.signer("targets", keyid))  # the director's key where the image's belongs
    w.serve_instead(f"metadata/{version}.targets.json", md.to_bytes(_JSON))
    return "3"


def attack_mix_shadow_assignment_as_active(w: World) -> str:
    w.svc.release("3")
    w.director.assign(VID, "2", "3")  # the director says: run 3 beside 2, never actuating
    w.rigged = True
    return "3"  # … and the vehicle is asked to make it active


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
    ("director key alone: evil image", attack_director_key_evil_image, SignatureError, "disagree"),
    ("director key alone: unreleased image", attack_director_key_unreleased_image, OtaError,
     "not in the signed repository"),
    ("image key alone: evil image", attack_image_key_evil_image, SignatureError, "disagree"),
    ("image key alone: unassigned image", attack_image_key_unassigned_image, OtaError, "does not assign release 4"),
    ("director replay", attack_director_replay, RollbackAttackError, "rollback"),
    ("director freeze", attack_director_freeze, OtaError, "expired"),
    ("mix-and-match: another vehicle's director", attack_mix_other_vehicles_director, SignatureError,
     "another vehicle"),
    ("mix-and-match: image signed by director key", attack_mix_image_metadata_signed_by_director,
     SignatureError, "not signed by a trusted key"),
    ("mix-and-match: shadow assignment as active", attack_mix_shadow_assignment_as_active, OtaError,
     "does not assign release 3 as active"),
]


@pytest.mark.parametrize(("name", "attack", "error", "match"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_rejected_and_vehicle_stays_verified(
    world: World, name: str, attack: Callable[[World], str], error: type[OtaError], match: str
) -> None:
    target = attack(world)
    if not world.rigged:
        world.director.assign(VID, target)  # the honest director asks for the attack's target
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
    world.director.assign(VID, "3")
    assert world.vehicle().update("3")
    u = world.vehicle()
    assert u.state().slot(u.state().running).version == "3"


def test_director_must_assign_before_anything_installs(world: World) -> None:
    """Control for the director: a validly released model that the director does not assign is not
    installed, and once it assigns it (as shadow, then active) the same release goes through."""
    world.svc.release("3")
    with pytest.raises(OtaError, match="does not assign release 3"):
        world.vehicle().update("3")
    world.director.assign(VID, "2", "3")
    u = world.vehicle()
    assert u.assigned(None, None) == ("2", "3")  # the signed assignment, whatever the unsigned offer said
    offer = u.check("3", role="shadow")
    assert offer is not None and u.download_and_install(offer) == "a"  # beside 2 (slot b), no switch
    world.director.assign(VID, "3")
    assert world.vehicle().update("3")


def test_image_key_attack_installs_on_a_vehicle_without_a_director(world: World) -> None:
    """Control for the image-key attacks: the forgery passes every check of the image repository, so
    only the director stops it — a vehicle provisioned without one installs the attacker's model."""
    attack_image_key_evil_image(world)
    factory = world.reg.get("0")
    bare = world.tmp / "bench-vehicle"
    VehicleUpdater.provision(bare, world.svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    u = VehicleUpdater(bare, world.server.url)
    u.boot()
    assert u.update("3")
    assert sha256_file(bare / "slots" / "b" / "model.onnx") == _evil(world)[1]
