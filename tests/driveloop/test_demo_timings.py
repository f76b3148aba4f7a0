"""The demo's stage clock: wall seconds per stage of an iteration, summed over repeats (driveloop/demo.py)."""

from __future__ import annotations

import pytest

from driveloop._cli_demo import _stages
from driveloop.demo import IterationResult, StageClock


class _FakeClock:
    """A monotonic clock that each stage advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stages_sum_over_repeats_and_nest() -> None:
    fake = _FakeClock()
    clock = StageClock(fake)
    with clock("pipeline"):
        fake.now += 12.5
    with clock("rollout"):
        for window_s in (2.0, 3.25):  # two window drives inside one rollout
            with clock("rollout.drive"):
                fake.now += window_s
            fake.now += 0.5  # the health evaluation between windows
    assert clock.seconds == {"pipeline": 12.5, "rollout": 6.25, "rollout.drive": 5.25}


def test_a_failing_stage_is_still_timed() -> None:
    fake = _FakeClock()
    clock = StageClock(fake)
    with pytest.raises(RuntimeError), clock("upload"):
        fake.now += 4.0
        raise RuntimeError("server gone")
    assert clock.seconds == {"upload": 4.0}


def test_rows_carry_no_times_until_measured() -> None:
    row = IterationResult(1, "1", 0.0, 0, 1.0, 0.0)
    assert row.timings_s == {}


@pytest.mark.parametrize(("timings", "line"), [
    ({"drive": 24.6, "pipeline": 140.2, "rollout.drive": 9.49}, "drive 25 s, pipeline 140 s, rollout.drive 9 s"),
    ({}, "no stage times"),
])
def test_cli_line_names_the_stages_as_the_json_does(timings: dict[str, float], line: str) -> None:
    assert _stages(timings) == line

