"""The stream bench on a real embedded broker: a fleet sharded over two client processes, its vehicles' ticks
spread over the period (not phase-locked), and the hazard delivery accounting."""

from __future__ import annotations

import asyncio
from itertools import pairwise
from pathlib import Path

import pytest

from driveloop._stream_bench import ShardPlan, _schedule, _shard, default_processes, hazard_delivery, run_bench, ticks
from driveloop.cloud.broker import EmbeddedBroker
from driveloop.contracts.stream import Telemetry
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


# (CPUs the machine reports, vehicles, processes by default)
DEFAULT_PROCESSES = [(2, 1000, 2), (2, 1, 1), (None, 1000, 1), (128, 5000, 64), (16, 3, 3)]


@pytest.mark.parametrize(("cpus", "vehicles", "expected"), DEFAULT_PROCESSES)
def test_the_default_is_one_client_process_per_cpu(monkeypatch: pytest.MonkeyPatch, cpus: int | None, vehicles: int,
                                                   expected: int) -> None:
    monkeypatch.setattr("driveloop._stream_bench.os.cpu_count", lambda: cpus)
    assert default_processes(vehicles) == expected


def test_each_tick_is_spread_over_the_period_in_vehicle_order() -> None:
    rows = list(_schedule(4, 3, 0.1))
    assert len(rows) == 12
    dues = [due for _, _, due in rows]
    assert dues == sorted(dues)  # one pass in time order: the publishing thread never goes back
    assert [(tick, i) for tick, i, _ in rows[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert dues[:4] == pytest.approx([0.0, 0.025, 0.05, 0.075])  # not phase-locked: i/n of the period apart
    for i in range(4):  # and each vehicle keeps its own 10 Hz
        own = [due for _, j, due in rows if j == i]
        assert [b - a for a, b in pairwise(own)] == pytest.approx([0.1, 0.1])
    assert (ticks(0.01, 10.0), ticks(1.5, 10.0)) == (1, 15)


def test_a_shard_publishes_its_vehicles_in_turn_across_the_tick(broker: EmbeddedBroker, tmp_path: Path) -> None:
    plan = ShardPlan(broker.url, 0, 8, tmp_path / "spool", seconds=0.4, rate_hz=5.0)  # 2 ticks of 200 ms
    r = _shard(plan, sync=lambda point: None)
    assert r["published"] == [2] * 8 and r["acked"] == 16 and r["flushed"]
    assert len(r["latencies"]) == 16  # every message timed from its own publish call to its ack

    async def stored() -> dict[tuple[str, int], float]:
        import nats

        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()
            msgs = [Telemetry.model_validate_json((await js.get_msg("TELEMETRY", seq)).data) for seq in range(1, 17)]
            return {(m.vehicle_id, m.seq): m.wall_ts for m in msgs}
        finally:
            await nc.close()

    walls = asyncio.run(stored())
    ids = plan.ids()
    for tick in (0, 1):
        at = [walls[(v, tick)] for v in ids]
        assert at == sorted(at)
        # vehicle 7 publishes 7/8 of the period (175 ms) after vehicle 0; a burst would put them microseconds apart
        assert at[-1] - at[0] > 0.1
    assert walls[(ids[0], 1)] - walls[(ids[0], 0)] > 0.1  # one period (200 ms) between a vehicle's own ticks


def test_hazard_delivery_counts_expected_received_and_outside() -> None:
    shards = [{"watched": {0: {1, 2}, 1: {5}}, "firsts": {(0, 7): 10.05, (1, 7): 10.2, (0, 99): 11.0}},
              {"watched": {2: {2}, 3: {3, 4}}, "firsts": {(3, 7): 10.15}}]
    d = hazard_delivery(shards, [(7, 10.0, (2, 3))])
    # watchers of cell 2 or 3: vehicles 0, 2, 3; vehicle 2 never got it; vehicle 1 watches neither; 99 was not sent
    assert (d["expected"], d["received"], d["outside"]) == (3, 2, 1)
    assert d["max_ms"] == pytest.approx(150.0) and d["p50_ms"] == pytest.approx(100.0)
