"""Federated fine-tuning with Flower (Message API): vehicles train on their own data, the server
aggregates robustly, the result goes through the cloud pipeline's gate and registry.

Import-light: Flower, torch and Ray are imported only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "STRATEGIES",
    "FlRunConfig",
    "QuorumPolicy",
    "RobustConfig",
    "ServerSettings",
    "VehicleDataConfig",
    "VehicleSettings",
    "build_strategy",
    "load_checkpoint",
    "local_dataset",
    "make_client_app",
    "make_server_app",
    "round_state",
    "run_federated",
    "run_rounds",
    "screen_round",
    "simulate",
    "vehicle_id_for",
    "vehicle_mix",
]

_WHERE = {
    "FlRunConfig": "run", "run_federated": "run", "run_deployed": "run", "simulate": "run", "prepare_vehicles": "run",
    "ServerSettings": "server", "make_server_app": "server", "run_rounds": "server", "build_strategy": "server",
    "load_checkpoint": "server", "STRATEGIES": "server",
    "VehicleSettings": "client", "make_client_app": "client", "vehicle_id_for": "client",
    "RobustConfig": "robust", "screen_round": "robust", "QuorumPolicy": "_quorum", "round_state": "_quorum",
    "VehicleDataConfig": "vehicle_data", "local_dataset": "vehicle_data", "vehicle_mix": "vehicle_data",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"driveloop.federated.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'driveloop.federated' has no attribute {name!r}")
