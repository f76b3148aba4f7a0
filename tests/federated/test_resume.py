"""Crash safety: the simulation process (the ServerApp's) is SIGKILLed when the driver sees round 1 land;
the driver reports it as a FederatedError with the run's log, leaves no process behind, and a rerun on the
same run directory resumes after the last checkpointed round (the checkpoint is the only state it needs).

The driver polls the checkpoint every 0.2 s, so the cut lands after round 1 or, on a busy machine, round 2:
the test reads where from the checkpoint; four rounds cannot all pass between two polls."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from driveloop.core.exceptions import FederatedError
from driveloop.federated.deploy import group_commands
from driveloop.federated.run import simulate
from driveloop.federated.server import ServerSettings, load_checkpoint, save_checkpoint
from tests.federated.conftest import VEHICLES, base_arrays, vehicle_settings


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live children of ``pid`` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return out


@pytest.mark.slow
def test_a_killed_simulation_is_a_clear_error_leaves_nothing_running_and_the_rerun_resumes(fl_home: Path) -> None:
    run_dir = fl_home / "federated" / "killed"
    rounds = 4
    server = ServerSettings(run_dir=str(run_dir), vehicles=VEHICLES, rounds=rounds, quorum_frac=0.5)
    vehicle = vehicle_settings(fl_home)
    groups: list[int] = []
    before = set(_children(os.getpid()))  # what earlier tests left running in this process (a Ray runtime)

    def power_cut(record: dict) -> None:
        if record["round"] == 1:
            # SuperLink, SuperExec and `flwr log`, each leading its process group
            flower = {pid: cmd for pid, cmd in _children(os.getpid()).items() if pid not in before}
            groups.extend(flower)
            (superexec,) = [pid for pid, cmd in flower.items() if "flower-superexec" in cmd]
            (sim,) = [pid for pid, cmd in group_commands(superexec).items() if "flwr-simulation" in cmd]
            os.kill(sim, signal.SIGKILL)

    with pytest.raises(FederatedError, match="simulation process exited") as err:
        simulate(server, vehicle, base_arrays(fl_home), on_round=power_cut)
    state_before = load_checkpoint(run_dir).state
    killed_at = state_before["completed_round"]
    assert killed_at in (1, 2) and not state_before.get("finished")
    assert f"after round {killed_at}" in str(err.value) and str(run_dir / "logs") in str(err.value)
    assert len(groups) == 3 and all(not group_commands(g) for g in groups)  # no Flower or Ray process is left
    assert set(_children(os.getpid())) <= before
    assert (run_dir / "logs" / "superlink.log").stat().st_size > 0

    seen: list[int] = []
    state = simulate(server, vehicle, base_arrays(fl_home), on_round=lambda r: seen.append(r["round"]))
    assert seen == list(range(killed_at + 1, rounds + 1))
    assert [r["round"] for r in state["rounds"]] == list(range(1, rounds + 1)) and state["finished"]
    assert state["rounds"][:killed_at] == json.loads(json.dumps(state_before["rounds"]))
    assert all(r["participants"] == [f"fl{i:03d}" for i in range(VEHICLES)] for r in state["rounds"])
    assert set(_children(os.getpid())) <= before


def test_checkpoint_is_one_atomic_file_and_round_trips(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, dtype=np.float32)}
    save_checkpoint(tmp_path, arrays, {"completed_round": 2, "rounds": [{"round": 1}, {"round": 2}]})
    got, state, _ = load_checkpoint(tmp_path)
    assert state["completed_round"] == 2 and set(got) == {"w", "b"}
    np.testing.assert_array_equal(got["w"], arrays["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]  # no temp file left
    assert load_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_keeps_the_server_optimizer_state_apart_from_the_model(tmp_path: Path) -> None:
    """A resumed server continues Adam's trajectory: step count and moments survive, and never leak into the
    model tensors a vehicle or the registry sees."""
    from driveloop.federated._server_opt import ServerOptConfig, ServerOptState, server_step

    arrays = {"w": np.zeros((2, 3), dtype=np.float32)}
    moved, opt = server_step(arrays, {"w": np.ones((2, 3), dtype=np.float32)}, ServerOptState(), ServerOptConfig())
    save_checkpoint(tmp_path, moved, {"completed_round": 1, "rounds": []}, opt)
    got = load_checkpoint(tmp_path)
    assert set(got.arrays) == {"w"} and got.optimizer.step == 1 and got.state["server_opt_step"] == 1
    np.testing.assert_array_equal(got.optimizer.m["w"], opt.m["w"])
    np.testing.assert_array_equal(got.optimizer.v["w"], opt.v["w"])


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from driveloop.core.exceptions import FederatedError

    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(FederatedError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_resume_uses_the_checkpoint_not_the_initial_weights(fl_home: Path, tmp_path: Path) -> None:
    """A finished run asked for no more rounds does nothing and keeps its weights."""
    base = base_arrays(fl_home)
    moved = {k: v + 1.0 for k, v in base.items()}
    save_checkpoint(tmp_path, moved, {"completed_round": 1, "rounds": [{"round": 1, "skipped": False}], "settings": {}})
    from driveloop.federated.server import run_rounds

    state = run_rounds(grid=None, settings=ServerSettings(run_dir=str(tmp_path), vehicles=VEHICLES, rounds=1),
                       initial=base)
    assert state["completed_round"] == 1 and state["finished"]
    got = load_checkpoint(tmp_path).arrays
    np.testing.assert_array_equal(got["head.bias"], moved["head.bias"])
