"""Root offline (fleet trust §2): root keys live only in an offline folder; the server exports its online
public keys, the offline side signs root, the server imports it. Chain checks on import, rotations through
the workflow, a targets threshold of 2, and the `driveloop ota keys` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from driveloop.core.exceptions import OtaError, RollbackAttackError, SignatureError
from driveloop.edge.updater import VehicleUpdater, sha256_file
from driveloop.ota.offline_root import OfflineRoot, export_keys, import_root, open_repository
from driveloop.ota.release import ReleaseService, RepoPolicy
from tests.fakes.tuf_repo import FakeRegistry, RepoServer, ServerBehaviour, tuf_client

NOW_S = float(int(time.time()))  # clients check expiry against the real clock


@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    reg = FakeRegistry(tmp_path / "registry")
    for v in ("0", "1", "2"):
        reg.add(v, seed=int(v))
    return reg


def _root_key_files(where: Path) -> list[Path]:
    return sorted(where.rglob("root-*.json"))


def _workflow(ota: Path, usb: Path, repository: str = "image", **sign: object) -> int:
    """Steps 1-3: export on the server, sign in the offline folder, import on the server."""
    rotate = sign.pop("rotate", ())
    targets_threshold = sign.pop("targets_threshold", None)
    doc = json.loads(json.dumps(export_keys(ota, repository, rotate, targets_threshold)))  # as a file carries it
    data = OfflineRoot(usb).sign(doc, NOW_S, **sign)  # type: ignore[arg-type]
    return import_root(ota, repository, data, NOW_S)


def test_offline_workflow_keeps_root_keys_off_the_server(tmp_path: Path, registry: FakeRegistry) -> None:
    ota, usb = tmp_path / "ota", tmp_path / "usb" / "image"
    assert _workflow(ota, usb, root_threshold=2, targets_threshold=2) == 1
    svc = ReleaseService(ota / "repo", ota / "keys", registry, clock=lambda: NOW_S)
    info = svc.release("1")
    assert _root_key_files(ota) == [] and len(_root_key_files(usb)) == 2  # the server never holds root
    assert not (ota / "keys" / "pending").exists()
    assert {r["role"]: r["threshold"] for r in svc.keys_summary()} == \
        {"root": 2, "targets": 2, "snapshot": 1, "timestamp": 1}
    targets = svc.repo.load_targets()
    assert len(targets.signatures) == 2 and targets.signed.targets[info.path].hashes["sha256"] == info.sha256
    root_v1 = svc.trusted_root()

    # Rotations through the same workflow: an online role, then root itself (old and new root keys sign).
    old_timestamp = svc.repo.active_keyids()["timestamp"]
    assert _workflow(ota, usb, rotate=["timestamp"]) == 2
    assert not set(old_timestamp) & set(svc.repo.active_keyids()["timestamp"])
    assert not list((ota / "keys").glob(f"timestamp-{old_timestamp[0]}.json")), "revoked keys are destroyed"
    old_root = [p.name for p in _root_key_files(usb)]
    assert _workflow(ota, usb, rotate_root=True) == 3
    v3 = Metadata.from_bytes((ota / "repo" / "metadata" / "3.root.json").read_bytes())
    assert len(v3.signatures) == 4  # 2 old + 2 new root keys
    assert not set(old_root) & {p.name for p in _root_key_files(usb)} and len(_root_key_files(usb)) == 2
    assert _root_key_files(ota) == []
    client = tuf_client(svc.repo.repo_dir, tmp_path / "client", root_v1)  # a vehicle that trusts root v1
    client.refresh()
    t = client.get_targetinfo(info.path)
    assert t is not None and t.hashes["sha256"] == info.sha256

    # The one-step rotation needs the root keys at hand: here they are offline.
    with pytest.raises(OtaError, match="root keys are not in"):
        svc.rotate_key("snapshot")


def _server_at_v1(tmp_path: Path) -> tuple[Path, Path]:
    ota, usb = tmp_path / "ota", tmp_path / "usb"
    _workflow(ota, usb)
    return ota, usb


def _foreign_root(tmp_path: Path, ota: Path) -> bytes:
    """Root v2 for this server's online keys, but signed by another offline folder's root key."""
    other = OfflineRoot(tmp_path / "other-usb")
    other.sign({**export_keys(ota, "image"), "root_version": 0}, NOW_S)
    return other.sign({**export_keys(ota, "image"), "root_version": 1}, NOW_S)


def _keys_of_another_server(tmp_path: Path, ota: Path, usb: Path) -> bytes:
    _workflow(tmp_path / "ota2", tmp_path / "usb2")
    doc = export_keys(tmp_path / "ota2", "image", ["targets"])
    return OfflineRoot(usb).sign({**doc, "root_version": 1}, NOW_S)


@pytest.mark.parametrize(("case", "make", "error", "match"), [
    ("signed by another root", _foreign_root, SignatureError, "not signed by the threshold of the current root"),
    ("replayed old root", lambda tmp, ota: (_workflow(ota, tmp / "usb", rotate=["snapshot"]),
                                            (ota / "repo" / "metadata" / "1.root.json").read_bytes())[1],
     RollbackAttackError, "not newer"),
    ("a version skipped", lambda tmp, ota: (OfflineRoot(tmp / "usb").sign(export_keys(ota, "image"), NOW_S),
                                             OfflineRoot(tmp / "usb").sign(export_keys(ota, "image") | {"root_version": 2},
                                                                           NOW_S))[1],
     OtaError, "import v2 first"),
    ("expired", lambda tmp, ota: OfflineRoot(tmp / "usb").sign(export_keys(ota, "image"), NOW_S - 400 * 86400.0),
     OtaError, "expired"),
    ("not a root", lambda tmp, ota: (ota / "repo" / "metadata" / "timestamp.json").read_bytes(), OtaError,
     "expected root"),
])
def test_import_refuses_what_breaks_the_chain(tmp_path: Path, case: str, make, error, match) -> None:
    ota, _ = _server_at_v1(tmp_path)
    repo = open_repository(ota, "image")
    data = make(tmp_path, ota)
    before = sorted(p.name for p in repo.metadata_dir.iterdir()), (repo.metadata_dir / "timestamp.json").read_bytes()
    with pytest.raises(error, match=match):
        import_root(ota, "image", data, NOW_S)
    assert (sorted(p.name for p in repo.metadata_dir.iterdir()), (repo.metadata_dir / "timestamp.json").read_bytes()) \
        == before
    current = repo.root_version()
    assert import_root(ota, "image", (repo.metadata_dir / f"{current}.root.json").read_bytes(), NOW_S) == current


def test_import_refuses_keys_the_server_does_not_hold(tmp_path: Path) -> None:
    ota, usb = _server_at_v1(tmp_path)
    with pytest.raises(OtaError, match="private keys are not in"):
        import_root(ota, "image", _keys_of_another_server(tmp_path, ota, usb), NOW_S)


def test_sign_refuses_a_folder_out_of_step_with_the_repository(tmp_path: Path) -> None:
    ota, _ = _server_at_v1(tmp_path)
    with pytest.raises(OtaError, match="last signed v0"):
        OfflineRoot(tmp_path / "fresh-usb").sign(export_keys(ota, "image"), NOW_S)
    with pytest.raises(OtaError, match="not an online-keys export"):
        OfflineRoot(tmp_path / "usb").sign({"roles": {}}, NOW_S)
    doc = export_keys(ota, "image")
    doc["roles"]["targets"]["threshold"] = 2  # more than its one key
    with pytest.raises(OtaError, match="malformed online-keys export: targets threshold 2 with 1 keys"):
        OfflineRoot(tmp_path / "usb").sign(doc, NOW_S)
    assert len(_root_key_files(tmp_path / "usb")) == 1  # refused before any key was made


def test_interrupted_export_reuses_its_pending_keys(tmp_path: Path) -> None:
    ota, _ = _server_at_v1(tmp_path)
    first = export_keys(ota, "image", ["snapshot"])
    again = export_keys(ota, "image", ["snapshot"])
    assert first == again and first["roles"]["snapshot"]["keys"][0]["keyid"] not in \
        open_repository(ota, "image").active_keyids()["snapshot"]


# -- targets threshold 2 ---------------------------------------------------------------------------------
def test_targets_threshold_two_needs_both_signatures(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", registry, RepoPolicy(targets_threshold=2),
                         clock=lambda: NOW_S)
    factory = registry.get("0")
    vdir = tmp_path / "vehicle"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    svc.release("1")
    targets_ids = svc.repo.active_keyids()["targets"]
    assert len(targets_ids) == 2 and len(svc.repo.load_targets().signatures) == 2
    version = svc.repo.load_targets().signed.version
    md = Metadata.from_bytes((svc.repo.metadata_dir / f"{version}.targets.json").read_bytes())
    del md.signatures[targets_ids[1]]  # one valid signature of two
    behaviour = ServerBehaviour(overrides={f"metadata/{version}.targets.json": md.to_bytes(JSONSerializer())})
    with RepoServer(svc.repo.repo_dir, behaviour) as server:
        u = VehicleUpdater(vdir, server.url)
        u.boot()
        with pytest.raises(SignatureError, match="not signed by a trusted key"):
            u.update("1")
        behaviour.overrides.clear()
        assert u.update("1")
    assert sha256_file(vdir / "slots" / "b" / "model.onnx") == registry.get("1").manifest.sha256
    # The server refuses to publish what vehicles would reject: one targets key missing, no release.
    (tmp_path / "keys" / f"targets-{targets_ids[1]}.json").unlink()
    ts = (svc.repo.metadata_dir / "timestamp.json").read_bytes()
    with pytest.raises(OtaError, match="targets needs 2 signatures but only 1"):
        svc.release("2")
    assert (svc.repo.metadata_dir / "timestamp.json").read_bytes() == ts


# -- the CLI ------------------------------------------------------------------------------------------------
def test_cli_offline_root_workflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cli import main
    from driveloop.cloud.registry import Registry
    from tests.fakes.tuf_repo import tiny_policy_onnx

    home, usb = tmp_path / "home", tmp_path / "usb"
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    assert main(["ota", "keys", "show"]) == 9 and "no root yet" in capsys.readouterr().err
    for repo, flags in (("image", ["--targets-threshold", "2"]), ("director", [])):
        keys, signed = tmp_path / f"{repo}-keys.json", tmp_path / f"{repo}-root.json"
        assert main(["ota", "keys", "export", "--repo", repo, "--out", str(keys), *flags]) == 0
        assert main(["ota", "keys", "sign-root", str(keys), "--offline-root", str(usb / repo), "--out", str(signed),
                     "--root-threshold", "2"]) == 0
        assert main(["ota", "keys", "import-root", str(signed), "--repo", repo]) == 0
        assert f"imported root v1 into the {repo} repository" in capsys.readouterr().out
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(tiny_policy_onnx(7))
    with Registry(home / "registry") as reg:
        reg.register(onnx_path)
        reg.set_stage(1, "validated", "gate")
    assert main(["ota", "release", "1", "--json"]) == 0
    capsys.readouterr()
    for repo, thresholds in (("image", {"root": 2, "targets": 2}), ("director", {"root": 2, "targets": 1})):
        assert main(["ota", "keys", "show", "--repo", repo, "--json"]) == 0
        rows = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
        assert {k: rows[k]["threshold"] for k in thresholds} == thresholds and rows["root"]["root_version"] == 1
    assert _root_key_files(home) == [] and len(_root_key_files(usb)) == 4

    # A rotation by the workflow; the one-step `keys rotate` cannot, the root keys being offline.
    keys, signed = tmp_path / "rotate.json", tmp_path / "root-v2.json"
    assert main(["ota", "keys", "export", "--rotate", "timestamp", "--out", str(keys)]) == 0
    assert main(["ota", "keys", "sign-root", str(keys), "--offline-root", str(usb / "image"), "--out", str(signed)]) == 0
    assert main(["ota", "keys", "import-root", str(signed)]) == 0
    assert main(["ota", "keys", "import-root", str(tmp_path / "image-root.json")]) == 9  # replayed v1
    assert "not newer" in capsys.readouterr().err
    assert main(["ota", "keys", "rotate", "targets"]) == 9
    assert "root keys are not in" in capsys.readouterr().err
    assert main(["ota", "keys", "rotate", "targets", "--offline-root", str(usb / "image")]) == 0
    assert "rotated image targets" in capsys.readouterr().out
    assert main(["ota", "keys", "show", "--json"]) == 0
    rows = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["root"]["root_version"] == 3 and rows["targets"]["threshold"] == 2
    assert main(["ota", "keys", "show", "--repo", "nope"]) == 2
    assert main(["ota", "keys", "sign-root", str(tmp_path / "missing.json"), "--offline-root", str(usb),
                 "--out", str(signed)]) == 2
