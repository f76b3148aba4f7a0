"""The server's round loop closing rounds at the deadline, on a simulated clock: a vehicle that never
answers is excluded when the deadline passes, whatever the machine's speed (``run_rounds`` over the
in-memory grid; the clock advances only when the loop waits between polls)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from driveloop.federated.server import Clock, ServerSettings, load_checkpoint, run_rounds
from tests.fakes.flower_grid import FakeGrid

BASE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
DEADLINE_S = 40.0


class SimClock:
    """Time that passes only when the loop sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0

    def sleep(self, s: float) -> None:
        self.t += s

    @property
    def clock(self) -> Clock:
        return Clock(lambda: self.t, self.sleep)


def honest(i: int, g: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    return {k: v + 0.125 for k, v in g.items()}, 10.0


# (name, silent vehicles, quorum, how the round closes, accepted, skipped)
DEADLINE_CASES = [
    ("straggler excluded at the deadline", {3}, 0.5, "quorum", 3, False),
    ("no quorum by the deadline", {1, 2, 3}, 0.5, "skipped", 1, True),
]


@pytest.mark.parametrize("name,silent,quorum,closed,accepted,skipped", DEADLINE_CASES,
                         ids=[c[0] for c in DEADLINE_CASES])
def test_a_round_waits_for_the_deadline_then_closes_without_the_silent(
        name: str, silent: set[int], quorum: float, closed: str, accepted: int, skipped: bool, tmp_path: Path) -> None:
    sim = SimClock()
    s = ServerSettings(run_dir=str(tmp_path / "r"), vehicles=4, rounds=1, quorum_frac=quorum,
                       round_deadline_s=DEADLINE_S, server_opt="none", clip_median_factor=0.0)
    with FakeGrid(4, honest, silent=frozenset(silent)) as grid:
        state = run_rounds(grid, s, BASE, clock=sim.clock)
    (rec,) = state["rounds"]
    assert (rec["closed"], rec["accepted"], rec["skipped"]) == (closed, accepted, skipped)
    assert rec["participants"] == [f"fl{i:03d}" for i in range(4) if i not in silent]
    assert DEADLINE_S <= rec["wall_s"] < DEADLINE_S + 0.1  # simulated seconds: it waited for the deadline, no longer
    arrays = load_checkpoint(Path(s.run_dir)).arrays
    expected = BASE["w"] if skipped else BASE["w"] + 0.125
    np.testing.assert_array_equal(arrays["w"], expected)


def test_a_round_with_every_reply_closes_at_once(tmp_path: Path) -> None:
    sim = SimClock()
    s = ServerSettings(run_dir=str(tmp_path / "r"), vehicles=4, rounds=1, round_deadline_s=DEADLINE_S)
    with FakeGrid(4, honest) as grid:
        state = run_rounds(grid, s, BASE, clock=sim.clock)
    (rec,) = state["rounds"]
    assert rec["closed"] == "complete" and rec["wall_s"] == 0.0 and rec["accepted"] == 4
