"""ReleaseService: TUF repository layout, signed releases, idempotence, refusals, key rotation, and
crash safety (a crash at every file write of a release/rotation leaves a repository clients accept)."""

from __future__ import annotations

import json
import shutil
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import driveloop.ota._tuf_repo as tuf_repo_mod
import driveloop.ota.keys as keys_mod
import driveloop.ota.offline_root as offline_root_mod
import driveloop.ota.release as release_mod
import pytest
from driveloop.ota.release import RepoPolicy
from driveloop.ota.release import ReleaseService
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from driveloop.core.exceptions import ConfigError, IntegrityError, OtaError
from tests.fakes.tuf_repo import FakeRegistry, tiny_policy_onnx, tuf_client

NOW_S = float(int(time.time()))  # clients check expiry against the real clock

def _service(tmp_path: Path, registry: object, **policy: int) -> ReleaseService:
    return ReleaseService(tmp_path / "repo", tmp_path / "keys", registry, RepoPolicy(**policy), clock=lambda: NOW_S)

@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    reg = FakeRegistry(tmp_path / "registry")
    reg.add("1", seed=1)
    reg.add("2", seed=2)
    reg.add("3", seed=3, stage="candidate")
    return reg

def _client_targets(svc: ReleaseService, cache: Path, root: bytes) -> Updater:
    client = tuf_client(svc.repo.repo_dir, cache, root)
    client.refresh()
    return client


def test_init_layout_keys_and_threshold(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = _service(tmp_path, registry, root_threshold=2)
    assert {r["role"]: r["threshold"] for r in svc.keys_summary()} == {"root": 2, "targets": 1, "snapshot": 1, "timestamp": 1}
    meta = tmp_path / "repo" / "metadata"
    for name in ("1.root.json", "root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"):
        assert (meta / name).is_file(), name
    root = Metadata.from_bytes((meta / "1.root.json").read_bytes()).signed
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 2
    assert len(Metadata.from_bytes((meta / "1.root.json").read_bytes()).signatures) == 2
    keys = list((tmp_path / "keys").iterdir())
    assert sorted(k.name.split("-")[0] for k in keys) == ["snapshot", "targets", "timestamp"]  # online only
    root_keys = list((tmp_path / "offline-root" / "image" / "keys").iterdir())
    assert len(root_keys) == 2 and all(k.name.startswith("root-") for k in root_keys)  # the offline folder
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys + root_keys)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    # A second service on the same directory keeps the repository (idempotent init).
    before = (meta / "timestamp.json").read_bytes()
    _service(tmp_path, registry, root_threshold=2)
    assert (meta / "timestamp.json").read_bytes() == before

def test_policy_validation() -> None:
    with pytest.raises(ConfigError, match="root_threshold"):
        RepoPolicy(root_threshold=0)
    with pytest.raises(ConfigError, match="timestamp_expiry_s"):
        RepoPolicy(timestamp_expiry_s=0)

def test_release_publishes_signed_target_with_custom_fields(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = _service(tmp_path, registry)
    info = svc.release("1", hardware_class="cpu")
    art = registry.get("1")
    assert art.stage == "released" and registry.stage_log[-1][:2] == ("1", "released")
    assert info.sha256 == art.manifest.sha256 and info.length == art.onnx_path.stat().st_size
    assert info.targets_version == 2 and info.release_seq == 1
    assert info.custom["hardware_class"] == "cpu" and info.custom["name"] == "policy"
    assert info.custom["contract"]["inputs"]["kinematics"] == [36]
    payload = tmp_path / "repo" / "targets" / "models" / "1" / f"{info.sha256}.model.onnx"
    assert payload.read_bytes() == art.onnx_path.read_bytes()

    client = _client_targets(svc, tmp_path / "client", svc.trusted_root())
    t = client.get_targetinfo("models/1/model.onnx")
    assert t is not None and t.hashes["sha256"] == info.sha256
    assert t.unrecognized_fields["custom"]["model_version"] == "1"
    m = client.get_targetinfo("models/1/manifest.json")
    path = client.download_target(m, str(tmp_path / "manifest.json"))
    assert json.loads(Path(path).read_bytes())["sha256"] == info.sha256

    second = svc.release("2")
    assert second.release_seq == 2 and second.targets_version == 3
    assert [r.model_version for r in svc.releases()] == ["1", "2"]

def test_release_is_idempotent(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = _service(tmp_path, registry)
    first = svc.release("1", hardware_class="cuda")
    ts = (tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes()
    again = svc.release("1", hardware_class="cuda")
    assert again == first
    assert (tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes() == ts
    with pytest.raises(OtaError, match="immutable"):
        svc.release("1", hardware_class="cpu")

@pytest.mark.parametrize(
    ("case", "setup", "error", "match"),
    [
        ("candidate", lambda reg: "3", OtaError, "only a validated model"),
        ("sha mismatch", lambda reg: (reg.get("1").onnx_path.write_bytes(tiny_policy_onnx(99)), "1")[1], IntegrityError, "does not match"),
        ("unknown version", lambda reg: "42", Exception, "unknown model version"),
    ],
)
def test_release_refusals_leave_repo_unchanged(tmp_path: Path, registry: FakeRegistry, case: str, setup, error, match) -> None:
    svc = _service(tmp_path, registry)
    version = setup(registry)
    ts = (tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(error, match=match):
        svc.release(version)
    assert (tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes() == ts
    assert all(stage != "released" for _, stage, _ in registry.stage_log)

def test_bad_hardware_class(tmp_path: Path, registry: FakeRegistry) -> None:
    with pytest.raises(ConfigError, match="hardware class"):
        _service(tmp_path, registry).release("1", hardware_class="tpu")

@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_rotate_key_revokes_old_and_clients_follow_the_chain(tmp_path: Path, registry: FakeRegistry, role: str) -> None:
    svc = _service(tmp_path, registry)
    svc.release("1")
    old_root = svc.trusted_root()
    old_ids = {k["role"]: k["keyids"] for k in svc.keys_summary()}[role]
    new_ids = svc.rotate_key(role)
    summary = {k["role"]: k for k in svc.keys_summary()}
    assert summary[role]["keyids"] == new_ids and not set(new_ids) & set(old_ids)
    assert summary["root"]["root_version"] == 2
    stored = {p.name.split("-", 1)[1][:-5] for d in ("keys", "offline-root") for p in (tmp_path / d).rglob("*-*.json")}
    assert set(new_ids) <= stored and not set(old_ids) & stored, "revoked private keys must be destroyed"
    # A vehicle that only trusts root v1 updates through the chain and still sees the release.
    client = _client_targets(svc, tmp_path / "client", old_root)
    assert client.get_targetinfo("models/1/model.onnx") is not None
    if role == "root":
        md = Metadata.from_bytes((tmp_path / "repo" / "metadata" / "2.root.json").read_bytes())
        assert set(md.signatures) == set(old_ids) | set(new_ids)
    with pytest.raises(ConfigError, match="unknown TUF role"):
        svc.rotate_key("mirror")

def test_refresh_timestamp_sets_expiry(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = _service(tmp_path, registry)
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    v = svc.refresh_timestamp(expires)
    ts = svc.repo.load_timestamp().signed
    assert ts.version == v == 2 and ts.expires == expires
    default = svc.refresh_timestamp()
    assert svc.repo.load_timestamp().signed.expires == datetime.fromtimestamp(NOW_S, UTC) + timedelta(days=1)
    assert default == 3

class _Crash(Exception):
    pass

def _crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make the nth repository write raise (0-based), as a power cut would."""
    real = tuf_repo_mod.write_atomic
    calls = [0]
    modules = (tuf_repo_mod, release_mod, keys_mod, offline_root_mod)

    def flaky(path: Path, data: bytes, mode: int = 0o644) -> None:
        calls[0] += 1
        if calls[0] - 1 == n:
            raise _Crash(f"power cut before writing {path.name}")
        real(path, data, mode)

    for mod in modules:
        monkeypatch.setattr(mod, "write_atomic", flaky)
    return calls

@pytest.mark.parametrize("operation", ["release", "rotate-root", "rotate-timestamp"])
def test_crash_at_every_write_leaves_a_consistent_repo(tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    base = _service(tmp_path / "base", registry)
    base.release("1")
    root_v1 = base.trusted_root()
    n = 0
    while True:
        work = tmp_path / f"run{n}"

        shutil.copytree(tmp_path / "base", work)
        svc = _service(work, registry)
        with monkeypatch.context() as m:
            calls = _crash_at(m, n)
            crashed = True
            try:
                if operation == "release":
                    svc.release("2")
                else:
                    svc.rotate_key(operation.split("-")[1])
                crashed = False
            except _Crash:
                pass
        # Restart: the service recovers, a client trusting root v1 accepts the repository, and the
        # interrupted operation can simply be retried.
        svc = _service(work, registry)
        client = _client_targets(svc, work / "client", root_v1)
        assert client.get_targetinfo("models/1/model.onnx") is not None
        if operation == "release":
            registry.get("2").stage = "validated"
            assert svc.release("2").model_version == "2"
            client = _client_targets(svc, work / "client2", root_v1)
            assert client.get_targetinfo("models/2/model.onnx") is not None
        if not crashed:
            assert calls[0] == n  # every write point was exercised
            break
        n += 1
    assert n >= 4

def test_real_registry_release(tmp_path: Path) -> None:
    from driveloop.cloud.registry import Registry

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(tiny_policy_onnx(5))
    with Registry(tmp_path / "registry") as reg:
        manifest = reg.register(onnx_path)
        svc = _service(tmp_path, reg)
        with pytest.raises(OtaError, match="candidate"):
            svc.release(manifest.version)
        reg.set_stage(manifest.version, "validated", "eval gate passed")
        info = svc.release(f"v{manifest.version}", hardware_class="any")
        assert info.model_version == str(manifest.version) and info.sha256 == manifest.sha256
        assert reg.get(manifest.version).stage == "released"
        assert svc.release(manifest.version) == info  # released models re-release idempotently


def test_cli_release_keys_show_and_rotate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cloud.registry import Registry

    from driveloop.cli import main

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(tiny_policy_onnx(6))
    with Registry(tmp_path / "home" / "registry") as reg:
        reg.register(onnx_path)
    assert main(["ota", "release", "1"]) == 9
    assert "only a validated model" in capsys.readouterr().err
    with Registry(tmp_path / "home" / "registry") as reg:
        reg.set_stage(1, "validated", "gate")
    assert main(["ota", "release", "v1", "--hardware-class", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_version"] == "1" and out["hardware_class"] == "cpu" and out["release_seq"] == 1
    assert main(["ota", "release", "1", "--hardware-class", "tpu"]) == 2
    assert main(["ota", "keys", "show", "--json"]) == 0
    before = {r["role"]: r["keyids"] for r in json.loads(capsys.readouterr().out)}
    assert main(["ota", "keys", "rotate", "snapshot"]) == 0
    capsys.readouterr()
    assert main(["ota", "keys", "show", "--json"]) == 0
    after = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
    assert after["snapshot"]["keyids"] != before["snapshot"] and after["root"]["root_version"] == 2
    assert main(["ota", "keys", "rotate", "mirror"]) == 2
    capsys.readouterr()
    assert main(["ota", "refresh-timestamp", "--expires-in-s", "3600"]) == 0
    assert "timestamp v" in capsys.readouterr().out
    assert main(["ota", "refresh-timestamp", "--expires-in-s", "0"]) == 2


def test_key_readable_by_others_is_refused(tmp_path: Path, registry: FakeRegistry) -> None:
    svc = _service(tmp_path, registry)
    key = next((tmp_path / "keys").glob("targets-*.json"))
    key.chmod(0o644)
    with pytest.raises(OtaError, match="readable by others"):
        svc.release("1")
    key.chmod(0o600)
    assert svc.release("1").release_seq == 1
