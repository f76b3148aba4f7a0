"""Flower's Ray backend calls ray.shutdown() when a simulation ends; a runtime this process already
runs (the cloud pipeline's) must survive it, and the simulation must join it rather than start another."""

from __future__ import annotations

from pathlib import Path

from driveloop.federated.run import simulate
from driveloop.federated.server import ServerSettings
from tests.federated.conftest import VEHICLES, base_arrays, vehicle_settings


def test_a_shared_ray_runtime_survives_the_simulation(fl_home: Path) -> None:
    import ray

    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(None, 2)
    try:
        node_before = ray.get_runtime_context().get_node_id()
        state = simulate(ServerSettings(run_dir=str(fl_home / "federated" / "shared"), vehicles=VEHICLES, rounds=1,
                                        quorum_frac=0.5), vehicle_settings(fl_home), base_arrays(fl_home))
        assert state["finished"] and not state["rounds"][0]["skipped"]
        assert ray.is_initialized()
        assert ray.get_runtime_context().get_node_id() == node_before  # the same runtime, not a new one
        assert ray.get(ray.put(41)) + 1 == 42  # and it still works
        assert ray.shutdown.__name__ == "shutdown"  # the guard was removed again
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
