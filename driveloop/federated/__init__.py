"""driveloop.federated — federated fine-tuning with Flower (Message API): vehicles train on their own
data, the server aggregates robustly, the result goes through the cloud pipeline's gate and registry.

Imports every lower layer (core … cloud); Flower, torch and Ray load only when a function needs them.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "FlRunConfig": "run", "run_federated": "run", "run_deployed": "run", "simulate": "run", "prepare_vehicles": "run",
    "train_federated": "run", "FlTrained": "run",
    "ServerSettings": "server", "make_server_app": "server", "run_rounds": "server", "build_strategy": "server",
    "load_checkpoint": "server", "STRATEGIES": "server",
    "VehicleSettings": "client", "make_client_app": "client", "vehicle_id_for": "client",
    "DP_STRATEGIES": "dp", "RobustConfig": "robust", "screen_round": "robust", "QuorumPolicy": "quorum", "round_state": "quorum",
    "VehicleDataConfig": "vehicle_data", "local_dataset": "vehicle_data", "vehicle_mix": "vehicle_data",
})
