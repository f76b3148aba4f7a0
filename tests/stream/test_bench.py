"""The stream bench's accounting on a real embedded broker: a fleet sharded over two client processes."""

from __future__ import annotations

import pytest

from driveloop._stream_bench import run_bench
from driveloop.core.exceptions import ConfigError


def test_a_fleet_sharded_over_two_processes_is_counted_whole() -> None:
    r = run_bench(12, 1.5, rate_hz=10.0, hazards=3, baseline_s=0.5, processes=2)
    assert r["processes"] == 2
    assert r["published"] > 0 and r["published"] % 6 == 0  # whole ticks of each shard's 6 vehicles
    assert r["acked"] == r["published"]
    assert (r["lost"], r["duplicates"]) == (0, 0)
    assert r["hazards"] == 3 and r["hazard_expected"] > 0
    assert r["hazard_received"] == r["hazard_expected"]  # every watcher of a hazard's cells, across both shards
    assert r["hazard_outside"] == 0


@pytest.mark.parametrize("processes", [0, 13])
def test_processes_must_fit_the_fleet(processes: int) -> None:
    with pytest.raises(ConfigError, match="processes"):
        run_bench(12, 1.0, processes=processes)
