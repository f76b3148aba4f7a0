"""FlRunConfig composes the server's and the vehicles' settings: one default each (the CLI's and the demo's),
the run fills in what it derives, run names are unchanged from the flat config, the poison-kind table."""

from __future__ import annotations

import inspect
from dataclasses import fields, replace
from pathlib import Path

import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.federated.client import FAULTS, VehicleSettings
from driveloop.federated.run import POISON_KINDS, FlRunConfig, _digest, settings_for
from driveloop.federated.server import ServerSettings

BASE_SHA = "ab" * 32


def cfg(server: dict | None = None, vehicle: dict | None = None, **kw) -> FlRunConfig:
    return FlRunConfig(VehicleSettings(home="/h", registry_dir="/r", **(vehicle or {})), ServerSettings(**(server or {})), **kw)


def run_name(c: FlRunConfig) -> str:
    return f"run-{_digest({'cfg': c.run_key(), 'base': BASE_SHA})[:12]}"


def test_the_run_uses_the_settings_defaults_which_are_the_cli_ones() -> None:
    from driveloop._cli_fl import run

    c = cfg()
    assert c.server == ServerSettings() and c.vehicle == VehicleSettings(home="/h", registry_dir="/r")
    assert (c.server.rounds, c.server.quorum_frac, c.server.vehicles) == (100, 0.6, 10)
    cli = {name: p.default.default for name, p in inspect.signature(run).parameters.items()}  # typer OptionInfo
    flag_to_setting = [("rounds", c.server.rounds), ("vehicles", c.server.vehicles), ("strategy", c.server.strategy),
                       ("dp", c.server.dp), ("dp_noise", c.server.dp_noise_multiplier), ("dp_clip", c.server.dp_clipping_norm),
                       ("dp_delta", c.server.dp_delta),
                       ("fraction", c.server.fraction), ("quorum", c.server.quorum_frac),
                       ("deadline_s", c.server.round_deadline_s), ("close_at_quorum", c.server.close_at_quorum),
                       ("clip_factor", c.server.clip_median_factor), ("server_opt", c.server.server_opt),
                       ("server_lr", c.server.server_lr), ("dropout", c.vehicle.dropout_frac),
                       ("dropout_mode", c.vehicle.dropout_mode), ("local_epochs", c.vehicle.local_epochs),
                       ("episodes", c.vehicle.episodes), ("episode_s", c.vehicle.episode_s), ("seed", c.vehicle.data_seed),
                       ("poison", c.poison)]
    assert [(flag, cli[flag]) for flag, _ in flag_to_setting] == flag_to_setting


# (name, config, the run name the flat FlRunConfig gave it): reruns still find and resume their runs
RUN_NAMES = [
    ("defaults", cfg(), "run-e4bf38ba6363"),
    # DP now needs clip_median_factor 0 (federated/dp.py); a flat name, so this name is the flat scheme's too
    ("cli test flags", cfg({"rounds": 1, "vehicles": 4, "dp": True, "dp_noise_multiplier": 0.05, "dp_clipping_norm": 5.0,
                            "quorum_frac": 0.5, "clip_median_factor": 0.0}, {"episodes": 2, "episode_s": 10.0,
                                                                            "straggle_s": 600.0}), "run-b66cfc024e91"),
    ("everything renamed", cfg({"rounds": 3, "server_opt": "none", "clip_median_factor": 0.0, "vehicles": 12,
                                "strategy": "trimmedavg"},
                               {"local_epochs": 2, "optimizer": "adam", "batch_size": 64, "lr": 2e-4, "dropout_frac": 0.3,
                                "dropout_mode": "straggle", "data_seed": 5}, poison=0.2, base_ref="7"), "run-563a79546f8a"),
]


@pytest.mark.parametrize("name,config,expected", RUN_NAMES, ids=[r[0] for r in RUN_NAMES])
def test_run_names_are_those_of_the_flat_config(name: str, config: FlRunConfig, expected: str) -> None:
    assert run_name(config) == expected
    moved = replace(config, vehicle=replace(config.vehicle, home="/elsewhere", registry_dir="/x"), run_name="r",
                    evaluate=False)
    assert run_name(moved) == expected  # where the data lives and how the result is gated do not name a run


@pytest.mark.parametrize("server,vehicle", [({"trim_beta": 0.3}, {}), ({"server_beta2": 0.9}, {}), ({}, {"anchor_l2": 0.1}),
                                            ({}, {"mix_concentration": 2.0})])
def test_settings_the_flat_config_lacked_change_the_run_name(server: dict, vehicle: dict) -> None:
    assert run_name(cfg(server, vehicle)) != run_name(cfg())


def test_the_run_fills_in_what_it_derives() -> None:
    c = FlRunConfig(VehicleSettings(home="rel/h", registry_dir="rel/r", data_seed=3), ServerSettings(vehicles=10), poison=0.2)
    server, vehicle = settings_for(c, 7, Path("/h/federated/run-x"))
    assert server == ServerSettings(run_dir="/h/federated/run-x", vehicles=10, krum_malicious=2)
    assert (vehicle.home, vehicle.registry_dir, vehicle.base_ref, vehicle.fleet_size) == (
        str(Path("rel/h").resolve()), str(Path("rel/r").resolve()), "7", 10)
    assert vehicle.faults and sorted(f for _, f in (x.split(":") for x in vehicle.faults.split(","))) == ["scale50", "signflip"]
    assert [f.name for f in fields(VehicleSettings) if getattr(vehicle, f.name) != getattr(c.vehicle, f.name)] == [
        "home", "registry_dir", "base_ref", "faults", "fleet_size"]


RUN_SETS = [
    ("server.run_dir", {"run_dir": "/x"}, {}),
    ("server.krum_malicious", {"krum_malicious": 3}, {}),
    ("vehicle.base_ref", {}, {"base_ref": "released"}),
    ("vehicle.faults", {}, {"faults": "fl000:nan"}),
    ("vehicle.fleet_size", {}, {"fleet_size": 4}),
]


@pytest.mark.parametrize("name,server,vehicle", RUN_SETS, ids=[r[0] for r in RUN_SETS])
def test_what_the_run_derives_cannot_be_set(name: str, server: dict, vehicle: dict) -> None:
    with pytest.raises(ConfigError, match=f"{name} is set by the run"):
        cfg(server, vehicle)


POISON_ROWS = [("mixed", ("scale50", "signflip")), ("scale50", ("scale50",)), ("signflip", ("signflip",))]


@pytest.mark.parametrize("kind,faults", POISON_ROWS, ids=[r[0] for r in POISON_ROWS])
def test_every_poison_kind_maps_to_poisoning_faults(kind: str, faults: tuple[str, ...]) -> None:
    assert POISON_KINDS[kind] == faults and all(FAULTS[f].poison is not None for f in faults)
    assigned = cfg({"vehicles": 10}, poison=0.4, poison_kind=kind).faults()
    assert len(assigned) == 4 and set(assigned.values()) == set(faults)
    assert list(POISON_KINDS) == [r[0] for r in POISON_ROWS]


BAD_RUNS = [
    ("unknown poison kind", {"poison_kind": "nan"}, "unknown poison_kind 'nan'; valid: mixed, scale50, signflip"),
    ("poison share", {"poison": 1.0}, "must be a fraction in [0, 1)"),
    ("cpus", {"num_cpus": 0}, "num_cpus must be >= 1"),
]


@pytest.mark.parametrize("name,kw,message", BAD_RUNS, ids=[b[0] for b in BAD_RUNS])
def test_bad_run_fields_are_refused(name: str, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    assert message in str(e.value)
