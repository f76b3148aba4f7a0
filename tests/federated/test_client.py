"""Vehicle-side pure parts: fault parsing, poisoned updates, settings round trip, fault assignment,
non-IID mixes, strategy construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.federated.client import (
    DROPOUT_MODES,
    FAULTS,
    VehicleSettings,
    format_faults,
    parse_faults,
    poison,
    resolve_vehicle_id,
    round_dropouts,
    vehicle_fault,
    vehicle_id_for,
)
from driveloop.federated.dp import DP_STRATEGIES
from driveloop.federated.run import FlRunConfig
from driveloop.federated.server import STRATEGIES, STRATEGY_BUILDERS, ServerSettings, build_strategy, strategy_builder
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
    s = ServerSettings(run_dir="/r", vehicles=5, strategy="fedprox", dp=True, dp_delta=1e-3, clip_median_factor=0.0)
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


STRATEGY_DP = [(name, False) for name in STRATEGIES] + [(name, True) for name in DP_STRATEGIES]


@pytest.mark.parametrize("strategy,dp", STRATEGY_DP, ids=[f"{n}{'-dp' if d else ''}" for n, d in STRATEGY_DP])
def test_every_strategy_builds(strategy: str, dp: bool) -> None:
    """With DP only the mean strategies (tests/federated/test_dp.py: the others are refused)."""
    strat = build_strategy(ServerSettings(run_dir="/r", vehicles=10, strategy=strategy, fraction=0.5, dp=dp,
                                          clip_median_factor=0.0 if dp else 3.0))
    inner = strat.strategy if dp else strat
    assert inner.fraction_train == 0.5 and inner.fraction_evaluate == 0.0 and inner.min_train_nodes == 5
    if dp:
        assert strat.num_sampled_clients == 5


# strategy name, the Flower strategy it builds, the setting it passes on (attribute, value)
STRATEGY_ROWS = [
    ("fedavg", "FedAvg", None),
    ("fedprox", "FedProx", ("proximal_mu", 0.25)),
    ("fedmedian", "FedMedian", None),
    ("trimmedavg", "FedTrimmedAvg", ("beta", 0.3)),
    ("krum", "Krum", ("num_malicious_nodes", 2)),
]


@pytest.mark.parametrize("name,cls,passed", STRATEGY_ROWS, ids=[r[0] for r in STRATEGY_ROWS])
def test_every_strategy_name_maps_to_its_flower_strategy(name: str, cls: str, passed) -> None:
    strat = build_strategy(ServerSettings(run_dir="/r", strategy=name, proximal_mu=0.25, trim_beta=0.3, krum_malicious=2))
    assert type(strat).__name__ == cls
    if passed is not None:
        assert getattr(strat, passed[0]) == passed[1]
    assert strategy_builder(name) is STRATEGY_BUILDERS[name]


def test_the_strategy_table_is_the_whole_vocabulary() -> None:
    assert STRATEGIES == tuple(STRATEGY_BUILDERS) == tuple(r[0] for r in STRATEGY_ROWS)


VALID_STRATEGIES = "valid: fedavg, fedprox, fedmedian, trimmedavg, krum"
UNKNOWN_STRATEGIES = [
    ("lookup", lambda: strategy_builder("fedsgd"), f"unknown strategy 'fedsgd'; {VALID_STRATEGIES}"),
    ("settings", lambda: ServerSettings(strategy="FedAvg"), f"unknown strategy 'FedAvg'; {VALID_STRATEGIES}"),
    ("run config", lambda: ServerSettings.from_run_config({"server.run_dir": "/r", "server.vehicles": 3,
                                                          "server.strategy": ""}), f"unknown strategy ''; {VALID_STRATEGIES}"),
]


@pytest.mark.parametrize("name,call,message", UNKNOWN_STRATEGIES, ids=[u[0] for u in UNKNOWN_STRATEGIES])
def test_unknown_strategies_are_refused_with_the_valid_names(name: str, call, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        call()
    assert message in str(e.value)


def test_poison_assignment_is_seeded_and_sized() -> None:
    def run(seed: int = 0, dropout: float = 0.0, **kw) -> FlRunConfig:
        return FlRunConfig(VehicleSettings(home="/h", registry_dir="/r", data_seed=seed, dropout_frac=dropout),
                           ServerSettings(vehicles=10), **kw)

    cfg = run(seed=3, dropout=0.3, poison=0.2)
    faults = cfg.faults()
    assert faults == cfg.faults()  # seeded
    assert sorted(faults.values()) == ["scale50", "signflip"]  # dropouts are drawn per round, not here
    assert faults != run(seed=4, poison=0.2).faults()
    assert sorted(run(poison=0.2, poison_kind="signflip").faults().values()) == ["signflip"] * 2
    assert run().faults() == {}
    with pytest.raises(ConfigError):
        run(dropout=1.0)


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


# name, what the row does: the poisoned update it sends (None: the honest one), dropped, straggling, impostor
FAULT_ROWS = [
    ("scale50", lambda out: np.allclose(out["w"], 5.0), False, False, False),
    ("signflip", lambda out: np.allclose(out["w"], -0.1), False, False, False),
    ("dropout", None, True, False, False),
    ("straggle", None, False, True, False),
    ("nan", lambda out: not np.all(np.isfinite(out["w"])), False, False, False),
    ("shape", lambda out: out["w"].shape == (2, 2, 2), False, False, False),
    ("impostor", None, False, False, True),
]


@pytest.mark.parametrize("name,poisoned,drop,straggle,impostor", FAULT_ROWS, ids=[r[0] for r in FAULT_ROWS])
def test_every_vehicle_fault_maps_to_its_behaviour(name: str, poisoned, drop: bool, straggle: bool, impostor: bool) -> None:
    f = vehicle_fault(name)
    assert f is FAULTS[name] and (f.drop, f.straggle, f.impostor) == (drop, straggle, impostor)
    assert (f.poison is None) == (poisoned is None)
    out = poison(HONEST, BASE, name)
    assert out is HONEST if poisoned is None else poisoned(out)
    assert parse_faults(f"fl003:{name}") == {"fl003": name}


def test_the_fault_table_is_the_whole_vocabulary() -> None:
    assert list(FAULTS) == [r[0] for r in FAULT_ROWS]
    assert DROPOUT_MODES == ("dropout", "straggle")  # the faults a round_dropouts draw can take


VALID_FAULTS = "valid: scale50, signflip, dropout, straggle, nan, shape, impostor"
UNKNOWN_FAULTS = [
    ("lookup", lambda: vehicle_fault("explode"), f"unknown fault 'explode'; {VALID_FAULTS}"),
    ("parse", lambda: parse_faults("fl001:explode"), f"unknown fault 'explode' for 'fl001'; {VALID_FAULTS}"),
    ("parse without a fault", lambda: parse_faults("fl001"), f"unknown fault '' for 'fl001'; {VALID_FAULTS}"),
    ("poison", lambda: poison(HONEST, BASE, "explode"), f"unknown fault 'explode'; {VALID_FAULTS}"),
    ("settings", lambda: VehicleSettings(home="/h", registry_dir="/r", faults="fl000:Nan"), "unknown fault 'Nan'"),
    ("dropout mode", lambda: VehicleSettings(home="/h", registry_dir="/r", dropout_mode="nan"),
     "unknown dropout_mode 'nan'; valid: dropout, straggle"),
]


@pytest.mark.parametrize("name,call,message", UNKNOWN_FAULTS, ids=[u[0] for u in UNKNOWN_FAULTS])
def test_unknown_vehicle_faults_are_refused_with_the_valid_names(name: str, call, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        call()
    assert message in str(e.value)
