"""Federated fixtures: a data directory with a random-weight model and three vehicles whose spools
are already filled (tiny: one short episode each), copied per test so tests never share state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

VEHICLES = 4
EPISODE_S = 10.0


def _drive_ccr(home: Path) -> None:
    """Fill each vehicle's spool with one CCR approach (the random model brakes late: AEB events, so
    every vehicle has hard frames and a non-zero update). A filled spool is what a vehicle trains on."""
    from driveloop.cloud.registry import Registry
    from driveloop.edge.drive import open_client, recorder_factory
    from driveloop.edge.fleet import VehiclePlan, run_fleet
    from driveloop.federated.client import vehicle_id_for

    with Registry(home / "registry") as reg:
        art = reg.get("validated")
    client, _ = open_client(art, isolate=False, fault=None, device="cpu")
    for i in range(VEHICLES):
        vid = vehicle_id_for(i)
        factory = recorder_factory(home / "federated" / "vehicles" / vid / "spool", 1 << 28, str(art.manifest.version))
        run_fleet([VehiclePlan(vid, ("ccrs-30", "ccrm-50", "ccrs-50", "ccrb-12-6")[i % 4], 500 + i)], {"default": client},
                  EPISODE_S, recorder_factory=factory)


@pytest.fixture(scope="session")
def fl_home_template(tmp_path_factory, random_home) -> Path:
    from driveloop.federated.client import VehicleSettings
    from driveloop.federated.run import prepare_vehicles

    home = tmp_path_factory.mktemp("fl_home")
    shutil.copytree(random_home, home, dirs_exist_ok=True)
    _drive_ccr(home)
    vs = VehicleSettings(home=str(home), registry_dir=str(home / "registry"), base_ref="validated", episodes=2,
                         episode_s=EPISODE_S, local_epochs=1)
    prepare_vehicles(vs, VEHICLES)
    return home


@pytest.fixture
def fl_home(fl_home_template, tmp_path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(fl_home_template, home)
    return home


def vehicle_settings(home: Path, faults: str = "", **kw):
    from driveloop.federated.client import VehicleSettings

    return VehicleSettings(home=str(home), registry_dir=str(home / "registry"), base_ref="validated", episodes=2,
                           episode_s=EPISODE_S, local_epochs=1, faults=faults, **kw)


def base_arrays(home: Path):
    from driveloop.cloud.checkpoints import load_weights
    from driveloop.cloud.registry import Registry

    with Registry(home / "registry") as reg:
        art = reg.get("validated")
    return {k: v.numpy() for k, v in load_weights(home / "registry", art.manifest).items()}
