"""VehicleUpdater against a real signed repository (local directory and HTTP on 127.0.0.1), and the
resumable fetcher against a server that cuts connections (acceptance 4: 10 cuts re-download <= 5%)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from driveloop.edge.fetcher import ResumableFetcher
from driveloop.edge.updater import VehicleUpdater, sha256_file
from driveloop.ota.release import RepoPolicy
from driveloop.ota.release import ReleaseService

from driveloop.core.exceptions import ConfigError, OtaError, RollbackAttackError
from tests.fakes.tuf_repo import FakeRegistry, RepoServer, ServerBehaviour

NOW_S = float(int(time.time()))  # clients check expiry against the real clock


@pytest.fixture
def world(tmp_path: Path) -> tuple[ReleaseService, FakeRegistry, Path]:
    reg = FakeRegistry(tmp_path / "registry")
    factory = reg.add("0", seed=0)
    for v in ("1", "2", "3"):
        reg.add(v, seed=int(v))
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    vdir = tmp_path / "vehicle"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    return svc, reg, vdir


def _start(vdir: Path, repo: str | Path, **kw: object) -> tuple[VehicleUpdater, Path]:
    """A vehicle process start: new updater, boot."""
    u = VehicleUpdater(vdir, repo, **kw)  # type: ignore[arg-type]
    return u, u.boot()


def test_full_update_commit_cycle(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, reg, vdir = world
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path == vdir / "slots" / "a" / "model.onnx" and u.state().slot("a").version == "0"
    assert u.check("0") is None  # already running it
    svc.release("1")
    offer = u.check("1")
    assert offer is not None and offer.release_seq == 1 and offer.custom["contract"]["inputs"]["lidar"] == [2, 32]
    assert u.download_and_install(offer) == "b"
    assert sha256_file(vdir / "slots" / "b" / "model.onnx") == reg.get("1").manifest.sha256
    assert u.state().slot("b").status == "ready" and u.state().pending is None
    u.switch()
    assert u.state().pending == "b"
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "b" and u.state().trial and u.state().attempts == 1
    assert u.check("1") is None  # pending/running already
    state = u.report_health(True)
    assert state.active == "b" and state.committed_seq == 1 and not state.trial
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "b" and not u.state().trial
    assert not list((vdir / "downloads").glob("*.part"))


def test_failed_health_window_reverts_and_is_not_retried(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    assert u.update("1") is True
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "b"
    state = u.report_health(False, "inference missed 12 deadlines")
    assert state.active == "a" and state.slot("b").status == "failed" and "deadlines" in state.last_event
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "a"
    assert u.check("1") is None  # a version that failed here is not downloaded again
    with pytest.raises(OtaError, match="no model is on trial"):
        u.commit()


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_crash_loop_is_bounded(tmp_path: Path, world: tuple[ReleaseService, FakeRegistry, Path], max_attempts: int) -> None:
    svc, reg, _ = world
    factory = reg.get("0")
    vdir = tmp_path / f"v{max_attempts}"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump(),
                             max_boot_attempts=max_attempts)
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.update("1")
    booted = []
    for _ in range(max_attempts + 3):  # the process dies in every health window (never reports)
        _, path = _start(vdir, svc.repo.repo_dir)
        booted.append(path.parent.name)
    assert booted == ["b"] * max_attempts + ["a"] * 3
    assert VehicleUpdater(vdir, svc.repo.repo_dir).state().slot("b").status == "failed"


def test_corrupt_slot_falls_back_to_verified_model(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.update("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.commit()  # b active, a is the previous verified model
    (vdir / "slots" / "b" / "model.onnx").write_bytes(b"bit rot")
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "a" and u.state().active == "a"
    (vdir / "slots" / "a" / "model.onnx").write_bytes(b"more bit rot")
    with pytest.raises(OtaError, match="no verified model|holds no verified model"):
        _start(vdir, svc.repo.repo_dir)


def test_hardware_class_rollback_and_unknown(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1", hardware_class="cuda")
    svc.release("2", hardware_class="cpu")
    svc.release("3", hardware_class="any")
    u, _ = _start(vdir, svc.repo.repo_dir, hardware_class="cpu")
    with pytest.raises(OtaError, match="hardware class 'cuda'"):
        u.check("1")
    with pytest.raises(OtaError, match="not in the signed repository"):
        u.check("42")
    u.update("3")
    u, _ = _start(vdir, svc.repo.repo_dir, hardware_class="cpu")
    u.commit()
    u, _ = _start(vdir, svc.repo.repo_dir, hardware_class="cpu")
    with pytest.raises(RollbackAttackError, match="not newer"):
        u.check("2")
    with pytest.raises(ConfigError, match="hardware class"):
        VehicleUpdater(vdir, svc.repo.repo_dir, hardware_class="tpu")


@pytest.mark.parametrize("target", ["v1", "01", "../1", "1/../2", "99999999999999999999999", True])
def test_target_that_is_not_a_canonical_version_is_refused_before_any_fetch(
    world: tuple[ReleaseService, FakeRegistry, Path], target: object
) -> None:
    """The director's target becomes a TUF path: "v1" or "01" must not pass for release "1"."""
    svc, _, vdir = world
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    before = u.state()
    with pytest.raises(OtaError, match="not a release: .*model version"):
        u.check(target)  # type: ignore[arg-type]
    assert u.state() == before


def test_director_abort_switches_back_locally(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.update("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    # Rollout aborted while we are on trial: the director names the committed model again.
    assert u.check("0") is None
    assert u.state().pending is None and u.state().slot("b").status == "failed"
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "a"


def test_director_abort_after_commit_switches_to_previous_slot(tmp_path: Path, world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.update("1")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.commit()
    offer = u.check("0")
    assert offer is not None and offer.model_target is None  # no download: slot a still holds it
    assert u.download_and_install(offer) == "a"
    u.switch()
    u, path = _start(vdir, svc.repo.repo_dir)
    assert path.parent.name == "a"
    assert u.commit().active == "a"


def test_update_over_http_with_resume(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, reg, vdir = world
    reg.add("4", seed=4, pad_bytes=200_000)
    info = svc.release("4")
    behaviour = ServerBehaviour(cut_after_bytes=info.length // 6, cuts_left=3)
    with RepoServer(svc.repo.repo_dir, behaviour) as server:
        u, _ = _start(vdir, server.url)
        assert u.update("4")
    assert behaviour.cuts_left == 0 and u.fetcher.resumes == 3  # type: ignore[attr-defined]
    served = sum(n for p, n in behaviour.bytes_served.items() if p.endswith("model.onnx"))
    assert served == info.length
    u, path = _start(vdir, server.url)
    assert sha256_file(path) == info.sha256


# -- the fetcher on its own ----------------------------------------------------------------------
def _target(tmp_path: Path, size: int) -> tuple[bytes, str, Path]:
    data = hashlib.sha256(b"seed").digest() * (size // 32)
    digest = hashlib.sha256(data).hexdigest()
    root = tmp_path / "srv"
    root.mkdir()
    (root / f"{digest}.model.onnx").write_bytes(data)
    return data, f"{digest}.model.onnx", root


def test_ten_interruptions_redownload_at_most_five_percent(tmp_path: Path) -> None:
    data, name, root = _target(tmp_path, 2_000_000)
    behaviour = ServerBehaviour(cut_after_bytes=len(data) // 12, cuts_left=10)
    with RepoServer(root, behaviour) as server:
        fetcher = ResumableFetcher(tmp_path / "dl")
        got = fetcher.download_bytes(f"{server.url}/{name}", len(data))
    assert got == data
    assert behaviour.cuts_left == 0 and fetcher.resumes == 10
    ranged = [r for p, r in behaviour.requests if r]
    assert len(ranged) == 10
    redownloaded = behaviour.bytes_served[name] - len(data)
    assert redownloaded <= 0.05 * len(data), redownloaded


def test_partial_survives_a_restart_and_is_resumed(tmp_path: Path) -> None:
    data, name, root = _target(tmp_path, 300_000)
    behaviour = ServerBehaviour(cut_after_bytes=100_000, cuts_left=1)
    with RepoServer(root, behaviour) as server:
        with pytest.raises(Exception, match="gave up"):
            ResumableFetcher(tmp_path / "dl", max_resumes=0).download_bytes(f"{server.url}/{name}", len(data))
        partial = tmp_path / "dl" / f"{name.split('.')[0]}.part"
        assert partial.stat().st_size == 100_000
        # "Reboot": a new fetcher continues from the partial file.
        got = ResumableFetcher(tmp_path / "dl").download_bytes(f"{server.url}/{name}", len(data))
    assert got == data and not partial.exists()
    assert behaviour.requests[-1][1] == "bytes=100000-"
    assert behaviour.bytes_served[name] == len(data)


def test_bogus_partial_and_endless_data(tmp_path: Path) -> None:
    data, name, root = _target(tmp_path, 50_000)
    dl = tmp_path / "dl"
    dl.mkdir()
    partial = dl / f"{name.split('.')[0]}.part"
    partial.write_bytes(b"x" * 60_000)  # longer than the target: discarded
    behaviour = ServerBehaviour(endless_suffix="never")
    with RepoServer(root, behaviour) as server:
        assert ResumableFetcher(dl).download_bytes(f"{server.url}/{name}", len(data)) == data
        assert behaviour.requests[-1][1] is None
        behaviour.endless_suffix = ".model.onnx"
        from tuf.api.exceptions import DownloadLengthMismatchError

        with pytest.raises(DownloadLengthMismatchError):
            ResumableFetcher(dl).download_bytes(f"{server.url}/{name}", len(data))
    assert not partial.exists()


def test_local_directory_mode(tmp_path: Path) -> None:
    data, name, root = _target(tmp_path, 10_000)
    fetcher = ResumableFetcher(tmp_path / "dl")
    assert fetcher.download_bytes((root / name).as_uri(), len(data)) == data
    from tuf.api.exceptions import DownloadHTTPError

    with pytest.raises(DownloadHTTPError):
        fetcher.download_bytes((root / "missing").as_uri(), 10)


def test_health_window_verdicts_drive_commit_and_revert(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    from driveloop.edge.health_window import HealthWindowPolicy, HealthWindowResult

    svc, _, vdir = world
    svc.release("1")
    svc.release("2")
    policy = HealthWindowPolicy(min_ticks=50, max_deadline_miss_ratio=0.02)
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.update(1)  # the registry's int version works as the director's target
    u = VehicleUpdater(vdir, svc.repo.repo_dir, health_policy=policy)
    u.boot()
    assert u.report_health(HealthWindowResult(True, ticks=20)).trial  # not enough ticks: still open
    assert u.report_health(HealthWindowResult(True, ticks=60, deadline_misses=1)).active == "b"
    u.update("2")
    u = VehicleUpdater(vdir, svc.repo.repo_dir, health_policy=policy)
    u.boot()
    state = u.report_health(HealthWindowResult(True, ticks=60, deadline_misses=2))
    assert state.active == "b" and state.slot("a").status == "failed" and "deadline misses" in state.last_event


@pytest.mark.parametrize(
    ("result", "verdict", "why"),
    [
        ({"model_loaded": False}, False, "failed to load"),
        ({"model_loaded": True, "ticks": 200, "watchdog_trips": 1}, False, "watchdog"),
        ({"model_loaded": True, "ticks": 200, "collisions": 1}, False, "collisions"),
        ({"model_loaded": True, "ticks": 200, "deadline_misses": 3}, False, "deadline"),
        ({"model_loaded": True, "ticks": 200, "deadline_misses": 2}, True, "healthy"),  # exactly the 1% limit
        ({"model_loaded": True, "ticks": 99}, None, "99/100"),
        ({"model_loaded": True, "ticks": 100}, True, "healthy"),
    ],
)
def test_health_policy_table(result: dict, verdict: bool | None, why: str) -> None:
    from driveloop.edge.health_window import HealthWindowPolicy, HealthWindowResult

    got, reason = HealthWindowPolicy().judge(HealthWindowResult(**result))
    assert got is verdict and why in reason
    with pytest.raises(ConfigError):
        HealthWindowResult(True, ticks=1, deadline_misses=2)
    with pytest.raises(ConfigError):
        HealthWindowPolicy(max_deadline_miss_ratio=1.5)


def test_torn_tuf_cache_after_power_cut_still_updates(world: tuple[ReleaseService, FakeRegistry, Path]) -> None:
    svc, _, vdir = world
    svc.release("1")
    svc.rotate_key("root")  # the vehicle caches root v2 on its next check
    u, _ = _start(vdir, svc.repo.repo_dir)
    assert u.update("1")
    cache = vdir / "tuf"
    assert (cache / "root_history" / "2.root.json").is_file()
    # Power cut: python-tuf's root.json link is gone, its newest cached root and timestamp are torn.
    (cache / "root.json").unlink()
    (cache / "root_history" / "2.root.json").write_bytes(b'{"signed": ')
    (cache / "timestamp.json").write_bytes(b"")
    u, _ = _start(vdir, svc.repo.repo_dir)
    u.commit()
    svc.release("2")
    u, _ = _start(vdir, svc.repo.repo_dir)
    assert u.update("2")
    assert Path(cache / "root_history" / "2.root.json").read_bytes().startswith(b"{")
    assert VehicleUpdater(vdir, svc.repo.repo_dir).state().pending == "a"


def test_update_through_the_fleet_server_with_range_resume(tmp_path: Path) -> None:
    """End to end with the real fleet server (``driveloop ota serve`` app): `ota release` writes the
    repository under <ota_dir>/repo, the server exposes it at /tuf, the vehicle resumes a partial."""
    from driveloop.ota.server import ServerConfig, create_app

    from tests.fakes.tuf_repo import serve_asgi

    ota_dir = tmp_path / "ota"
    reg = FakeRegistry(tmp_path / "registry")
    factory = reg.add("0", seed=0)
    reg.add("1", seed=1, pad_bytes=300_000)
    svc = ReleaseService(ota_dir / "repo", ota_dir / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    info = svc.release("1")
    vdir = tmp_path / "vehicle"
    VehicleUpdater.provision(vdir, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump())
    payload = (svc.repo.targets_dir / "models" / "1" / f"{info.sha256}.model.onnx").read_bytes()
    (vdir / "downloads").mkdir()
    (vdir / "downloads" / f"{info.sha256}.part").write_bytes(payload[: len(payload) // 2])  # cut earlier
    app = create_app(ServerConfig(ota_dir=ota_dir, admin_token="a" * 32, background_eval=False))
    statuses: list[tuple[int, str | None]] = []
    client = httpx.Client(event_hooks={"response": [lambda r: statuses.append((r.status_code, r.request.headers.get("range")))]})
    with serve_asgi(app) as url:
        u, _ = _start(vdir, f"{url}/tuf", fetcher=ResumableFetcher(vdir / "downloads", client=client))
        assert u.update("1")
        u, path = _start(vdir, f"{url}/tuf")
    assert (206, f"bytes={len(payload) // 2}-") in statuses  # the server resumed, no re-download
    assert sha256_file(path) == info.sha256 and u.state().trial
    assert not (vdir / "downloads" / f"{info.sha256}.part").exists()
