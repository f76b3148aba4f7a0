"""The simulation's Ray runtime is its own: a Ray runtime this process runs (the cloud pipeline's, which is
also the cluster a bare ``ray.init()`` elsewhere on the box would find) is neither joined nor shut down."""

from __future__ import annotations

from pathlib import Path

from driveloop.federated.run import simulate
from driveloop.federated.server import ServerSettings
from tests.federated.conftest import VEHICLES, base_arrays, vehicle_settings


def test_the_simulation_neither_joins_nor_stops_a_ray_runtime_of_this_process(fl_home: Path) -> None:
    import ray

    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(None, 2)
    try:
        node_before = ray.get_runtime_context().get_node_id()
        total = ray.cluster_resources()["CPU"]
        free_mid_run: list[float] = []
        # round 1 has landed, round 2 is under way: Flower's ClientApp actors (1 CPU each) are alive now
        state = simulate(ServerSettings(run_dir=str(fl_home / "federated" / "shared"), vehicles=VEHICLES, rounds=2,
                                        quorum_frac=0.5), vehicle_settings(fl_home), base_arrays(fl_home),
                         on_round=lambda r: free_mid_run.append(ray.available_resources().get("CPU", 0.0)))
        assert state["finished"] and not any(r["skipped"] for r in state["rounds"])
        assert free_mid_run and all(cpu == total for cpu in free_mid_run)  # no actor of the run took a CPU here
        assert ray.is_initialized()
        assert ray.get_runtime_context().get_node_id() == node_before  # the same runtime, not a new one
        assert ray.get(ray.put(41)) + 1 == 42  # and it still works
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
