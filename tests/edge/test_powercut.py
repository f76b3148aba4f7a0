"""Power-cut fuzz (issue 7, acceptance 3): 1,000 random crash points across download, install, switch,
boot, health window and commit. After each cut the vehicle re-boots until it settles: it must always
start a model whose bytes match a signed release, and a pending model never boots more than
``max_boot_attempts`` times (no boot loop). The vehicles trust a director (Uptane) as in the fleet, so
its python-tuf cache is torn by the cuts too. Plus property tests of the pure slot state machine."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from driveloop.edge import _slots
from driveloop.core.atomic import FileOps
from driveloop.edge.updater import VehicleUpdater, sha256_file
from driveloop.ota.director_repo import DirectorRepo
from driveloop.ota.release import RepoPolicy
from driveloop.ota.release import ReleaseService
from hypothesis import given, settings
from hypothesis import strategies as st

from driveloop.core.exceptions import OtaError
from tests.fakes.tuf_repo import FakeRegistry

NOW_S = float(int(time.time()))  # clients check expiry against the real clock
CRASH_POINTS = 1000
MAX_BOOT_ATTEMPTS = 2
HEALTH = ("ok", "fail", "crash")  # how a health window ends; "crash": the process dies inside it


class PowerCut(BaseException):
    """Raised by the hook; BaseException so no handler in the code under test can swallow it."""


class CutAt:
    """FileOps hook: cut the power at the ``n``th durable step, modelling what a real cut loses."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.rng = rng
        self.count = 0
        self._before_replace: dict[Path, bytes | None] = {}

    def __call__(self, step: str, path: Path) -> None:
        if step == "replace":  # remember the old bytes: an un-synced rename may be lost
            self._before_replace[path.parent] = path.read_bytes() if path.exists() else None
            self._last = path
        self.count += 1
        if self.count - 1 != self.n:
            return
        if step == "fsync" and path.exists():  # unsynced data: the temp file is torn
            data = path.read_bytes()
            path.write_bytes(data[: self.rng.randrange(len(data) + 1)])
        if step == "fsync_dir" and self.rng.random() < 0.5:  # the rename did not reach the disk
            old = self._before_replace.get(path)
            if old is None:
                self._last.unlink()
            else:
                self._last.write_bytes(old)
        raise PowerCut(f"{step} {path.name}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    # The fuzz renames thousands of small files: on tmpfs that is ~50x faster than on this disk.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        tmp = Path(tempfile.mkdtemp(prefix="driveloop-powercut-", dir=shm))
    else:
        tmp = tmp_path_factory.mktemp("powercut")
    try:
        yield _build(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(tmp: Path) -> dict:
    reg = FakeRegistry(tmp / "registry")
    factory = reg.add("0", seed=0)
    reg.add("1", seed=1)
    reg.add("2", seed=2)
    svc = ReleaseService(tmp / "repo", tmp / "keys", reg, RepoPolicy(), clock=lambda: NOW_S)
    svc.release("1")
    svc.release("2")
    director = DirectorRepo(tmp / "director", tmp / "director-keys", tmp / "repo", clock=lambda: NOW_S)
    director.bootstrap()
    templates, directors = {}, {}
    for target, name in (("1", "fresh"), ("2", "on-one")):
        templates[target] = tmp / name
        directors[target] = director.vehicles_dir / name
        VehicleUpdater.provision(tmp / name, svc.trusted_root(), factory.onnx_path, factory.manifest.model_dump(),
                                 max_boot_attempts=MAX_BOOT_ATTEMPTS, director_root=director.trusted_root(),
                                 vehicle_id=name)
    on_one = templates["2"]  # committed on 1, factory in the other slot -> updating to 2 overwrites it
    director.assign("on-one", "1")
    u = VehicleUpdater(on_one, svc.repo.repo_dir, file_ops=FileOps(durable=False), director=directors["2"])
    u.boot()
    u.update("1")
    u = VehicleUpdater(on_one, svc.repo.repo_dir, file_ops=FileOps(durable=False))
    u.boot()
    u.commit()
    director.assign("fresh", "1")  # factory model only -> updating to 1
    director.assign("on-one", "2")
    shas = {reg.get(v).manifest.sha256: v for v in ("0", "1", "2")}
    return {"tmp": tmp, "repo": svc.repo.repo_dir, "templates": templates, "directors": directors, "shas": shas}


def _flow(vdir: Path, repo: Path, target: str, ops: FileOps, health: str, director: Path) -> None:
    """One update as the vehicle does it, across two process starts."""
    u = VehicleUpdater(vdir, repo, file_ops=ops, director=director)
    u.boot()
    if u.update(target):
        u = VehicleUpdater(vdir, repo, file_ops=ops)
        u.boot()
        if health == "ok":
            u.report_health(True)
        elif health == "fail":
            u.report_health(False, "watchdog tripped")
        # "crash": the process dies inside the health window and never reports


def _tear_unsynced(vdir: Path, rng: random.Random) -> None:
    """python-tuf's metadata cache and the download dir are written without fsync: a cut may tear
    any of them (the provisioned trust anchor and FileOps-written files are durable)."""
    if rng.random() < 0.5:
        return
    files = [p for d in ("tuf", "director", "downloads") for p in sorted((vdir / d).rglob("*"))
             if p.is_file() and not p.is_symlink()]
    if files:
        victim = rng.choice(files)
        data = victim.read_bytes()
        victim.write_bytes(data[: rng.randrange(len(data) + 1)])


def _count_steps(setup: dict, target: str, health: str) -> int:
    work = setup["tmp"] / f"count{target}{health}"
    shutil.copytree(setup["templates"][target], work)
    hook = CutAt(-1, random.Random(0))
    _flow(work, setup["repo"], target, FileOps(hook, durable=False), health, setup["directors"][target])
    shutil.rmtree(work)
    return hook.count


def test_power_cut_fuzz(setup: dict) -> None:
    steps = {(t, h): _count_steps(setup, t, h) for t in ("1", "2") for h in HEALTH}
    assert min(steps.values()) >= 10  # boots, install, switch, commit all write state
    rng = random.Random(20261126)
    work = setup["tmp"] / "work"
    outcomes: dict[str, int] = {}
    for i in range(CRASH_POINTS):
        target, health = rng.choice(("1", "2")), rng.choice(HEALTH)
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(setup["templates"][target], work)
        cut = CutAt(rng.randrange(steps[target, health]), rng)
        try:
            _flow(work, setup["repo"], target, FileOps(cut, durable=False), health, setup["directors"][target])
        except PowerCut:
            _tear_unsynced(work, rng)
        else:
            pytest.fail(f"iteration {i}: the power cut at step {cut.n} never happened")
        # Re-boot until the vehicle settles; each boot's health window ends randomly.
        trial_boots = 0
        for boot in range(MAX_BOOT_ATTEMPTS + 2):
            u = VehicleUpdater(work, setup["repo"], file_ops=FileOps(durable=False))
            path = u.boot()
            state = u.state()
            digest = sha256_file(path)
            assert digest in setup["shas"], f"iteration {i}: booted unverified bytes"
            assert digest == state.slot(state.running).sha256
            if not state.trial:
                break
            trial_boots += 1  # noqa: SIM113 (counts trial boots only)
            assert trial_boots <= MAX_BOOT_ATTEMPTS, f"iteration {i}: boot loop"
            fate = rng.choice(HEALTH)
            if fate != "crash":
                u.report_health(fate == "ok")
        else:
            pytest.fail(f"iteration {i}: did not settle after {MAX_BOOT_ATTEMPTS + 2} boots")
        if i % 4:
            continue
        # The interrupted update can always be finished afterwards (unless this vehicle rejected it).
        _flow(work, setup["repo"], target, FileOps(durable=False), "ok", setup["directors"][target])
        u = VehicleUpdater(work, setup["repo"], file_ops=FileOps(durable=False))
        final = setup["shas"][sha256_file(u.boot())]
        failed = any(u.state().slot(s).status == "failed" and u.state().slot(s).version == target for s in "ab")
        assert final == target or failed, f"iteration {i}: stuck on {final}"
        key = f"{final}{'-rejected' if failed else ''}"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert sum(outcomes.values()) == CRASH_POINTS // 4
    assert outcomes.get("1", 0) and outcomes.get("2", 0)  # both updates do complete after cuts


# -- the pure state machine ----------------------------------------------------------------------
EVENTS = ("install", "finish", "switch", "boot", "commit", "revert", "corrupt_a", "corrupt_b")


def _apply(s: _slots.BootState, event: str, n: int) -> _slots.BootState:
    if event == "install":
        return _slots.begin_install(s, f"v{n}", hashlib.sha256(str(n).encode()).hexdigest(), n)[0]
    if event == "finish":
        slot = s.slot(s.inactive)
        return _slots.finish_install(s, s.inactive, slot.version or "", slot.sha256 or "")
    if event == "switch":
        return _slots.request_switch(s)
    if event == "boot":
        return _slots.on_boot(s)[0]
    if event == "commit":
        return _slots.commit(s)
    if event == "revert":
        return _slots.revert(s, "test")
    return _slots.mark_corrupt(s, event[-1])  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.lists(st.sampled_from(EVENTS), max_size=40))
def test_state_machine_invariants(max_attempts: int, events: list[str]) -> None:
    s = _slots.initial("v0", hashlib.sha256(b"0").hexdigest(), 0, max_attempts)
    trial_boots = 0
    for n, event in enumerate(events, start=1):
        try:
            new = _apply(s, event, n)
        except OtaError:
            continue  # illegal in this state: refused, state unchanged
        assert new.slot(new.active).status == "ready"
        assert new.pending != new.active
        assert new.committed_seq >= s.committed_seq  # the rollback floor never drops
        assert _slots.BootState.from_dict(new.to_dict()) == new  # persists losslessly
        if event == "boot":
            trial_boots = trial_boots + 1 if new.trial else 0
            assert trial_boots <= max_attempts
        elif event in ("switch", "install", "commit", "revert") or not new.trial:
            trial_boots = 0
        s = new


def test_illegal_transitions_have_clear_errors() -> None:
    s = _slots.initial("v0", "0" * 64)
    with pytest.raises(OtaError, match="nothing to switch to"):
        _slots.request_switch(s)
    with pytest.raises(OtaError, match="nothing to commit"):
        _slots.commit(s)
    with pytest.raises(OtaError, match="nothing to revert"):
        _slots.revert(s, "x")
    with pytest.raises(OtaError, match="holds no verified model"):
        _slots.mark_corrupt(s, "a")
    with pytest.raises(OtaError, match="malformed"):
        _slots.BootState.from_dict({"a": {}})
