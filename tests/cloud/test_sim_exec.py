"""Simulation as Ray work (cloud/sim_exec.py): the same seeds give the same results on Ray and in-process,
a unit whose worker dies is retried, a unit's own error is not, and every run says where it ran.

The Ray tests share one local runtime of 2 CPUs (started here, shut down here); the multi-node cluster
test is tests/cloud/test_ray_cluster.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from driveloop.cloud.sim_exec import Execution, Placement, SimExecutor, split_even
from driveloop.core.exceptions import ConfigError, PipelineError, ScenarioError


@pytest.mark.parametrize(("backend", "address", "chosen"), [
    ("auto", None, "local"),
    ("auto", "127.0.0.1:6379", "ray"),
    ("ray", None, "ray"),
    ("local", "127.0.0.1:6379", "local"),
])
def test_backend_choice(backend: str, address: str | None, chosen: str) -> None:
    assert SimExecutor.choose(backend, address).backend == chosen


@pytest.mark.parametrize("bad", ["", "RAY", "dask"])
def test_unknown_backend_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--backend"):
        SimExecutor.choose(bad)


@pytest.mark.parametrize(("n", "parts", "sizes"), [
    (10, 3, [4, 3, 3]), (3, 5, [1, 1, 1]), (1000, 2, [500, 500]), (7, 1, [7]), (5, 0, [5]),
])
def test_split_even(n: int, parts: int, sizes: list[int]) -> None:
    pieces = split_even(list(range(n)), parts)
    assert [len(p) for p in pieces] == sizes and [x for p in pieces for x in p] == list(range(n))


def test_execution_counts_distinct_nodes_and_workers() -> None:
    placements = [Placement("a", "w1"), Placement("a", "w1"), Placement("b", "w1"), Placement("a", "w2")]
    ex = Execution.of("ray", placements)
    assert (ex.nodes, ex.workers, ex.units, ex.node_ids) == (2, 3, 4, ("a", "b"))
    assert ex.to_dict()["backend"] == "ray"


def test_local_map_keeps_order_and_reports_this_process() -> None:
    seen: list[int] = []
    mapped = SimExecutor().map(pow, [(2, 3), (3, 2), (5, 0)], on_result=seen.append)
    assert mapped.results == [8, 9, 1] and seen == [0, 1, 2]
    assert mapped.execution == Execution("local", 1, 1, 3, ("local",))
    assert mapped.placements[0].worker == str(os.getpid())


# -------------------------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def ray_local() -> Iterator[SimExecutor]:
    """A local Ray runtime of 2 CPUs, started (and shut down) by this module."""
    from driveloop.cloud.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(None, 2)
    yield SimExecutor("ray", num_cpus=2, max_retries=2)
    shutdown_ray()


def _register_braking(root: Path) -> object:
    """A model whose head ignores its inputs and brakes, confidently: it drives unlike a random one."""
    import torch

    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.registry import Registry

    net = PolicyNet()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-3.0, 0.0, 6.0]))
    with Registry(root / "registry") as reg:
        manifest = reg.register(export_onnx(net, root / "braking.onnx"), training_run={"kind": "test-braking"})
        return reg.get(manifest.version)


def _suite() -> object:
    from driveloop.cloud.evaluation import EvalSuite

    return EvalSuite(classes={"ccrs": ("ccrs-30", "ccrs-50"), "highway": ("highway",)}, vehicles_per_scenario=2,
                     duration_s=4.0)


@pytest.mark.slow
def test_evaluation_on_ray_equals_in_process(random_home: Path, tmp_path: Path, ray_local: SimExecutor) -> None:
    """Two models' held-out suite as Ray tasks: metrics identical to the in-process run, unit by unit."""
    from driveloop.cloud.evaluation import evaluate_models
    from driveloop.cloud.registry import Registry
    with Registry(random_home / "registry") as reg:
        first = reg.get("validated")
    second = _register_braking(tmp_path)
    models = [(first.onnx_path, first.manifest), (second.onnx_path, second.manifest)]
    classes: list[str] = []
    local = evaluate_models(models, _suite())
    remote = evaluate_models(models, _suite(), ray_local, on_class=classes.append)
    assert remote.metrics == local.metrics
    assert local.metrics[0] != local.metrics[1]  # two different models: the comparison can fail
    assert sorted(classes) == ["ccrs", "highway"]
    assert local.execution.backend == "local" and remote.execution.backend == "ray"
    assert remote.execution.units == 6 and remote.execution.nodes == 1 and "local" not in remote.execution.node_ids
    assert [(p["model"], p["scenario"], p["vehicles"]) for p in remote.placements] == \
        [(m, s, 2) for m in (0, 1) for s in ("ccrs-30", "ccrs-50", "highway")]


@pytest.mark.slow
def test_a_unit_whose_worker_dies_is_retried_not_lost(tmp_path: Path, ray_local: SimExecutor) -> None:
    """The first attempt of unit 1 kills its worker process; Ray runs it again and nothing is missing."""
    marker = tmp_path / "died-once"

    def unit(i: int) -> int:
        if i == 1 and not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies mid-unit
        return i * i

    mapped = ray_local.map(unit, [(i,) for i in range(4)])
    assert marker.exists() and mapped.results == [0, 1, 4, 9]


@pytest.mark.slow
def test_a_unit_that_raises_is_not_retried_and_keeps_its_error(tmp_path: Path, ray_local: SimExecutor) -> None:
    attempts = tmp_path / "attempts"

    def unit(name: str) -> None:
        with open(attempts, "a") as f:
            f.write("x")
        from driveloop.sim.scenarios import parse_scenario

        parse_scenario(name)

    with pytest.raises(ScenarioError) as e:
        ray_local.map(unit, [("no-such-scenario",)])
    assert attempts.read_text() == "x" and "no-such-scenario" in str(e.value) and "Traceback" not in str(e.value)

    def crash() -> None:
        raise ZeroDivisionError("boom")

    with pytest.raises(PipelineError, match="ZeroDivisionError: boom"):
        ray_local.map(crash, [()], what="a unit")


@pytest.mark.slow
def test_fleet_shards_on_ray_equal_the_in_process_fleet(random_home: Path, ray_local: SimExecutor) -> None:
    """9 vehicles in 3 shards on Ray (2 CPUs: 2 actors, one takes the third shard; batched inference per
    shard) vs one in-process fleet: the same vehicles drive the same."""
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.sim_exec import ModelPayload
    from driveloop.edge.drive import plan_fleet

    with Registry(random_home / "registry") as reg:
        art = reg.get("validated")
    payload = ModelPayload.read(art.onnx_path, art.manifest)
    plans = plan_fleet("mix", 9, seed=2)
    local = SimExecutor().drive_shards(payload, plans, 4.0, shards=3)
    remote = ray_local.drive_shards(payload, plans, 4.0, shards=3)
    assert [len(s.vehicles) for s in local.results] == [9] and [len(s.vehicles) for s in remote.results] == [3, 3, 3]

    def rows(mapped: object) -> list[tuple]:
        return [(v.vehicle_id, v.ticks, v.distance_m, v.collisions, v.interventions, v.abs_jerk_sum, v.min_gap_m)
                for s in mapped.results for v in s.vehicles]  # type: ignore[attr-defined]

    assert rows(remote) == rows(local) and len({r[2] for r in rows(local)}) > 1
    assert remote.execution.workers == 2 and local.execution == Execution("local", 1, 1, 1, ("local",))
    assert all(s.cpu_s > 0 and s.rss_growth_bytes >= 0 for s in remote.results)


@pytest.mark.slow
def test_a_shard_whose_actor_dies_is_driven_again(tmp_path: Path, ray_local: SimExecutor) -> None:
    """The second shard's first actor dies mid-drive; a new actor drives it again and the fleet is whole."""
    from driveloop.cloud.sim_exec import ShardDriver
    from driveloop.edge.drive import plan_fleet

    marker = tmp_path / "shard-died"

    class DiesOnce(ShardDriver):
        def drive(self, plans, duration_s, config=None):  # type: ignore[no-untyped-def]
            if plans[0].vehicle_id.endswith("002") and not marker.exists():
                marker.touch()
                os._exit(1)  # the actor's process dies with its shard half done
            return super().drive(plans, duration_s, config)

    plans = plan_fleet("highway", 4, seed=1)
    whole = SimExecutor().drive_shards(None, plans, 2.0, shards=2)
    mapped = ray_local.drive_shards(None, plans, 2.0, shards=2, driver=DiesOnce)
    assert marker.exists()
    assert [v.vehicle_id for s in mapped.results for v in s.vehicles] == [p.vehicle_id for p in plans]
    assert [v.distance_m for s in mapped.results for v in s.vehicles] == \
        [v.distance_m for v in whole.results[0].vehicles]


@pytest.mark.slow
def test_expert_episodes_on_ray_equal_in_process(ray_local: SimExecutor) -> None:
    import numpy as np

    from driveloop.cloud.bootstrap import BootstrapConfig, collect

    cfg = BootstrapConfig(episodes=3, episode_s=2.0, workers=1)
    local, remote = collect(cfg), collect(cfg, executor=ray_local)
    assert len(local) == 3 * 20
    for name in ("kinematics", "lidar", "grid", "actions"):
        assert np.array_equal(getattr(local, name), getattr(remote, name)), name


@pytest.mark.slow
def test_safety_suite_on_ray_equals_in_process(ray_local: SimExecutor) -> None:
    from driveloop._cli_safety import run_suite

    cases = ["ccrs-30", "ccrs-75", "ccrm-50", "ccrb-12-6"]
    kwargs = dict(fallback_only=True, noise=0.3, cases=cases, nominal=0, nominal_duration_s=1.0)
    local = run_suite({}, **kwargs)
    remote = run_suite({}, **kwargs, executor=ray_local)
    strip = lambda report: [{k: v for k, v in row.items() if k != "node"} for row in report["rows"]]  # noqa: E731
    assert strip(remote) == strip(local) and remote["avoided"] == 4
    assert local["execution"]["backend"] == "local" and remote["execution"]["backend"] == "ray"
    assert {row["node"] for row in remote["rows"]} == set(remote["execution"]["node_ids"])
