"""``train_federated`` then ``finish``: the rounds apart from the gate, so that a caller (the demo) can train
beside other work and register its candidates in an order of its own."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from driveloop.cloud.evaluation import DEFAULT_SUITE, EvalSuite
from driveloop.federated.client import VehicleSettings
from driveloop.federated.run import FlRunConfig, FlTrained, finish, train_federated
from driveloop.federated.server import ServerSettings, load_checkpoint
from tests.federated.conftest import EPISODE_S, VEHICLES


def test_training_registers_nothing_and_finish_gates_and_registers_the_trained_run(fl_home: Path) -> None:
    from driveloop.cloud.registry import Registry

    cfg = FlRunConfig(vehicle=VehicleSettings(home=str(fl_home), registry_dir=str(fl_home / "registry"), episodes=2,
                                              episode_s=EPISODE_S),
                      server=ServerSettings(vehicles=VEHICLES, rounds=2, quorum_frac=0.5), run_name="split",
                      suite=EvalSuite(classes={"ccrs": DEFAULT_SUITE["ccrs"]}, duration_s=4.0))
    with Registry(fl_home / "registry") as reg:
        before = [m.version for m, _ in reg.list()]
    rounds: list[int] = []
    prepared: list[str] = []
    trained = train_federated(cfg, on_round=lambda r: rounds.append(r["round"]), on_vehicle=prepared.append)

    assert isinstance(trained, FlTrained)
    with pytest.raises(FrozenInstanceError):
        trained.state = {}  # type: ignore[misc]
    assert rounds == [1, 2] and prepared == [f"fl{i:03d}" for i in range(VEHICLES)]
    assert trained.run_dir == fl_home / "federated" / "split" and trained.server.run_dir == str(trained.run_dir)
    assert trained.state["finished"] and trained.state == load_checkpoint(trained.run_dir).state
    assert set(trained.extra["samples_per_vehicle"]) == set(prepared)
    with Registry(fl_home / "registry") as reg:
        assert [m.version for m, _ in reg.list()] == before  # training alone registers no candidate

    report = finish(cfg, trained)
    assert report["run"] == "split" and report["rounds"] == 2 and report["base_version"] == trained.base.version
    assert report["samples_per_vehicle"] == trained.extra["samples_per_vehicle"]
    with Registry(fl_home / "registry") as reg:
        assert [m.version for m, _ in reg.list()] == [*before, report["candidate"]]
        assert reg.get(report["candidate"]).manifest.lineage["kind"] == "federated"
