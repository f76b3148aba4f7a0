"""Crash safety: the server is SIGKILLed after its first completed round; restarted on the same run
directory it resumes after that round (the checkpoint is the only state it needs).

The child kills its own process group from its round-1 callback, which runs right after round 1's
checkpoint is written: the kill lands at the same point on every run, however fast the rounds are
(a parent polling for the checkpoint could be late, and all three rounds finished between two polls)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from driveloop.federated.run import simulate
from driveloop.federated.server import ServerSettings, load_checkpoint, save_checkpoint
from tests.federated.conftest import VEHICLES, base_arrays, vehicle_settings

_CHILD = """
import os
import signal
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from driveloop.federated.run import simulate
from driveloop.federated.server import ServerSettings
from tests.federated.conftest import base_arrays, vehicle_settings
home = Path({home!r})


def power_cut(record):
    if record["round"] == 1:
        os.killpg(0, signal.SIGKILL)


simulate(ServerSettings(run_dir={run_dir!r}, vehicles={n}, rounds=3, quorum_frac=0.5), vehicle_settings(home),
         base_arrays(home), on_round=power_cut)
"""


@pytest.mark.slow
def test_server_killed_mid_run_resumes_after_the_last_completed_round(fl_home: Path) -> None:
    run_dir = fl_home / "federated" / "killed"
    root = str(Path(__file__).resolve().parents[2])
    code = _CHILD.format(root=root, home=str(fl_home), run_dir=str(run_dir), n=VEHICLES)
    log = run_dir.parent / "killed-child.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        returncode = child.wait(600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything of the child's group still alive
            os.killpg(child.pid, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, \
        f"the federated run ended by itself (exit {returncode}), not by the cut: {log.read_text()[-2000:]}"
    state_before = load_checkpoint(run_dir).state
    killed_at = state_before["completed_round"]
    assert killed_at == 1 and not state_before.get("finished")

    seen: list[int] = []
    state = simulate(ServerSettings(run_dir=str(run_dir), vehicles=VEHICLES, rounds=3, quorum_frac=0.5),
                     vehicle_settings(fl_home), base_arrays(fl_home), on_round=lambda r: seen.append(r["round"]))
    assert seen == list(range(killed_at + 1, 4))
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3] and state["finished"]
    assert state["rounds"][:killed_at] == json.loads(json.dumps(state_before["rounds"]))


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
