"""A fleet over this host's cores (cloud/fleet_shards.py): the sharded drive equals the one-thread drive vehicle
by vehicle (two models, a shadow, recording), its workers' log lines reach this process, a worker that dies fails
one drive with a clear error and the next drive starts a new one, and a worker never outlives its pool's process.
Real simulator, ONNX Runtime and spool; worker processes started here are stopped here."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from driveloop.cloud.fleet_shards import FleetShardPool, Recording, drive_shard, merge_reports
from driveloop.core.exceptions import ConfigError, PipelineError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two different random-weight models as payloads: keys ``a`` and ``b`` (``b`` runs with ``a`` in shadow)."""
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.sim_exec import ModelPayload
    from tests.conftest import _register_random

    home = tmp_path_factory.mktemp("two_models")
    _register_random(home, seed=0)
    _register_random(home, seed=1)
    with Registry(home / "registry") as reg:
        arts = [reg.get(v) for v in (1, 2)]
    return {k: ModelPayload.read(a.onnx_path, a.manifest) for k, a in zip("ab", arts)}


def _plans() -> list[Any]:
    from driveloop.edge.drive import plan_fleet

    return [p.__class__(p.vehicle_id, p.scenario, p.seed, "a" if i % 2 == 0 else "b")
            for i, p in enumerate(plan_fleet("mix", 5, seed=3, prefix="car"))]


def _recording(spool: Path, plans: list[Any]) -> Recording:
    """Into ``spool``, with a campaign beside the built-in triggers (a compiled condition crosses no process:
    each shard builds its own from the fields)."""
    from driveloop.edge.triggers import TriggerSpec

    campaign = TriggerSpec("campaign.fast", "speed > 20", mode="always", min_interval_s=0.5, priority=6)
    return Recording(spool, 2**30, {p.vehicle_id: "1" if p.model == "a" else "2" for p in plans},
                     Recording.trigger_fields([campaign]))


def _rows(report: Any) -> list[tuple[Any, ...]]:
    return [(v.vehicle_id, v.ticks, v.distance_m, v.collisions, v.interventions, v.abs_jerk_sum, v.min_gap_m,
             v.model_errors, None if v.shadow is None else (v.shadow.compared_ticks, v.shadow.disagreements,
                                                            v.shadow.abs_diff_sum))
            for v in report.vehicles]


def _segments(report: Any) -> list[tuple[Any, ...]]:
    from driveloop.contracts.segment import read_ticks, validate_segment

    out = []
    for path in report.segments:
        meta = validate_segment(path).meta
        out.append((meta.vehicle, meta.model_version, meta.n_ticks, meta.events,
                    [(t.applied_accel_mps2, t.applied_steering_rad, t.model_action) for t in read_ticks(path)]))
    return out


def test_two_shards_drive_record_and_log_like_one_thread(two_models: dict[str, Any], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    plans = _plans()
    models, shadows = two_models, {"b": two_models["a"]}
    one = drive_shard(plans, models, shadows, 6.0, recording=_recording(tmp_path / "one", plans))
    caplog.set_level(logging.INFO)  # before the pool starts: its workers log at this process's level
    with FleetShardPool(2) as pool:
        worker_pids = {p.pid for p in pool._executor._processes.values()}  # type: ignore[union-attr]
        two = pool.drive(plans, models, 6.0, shadows, recording=_recording(tmp_path / "two", plans))
    assert _rows(two) == _rows(one) and len({r[2] for r in _rows(one)}) > 1  # the vehicles drove differently
    assert [r[8] is not None for r in _rows(one)] == [p.model == "b" for p in plans]  # the shadow rode with b
    assert two.shadow["b"].compared_ticks == one.shadow["b"].compared_ticks > 0
    assert two.shadow["b"].disagreements == one.shadow["b"].disagreements
    assert len(two.tick_ms) == len(one.tick_ms) == 60
    # the same segments, vehicle by vehicle, each naming the model that drove it, in the same spool layout
    assert _segments(two) == _segments(one) and {s[0] for s in _segments(one)} == {p.vehicle_id for p in plans}
    assert {s[1] for s in _segments(one)} == {"1", "2"}
    assert all(s[3].get("campaign.fast", 0) > 0 for s in _segments(two))  # the campaign fired in both shards
    assert all(p.parent == tmp_path / "two" / "closed" for p in two.segments)
    # the second shard's vehicles ran in the worker; their "closed segment" lines reached this process's log
    closed = {r.process: r.getMessage() for r in caplog.records if r.getMessage().startswith("closed segment")}
    assert worker_pids and worker_pids <= set(closed)
    assert not any(pid_alive(pid) for pid in worker_pids)  # closed with the pool


def test_one_shard_is_this_thread_alone(two_models: dict[str, Any]) -> None:
    plans = _plans()[:2]
    with FleetShardPool(1) as pool:
        assert pool._executor is None
        report = pool.drive(plans, two_models, 1.0)
    assert [v.vehicle_id for v in report.vehicles] == [p.vehicle_id for p in plans]
    with pytest.raises(ConfigError, match="at least one vehicle"):
        FleetShardPool(1).drive([], two_models, 1.0)
    with pytest.raises(ConfigError, match=">= 1"):
        FleetShardPool(0)


def test_merge_of_one_report_is_that_report(two_models: dict[str, Any]) -> None:
    report = drive_shard(_plans()[:1], two_models, {}, 0.5)
    assert merge_reports([report]) is report


def test_a_dead_worker_fails_one_drive_and_the_next_starts_a_new_one(two_models: dict[str, Any]) -> None:
    plans = _plans()[:4]
    with FleetShardPool(2) as pool:
        (worker,) = pool._executor._processes.values()  # type: ignore[union-attr]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        with pytest.raises(PipelineError, match="worker process died"):
            pool.drive(plans, two_models, 1.0)
        again = pool.drive(plans, two_models, 1.0)
        assert [v.vehicle_id for v in again.vehicles] == [p.vehicle_id for p in plans]
        (new,) = pool._executor._processes.values()  # type: ignore[union-attr]
        assert new.pid != worker.pid


_ORPHAN = """
import sys
from driveloop.cloud.fleet_shards import FleetShardPool
if __name__ == "__main__":
    pool = FleetShardPool(2)
    (worker,) = pool._executor._processes.values()
    print(worker.pid, flush=True)
    sys.stdin.read()  # until the test kills this process
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; only its parent has not reaped it yet
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_worker_exits_when_its_pools_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "pool_owner.py"
    script.write_text(_ORPHAN)
    owner = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        worker_pid = int(owner.stdout.readline())  # type: ignore[union-attr]
        assert pid_alive(worker_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
    deadline = time.monotonic() + 30  # the worker notices at once (its pipe closes); 30 s is only a bound
    while pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = pid_alive(worker_pid)
    if alive:
        os.kill(worker_pid, signal.SIGKILL)  # ours: started by the pool this test's process started
    assert not alive
