"""Vehicle-side pure parts: fault parsing, poisoned updates, settings round trip, fault assignment,
non-IID mixes, strategy construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.federated.client import (
    VehicleSettings,
    format_faults,
    parse_faults,
    poison,
    resolve_vehicle_id,
    round_dropouts,
    vehicle_id_for,
)
from driveloop.federated.run import FlRunConfig
from driveloop.federated.server import STRATEGIES, ServerSettings, build_strategy
from driveloop.federated.vehicle_data import (
    VehicleDataConfig,
    vehicle_mix,
    vehicle_scenarios,
)

BASE = {"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
HONEST = {"w": np.full((2, 2), 0.1, np.float32), "b": np.full(3, 1.2, np.float32)}


def test_faults_round_trip_and_unknown_fault() -> None:
    faults = {"fl001": "scale50", "fl004": "dropout"}
    assert parse_faults(format_faults(faults)) == faults
    assert parse_faults("") == {}
    with pytest.raises(ConfigError, match="unknown fault"):
        parse_faults("fl001:explode")


@pytest.mark.parametrize("fault,check", [
    ("scale50", lambda out: np.allclose(out["w"], 5.0) and np.allclose(out["b"], 11.0)),
    ("signflip", lambda out: np.allclose(out["w"], -0.1) and np.allclose(out["b"], 0.8)),
    ("nan", lambda out: not np.all(np.isfinite(out["w"]))),
    ("shape", lambda out: out["w"].shape == (2, 2, 2)),
    ("dropout", lambda out: np.array_equal(out["w"], HONEST["w"])),
])
def test_poison(fault: str, check) -> None:
    out = poison(HONEST, BASE, fault)
    assert check(out)
    assert all(v.dtype == np.float32 for v in out.values())


def test_vehicle_settings_round_trip_through_the_run_config() -> None:
    s = VehicleSettings(home="/h", registry_dir="/h/registry", local_epochs=3, faults="fl000:nan")
    assert VehicleSettings.from_run_config(s.to_run_config()) == s
    with pytest.raises(ConfigError):
        VehicleSettings.from_run_config({})
    assert s.vehicle_dir("fl007") == Path("/h/federated/vehicles/fl007")


def test_server_settings_round_trip_and_validation() -> None:
    s = ServerSettings(run_dir="/r", vehicles=5, strategy="krum", dp=True)
    assert ServerSettings.from_run_config(s.to_run_config()) == s
    for bad in ({"strategy": "nope"}, {"vehicles": 0}, {"fraction": 0.0}, {"quorum_frac": 2.0},
                {"dp": True, "dp_clipping_norm": 0.0}):
        with pytest.raises(ConfigError):
            ServerSettings(run_dir="/r", **{"vehicles": 5, **bad})


def test_vehicle_id_resolution() -> None:
    assert resolve_vehicle_id({"vehicle-id": "fl042"}) == "fl042"
    assert resolve_vehicle_id({"partition-id": 7, "num-partitions": 10}) == vehicle_id_for(7) == "fl007"
    with pytest.raises(ConfigError):
        resolve_vehicle_id({})


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dp", [False, True])
def test_every_strategy_builds(strategy: str, dp: bool) -> None:
    strat = build_strategy(ServerSettings(run_dir="/r", vehicles=10, strategy=strategy, fraction=0.5, dp=dp))
    inner = strat.strategy if dp else strat
    assert inner.fraction_train == 0.5 and inner.fraction_evaluate == 0.0 and inner.min_train_nodes == 5
    if dp:
        assert strat.num_sampled_clients == 5


def test_poison_assignment_is_seeded_and_sized() -> None:
    cfg = FlRunConfig(home=Path("/h"), registry_dir=Path("/r"), vehicles=10, poison=0.2, dropout=0.3, seed=3)
    faults = cfg.faults()
    assert faults == cfg.faults()  # seeded
    assert sorted(faults.values()) == ["scale50", "signflip"]  # dropouts are drawn per round, not here
    assert sorted(FlRunConfig(home=Path("/h"), registry_dir=Path("/r"), vehicles=10, poison=0.2,
                              poison_kind="signflip").faults().values()) == ["signflip"] * 2
    assert FlRunConfig(home=Path("/h"), registry_dir=Path("/r"), vehicles=10).faults() == {}
    with pytest.raises(ConfigError):
        FlRunConfig(home=Path("/h"), registry_dir=Path("/r"), dropout=1.0)


def test_round_dropouts_are_a_fresh_seeded_share_every_round() -> None:
    draws = [round_dropouts(10, 0.3, rnd, seed=0) for rnd in range(1, 21)]
    assert all(len(d) == 3 and d <= {vehicle_id_for(i) for i in range(10)} for d in draws)
    assert draws[0] == round_dropouts(10, 0.3, 1, seed=0)  # every vehicle computes the same set
    assert len({frozenset(d) for d in draws}) > 10  # a new draw each round, not a fixed 30 % of the fleet
    assert {v for d in draws for v in d} == {vehicle_id_for(i) for i in range(10)}  # everyone drops sometimes
    assert round_dropouts(10, 0.0, 1, seed=0) == set()
    assert round_dropouts(10, 0.3, 1, seed=1) != draws[0] or round_dropouts(10, 0.3, 2, seed=1) != draws[1]
    for bad in ({"dropout_frac": 1.0}, {"dropout_frac": -0.1}, {"dropout_mode": "vanish"}):
        with pytest.raises(ConfigError):
            VehicleSettings(home="/h", registry_dir="/r", **bad)


def test_vehicles_see_different_scenario_mixes() -> None:
    cfg = VehicleDataConfig(episodes=4)
    mixes = [vehicle_mix(vehicle_id_for(i), cfg) for i in range(10)]
    assert all(abs(sum(m.values()) - 1.0) < 1e-9 for m in mixes)
    assert len({round(m["highway"], 6) for m in mixes}) == 10  # non-IID: every vehicle its own mix
    assert vehicle_scenarios("fl003", cfg) == vehicle_scenarios("fl003", cfg)  # stable per vehicle
    assert vehicle_scenarios("fl003", cfg) != vehicle_scenarios("fl004", cfg)
