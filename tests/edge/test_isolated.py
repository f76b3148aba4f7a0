"""IsolatedRuntime with a real child process (kill, hang, nan, garbage, late, error), alone and driving a fleet
through IsolatedInference; FaultyRunner: test_faults.py.

No test waits for a timer to run out: the runtime's clock is real time plus jumps the test makes
(:class:`Clock`), with the restart backoff and hang timeout far longer than any test, so each fires at
the exact point the test jumps the clock; a late reply is awaited on the pipe, a process's exit on its pidfd.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from driveloop.cloud.export import PARITY_TOL, export_onnx
from driveloop.contracts.manifest import build_manifest
from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
from driveloop.contracts import observation as C
from driveloop.edge.agent import AgentConfig, FaultSpec, VehicleAgent
from driveloop.edge.faults import FAULTS, GARBAGE_VALUE, Fault
from driveloop.edge.fleet import IsolatedInference, VehiclePlan, run_fleet
from driveloop.edge.isolated import IsolatedRuntime, IsolationConfig
from driveloop.edge.runtime import ModelRunner, ModelRuntime
from driveloop.core.exceptions import ConfigError, IntegrityError, ModelError

_LONG_S = 30.0  # a deadline that only a dead or faulty child misses
_SHORT_S = 0.05  # a deadline a late/hung child is sure to miss (it sleeps much longer)
_JUMP_S = 1000.0  # restart backoff and hang timeout: only a jump of the test's clock reaches them
CFG = IsolationConfig(restart_backoff_min_s=_JUMP_S, restart_backoff_max_s=_JUMP_S, hang_timeout_s=_JUMP_S,
                      late_delay_s=0.5)


class Clock:
    """A runtime's clock: real time (replies are really waited for) plus the jumps the test makes."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = export_onnx(PolicyNet(PolicyConfig(seed=8)), tmp_path_factory.mktemp("iso") / "model.onnx")
    return path, build_manifest(path, name="policy", version=3)


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def iso(model: tuple[Path, object], clock: Clock) -> Iterator[IsolatedRuntime]:
    path, manifest = model
    with IsolatedRuntime(path, manifest, config=CFG, clock=clock) as rt:
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


def _wait_exit(pid: int) -> None:
    """Block until process ``pid`` (not our child: it cannot be wait()ed for) has exited: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _await_late_reply(rt: IsolatedRuntime) -> None:
    """Block until the reply to a request given up on is on the pipe (the next submit drains it)."""
    if rt._in_flight is not None and rt._conn is not None:
        assert rt._conn.poll(None)


def _tick(rt: IsolatedRuntime, batch: dict[str, np.ndarray], budget_s: float = _LONG_S):
    now = rt.now()
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


def test_sigkill_mid_run_is_survived_and_restarted(iso: IsolatedRuntime, clock: Clock) -> None:
    batch = _batch(4)
    old_pid, restarts = iso.pid, iso.restarts
    iso.inject("hang")  # keeps the next request in the child…
    now = iso.now()
    assert iso.submit(batch, now)
    iso.inject("kill")  # …so it is surely in flight when the process dies
    assert iso.poll(now + _LONG_S) is None  # the next tick learns it: EOF, not a timeout
    assert not iso.alive and iso.state == "waiting"
    with pytest.raises(OSError):
        os.kill(old_pid, 0)  # reaped: no zombie left behind
    assert not iso.submit(batch)  # inside the backoff: refused without blocking
    clock.advance(CFG.restart_backoff_max_s)
    assert iso.submit(batch) is False and iso.state == "starting"  # backoff over: respawned
    assert iso.wait_ready() and iso.restarts == restarts + 1 and iso.pid != old_pid
    submitted, reply = _tick(iso, batch)
    assert submitted and reply is not None and reply.well_formed(4)


def test_hang_misses_deadlines_then_is_killed_and_restarted(iso: IsolatedRuntime, clock: Clock) -> None:
    batch = _batch(2)
    iso.inject("hang")
    old_pid = iso.pid
    now = iso.now()
    assert iso.submit(batch, now)
    assert iso.poll(now + _SHORT_S) is None  # deadline miss
    assert not iso.submit(batch)  # still busy with the hung request
    assert iso.alive  # not yet overdue by hang_timeout_s
    clock.advance(CFG.hang_timeout_s)
    assert not iso.submit(batch)  # overdue: killed, restart scheduled
    assert not iso.alive and iso.pid is None
    with pytest.raises(OSError):
        os.kill(old_pid, 0)
    clock.advance(CFG.restart_backoff_max_s)
    assert not iso.submit(batch) and iso.state == "starting"  # backoff elapsed: respawned
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
    _await_late_reply(iso)
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
    _wait_exit(int(child_pid))  # it notices within one 0.5 s sleep (hung) or at once (EOF); blocks if it never does
    assert _gone(int(child_pid))
    assert not Path(buf_path).exists()


def test_model_error_is_answered_and_the_process_serves_on(iso: IsolatedRuntime) -> None:
    """ONNX Runtime raising inside ``run`` in the child (untyped, not a ModelError): the child answers with
    the error and keeps serving; the parent raises ModelError for that request; nothing restarts."""
    pid, restarts = iso.pid, iso.restarts
    iso.inject("error")
    now = iso.now()
    assert iso.submit(_batch(2), now)
    with pytest.raises(ModelError, match="Fail: .*kernel failed"):
        iso.poll(now + _LONG_S)
    assert iso.alive and iso.pid == pid and iso.restarts == restarts
    _, reply = _tick(iso, _batch(2))
    assert reply is not None and reply.well_formed(2)


# -- a fleet driving through the model process (`driveloop drive --isolate --fault …`) -------------------
DT_S = AgentConfig().sim.dt_s
DETECT_TICKS, BRAKE_TICKS = 2, 1  # detected within 2 control periods, braking within 1 more
FAULT = {"at_s": 20 * DT_S, "duration_s": 10 * DT_S}
HANDBACK_TICKS = math.ceil(AgentConfig().supervisor.handback_hold_s / DT_S) + 1  # model valid again → it drives
DRIVE_S = (30 + 2 * HANDBACK_TICKS) * DT_S


class _PacedRecovery:
    """``on_tick`` hook: the real time a vehicle's loop would spend after a fault, spent at an exact tick.

    The simulated fleet outruns real time and the model process does not; so once the fault is seen,
    a hung request gets ``hang_timeout_s`` and a dead process its restart backoff by jumping the
    runtime's clock, and the restarted process's model load is awaited. Records each tick's
    (source, watchdog verdict, model errors so far) per vehicle.
    """

    def __init__(self, rt: IsolatedRuntime, clock: Clock, row: Fault) -> None:
        self.rt, self.clock, self.row = rt, clock, row
        self.ticks: list[list[tuple[str, str | None, int]]] = []
        self.restarted_at: int | None = None
        self._hang_given = False

    def __call__(self, tick: int, total: int, agents: Sequence[VehicleAgent]) -> None:
        decisions = [a.last_decision for a in agents]
        self.ticks.append([(d.source, d.watchdog, a.metrics.model_errors)  # type: ignore[union-attr]
                           for d, a in zip(decisions, agents)])
        if agents[0].fault_log["detected_at_s"] is None:
            return
        if self.row.hangs and not self._hang_given:
            self.clock.advance(self.rt.config.hang_timeout_s)  # the next tick finds the request overdue
            self._hang_given = True
        elif self.rt.state == "waiting":
            self.clock.advance(self.rt.config.restart_backoff_max_s)
            assert self.rt.wait_ready()
            self.restarted_at = tick


@pytest.mark.parametrize("kind", list(FAULTS))
def test_fleet_through_the_model_process_survives_each_fault(model: tuple[Path, object], kind: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Per fault kind: detected within 2 ticks, braking 1 tick after, no collision, the model process
    restarted exactly when the fault took it down (kill, hang), the model driving again afterwards."""
    row, (path, manifest), clock = FAULTS[kind], model, Clock()
    fault = FaultSpec(kind, **FAULT)
    plans = [VehiclePlan(f"v{i}", "dense", 40 + i) for i in range(2)]
    with IsolatedRuntime(path, manifest, config=CFG, clock=clock) as rt:
        assert rt.wait_ready()
        hook = _PacedRecovery(rt, clock, row)
        with caplog.at_level(logging.WARNING, logger="driveloop.edge.fleet"):
            report = run_fleet(plans, {"default": IsolatedInference(rt)}, DRIVE_S, fault=fault, on_tick=hook)
        restarts = rt.restarts
    for log in report.faults.values():
        assert log["injected_at_s"] == pytest.approx(fault.at_s)
        assert log["detected_at_s"] is not None and log["brake_at_s"] is not None
        assert log["detected_at_s"] - log["injected_at_s"] <= DETECT_TICKS * DT_S + 1e-9
        assert log["brake_at_s"] - log["detected_at_s"] <= BRAKE_TICKS * DT_S + 1e-9
    assert report.summary()["collisions"] == 0
    assert restarts == (1 if row.kills or row.hangs else 0)
    assert (hook.restarted_at is not None) == bool(row.kills or row.hangs)
    if not row.late:  # a late model stays late for every request of its count, past the end of this drive
        over = max(round((fault.at_s + fault.duration_s) / DT_S), (hook.restarted_at or 0) + 1)
        assert any(all(src == "model" and verdict is None for src, verdict, _ in t) for t in hook.ticks[over:])
    errors = [v.model_errors for v in report.vehicles]
    failed_calls = [r for r in caplog.records if "model call failed" in r.getMessage()]
    if row.raises is None:
        assert errors == [0, 0] and failed_calls == []
        return
    # Each failed request: no output for that tick (fallback, model reported dead), counted, logged once.
    # (A host stall past the deadline turns a failed request into a plain miss: the count is at most one
    # per injected failure here; test_fleet.py pins it exactly in process.)
    count = round(fault.duration_s / DT_S)
    assert errors[0] == errors[1] and 0 < errors[0] <= count
    for before, now in zip(hook.ticks, hook.ticks[1:]):
        for (_, _, n_before), (src, verdict, n_now) in zip(before, now):
            assert n_now == n_before or (n_now == n_before + 1 and (src, verdict) == ("fallback", "dead"))
    assert len(failed_calls) == 1 and failed_calls[0].levelno == logging.WARNING
