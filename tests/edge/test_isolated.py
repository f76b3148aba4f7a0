"""IsolatedRuntime with a real child process (kill, hang, nan, garbage, late); FaultyRunner: test_faults.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from driveloop.cloud.export import PARITY_TOL, export_onnx
from driveloop.contracts.manifest import build_manifest
from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
from driveloop.contracts import observation as C
from driveloop.edge.faults import GARBAGE_VALUE
from driveloop.edge.isolated import IsolatedRuntime, IsolationConfig
from driveloop.edge.runtime import ModelRunner, ModelRuntime
from driveloop.core.exceptions import ConfigError, IntegrityError, ModelError

_LONG_S = 30.0  # a deadline that only a dead or faulty child misses
_SHORT_S = 0.05  # a deadline a late/hung child is sure to miss (it sleeps much longer)
CFG = IsolationConfig(restart_backoff_min_s=0.2, hang_timeout_s=5.0, late_delay_s=0.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = export_onnx(PolicyNet(PolicyConfig(seed=8)), tmp_path_factory.mktemp("iso") / "model.onnx")
    return path, build_manifest(path, name="policy", version=3)


@pytest.fixture(scope="module")
def iso(model: tuple[Path, object]) -> IsolatedRuntime:
    path, manifest = model
    with IsolatedRuntime(path, manifest, config=CFG) as rt:
        assert rt.wait_ready()
        yield rt


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(C.INPUT_NAMES, example_inputs(n, seed=seed))}


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: an orphan's reaper may be slow or absent in containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _tick(rt: IsolatedRuntime, batch: dict[str, np.ndarray], budget_s: float = _LONG_S):
    now = time.monotonic()
    submitted = rt.submit(batch, now)
    return submitted, rt.poll(now + budget_s)


def test_child_process_serves_the_same_outputs_as_in_process(iso: IsolatedRuntime, model: tuple[Path, object]) -> None:
    path, manifest = model
    local = ModelRuntime(path, manifest)
    assert isinstance(iso, ModelRunner) and iso.provider == "isolated:CPUExecutionProvider"
    assert iso.alive and iso.pid not in (None, os.getpid())
    for n in (1, 64, 3):
        batch = _batch(n, seed=n)
        submitted, reply = _tick(iso, batch)
        assert submitted and reply is not None and reply.well_formed(n) and reply.latency_s > 0
        action, conf = local.run(batch)
        np.testing.assert_allclose(reply.action, action, atol=PARITY_TOL)
        np.testing.assert_allclose(reply.confidence, conf, atol=PARITY_TOL)
    action, conf = iso.run(_batch(2))
    assert action.shape == (2, 2) and conf.shape == (2, 1)


def test_sigkill_mid_run_is_survived_and_restarted(iso: IsolatedRuntime) -> None:
    batch = _batch(4)
    old_pid, restarts = iso.pid, iso.restarts
    iso.inject("late")  # keeps the next request in the child for late_delay_s…
    now = time.monotonic()
    assert iso.submit(batch, now)
    iso.inject("kill")  # …so it is surely in flight when the process dies
    assert iso.poll(now + _LONG_S) is None  # the next tick learns it: EOF, not a timeout
    assert not iso.alive and iso.state == "waiting"
    with pytest.raises(OSError):
        os.kill(old_pid, 0)  # reaped: no zombie left behind
    assert not iso.submit(batch, now)  # inside the backoff: refused without blocking
    assert iso.submit(batch, now + 10.0) is False and iso.state == "starting"  # backoff over: respawned
    assert iso.wait_ready() and iso.restarts == restarts + 1 and iso.pid != old_pid
    submitted, reply = _tick(iso, batch)
    assert submitted and reply is not None and reply.well_formed(4)


def test_hang_misses_deadlines_then_is_killed_and_restarted(iso: IsolatedRuntime) -> None:
    batch = _batch(2)
    iso.inject("hang")
    old_pid = iso.pid
    now = time.monotonic()
    assert iso.submit(batch, now)
    assert iso.poll(time.monotonic() + _SHORT_S) is None  # deadline miss
    assert not iso.submit(batch, now + 0.1)  # still busy with the hung request
    assert iso.alive  # not yet overdue by hang_timeout_s
    assert not iso.submit(batch, now + CFG.hang_timeout_s + 0.1)  # overdue: killed, restart scheduled
    assert not iso.alive and iso.pid is None
    with pytest.raises(OSError):
        os.kill(old_pid, 0)
    iso.submit(batch, now + CFG.hang_timeout_s + 1.0)  # backoff elapsed: respawn
    assert iso.wait_ready() and iso.pid != old_pid
    assert _tick(iso, batch)[1] is not None


@pytest.mark.parametrize("kind", ["nan", "garbage"])
def test_output_faults_reach_the_caller_once(iso: IsolatedRuntime, kind: str) -> None:
    batch = _batch(3)
    iso.inject(kind)
    _, bad = _tick(iso, batch)
    assert bad is not None and not bad.well_formed(3)
    if kind == "nan":
        assert np.isnan(bad.action).all()
    else:
        assert bad.action.shape != (3, 2) and np.abs(bad.action).max() >= GARBAGE_VALUE
    _, good = _tick(iso, batch)
    assert good is not None and good.well_formed(3)


def test_persistent_fault_until_cleared_by_restart(iso: IsolatedRuntime) -> None:
    iso.inject("nan", count=None)
    assert all(not _tick(iso, _batch(1))[1].well_formed(1) for _ in range(3))
    iso.inject("nan", count=0)
    assert _tick(iso, _batch(1))[1].well_formed(1)


def test_late_reply_misses_the_deadline_and_is_dropped(iso: IsolatedRuntime) -> None:
    batch = _batch(2)
    iso.inject("late")
    submitted, reply = _tick(iso, batch, budget_s=_SHORT_S)
    assert submitted and reply is None
    assert iso.alive  # late is not dead
    time.sleep(CFG.late_delay_s * 2)  # let the stale reply arrive
    submitted, reply = _tick(iso, _batch(2, seed=9))
    assert submitted and reply is not None and reply.well_formed(2)
    assert reply.request_id == iso._next_id  # the fresh request's reply, not the stale one


def test_unknown_fault_and_oversize_batch_are_refused(iso: IsolatedRuntime) -> None:
    with pytest.raises(ConfigError):
        iso.inject("meteor")
    with pytest.raises(ConfigError):
        iso.submit(C.empty_batch(CFG.max_batch + 1))


def test_model_refused_by_the_child_fails_without_restart_loop(tmp_path: Path) -> None:
    class WrongLidar(torch.nn.Module):
        def forward(self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor) -> tuple:
            return kinematics[:, :2] + lidar[:, 0, :2], grid[:, 0, 0, 0:1]

    path = tmp_path / "wrong.onnx"
    torch.onnx.export(WrongLidar(), (torch.zeros(1, C.KIN_DIM), torch.zeros(1, 2, 8), torch.zeros(1, 2, 16, 32)),
                      str(path), input_names=list(C.INPUT_NAMES), output_names=list(C.OUTPUT_NAMES),
                      dynamic_axes={n: {0: "batch"} for n in (*C.INPUT_NAMES, *C.OUTPUT_NAMES)}, dynamo=False)
    with IsolatedRuntime(path, build_manifest(path, name="policy", version=1), config=CFG) as rt:
        assert not rt.wait_ready()
        assert rt.state == "failed" and "ContractError" in (rt.error or "") and not rt.alive
        assert not rt.submit(_batch(1), time.monotonic() + 100.0) and rt.restarts == 0
        with pytest.raises(ModelError):
            rt.run(_batch(1))


def test_tampered_model_is_refused_before_any_process(model: tuple[Path, object], tmp_path: Path) -> None:
    path, manifest = model
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError):
        IsolatedRuntime(tampered, manifest)


def test_close_stops_the_child_and_removes_the_buffer(model: tuple[Path, object]) -> None:
    path, manifest = model
    rt = IsolatedRuntime(path, manifest, config=CFG)
    pid, buf = rt.pid, Path(rt._buf_path)
    assert buf.is_file()
    rt.close()
    assert rt.pid is None and not buf.exists()
    with pytest.raises(OSError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"restart_backoff_min_s": 0}, {"restart_backoff_min_s": 2, "restart_backoff_max_s": 1}, {"hang_timeout_s": 0},
     {"max_batch": 0}],
)
def test_isolation_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        IsolationConfig(**kwargs)


@pytest.mark.parametrize("hung", [False, True], ids=["idle-child", "hung-child"])
def test_child_does_not_outlive_a_vehicle_process_that_died(model: tuple[Path, object], tmp_path: Path,
                                                            hung: bool) -> None:
    """The vehicle process is SIGKILLed (no close(), no atexit): its model process must exit on its own."""
    import signal
    import subprocess
    import sys
    import textwrap

    path, manifest = model
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from driveloop.contracts.manifest import read_manifest
        from driveloop.contracts import observation as C
        from driveloop.edge.isolated import IsolatedRuntime
        rt = IsolatedRuntime({str(path)!r}, read_manifest({str(tmp_path / "manifest.json")!r}))
        assert rt.wait_ready()
        if {hung!r}:
            rt.inject("hang")
            assert rt.submit(C.empty_batch(1), time.monotonic())
            assert rt.poll(time.monotonic() + 0.2) is None
        print(rt.pid, rt._buf_path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child_pid, buf_path = proc.stdout.split()
    for _ in range(600):  # the child notices within one 0.5 s sleep (hung) or at once (EOF)
        if _gone(int(child_pid)):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"model process {child_pid} outlived its vehicle process")
    assert not Path(buf_path).exists()
