"""The Flower app objects a deployed SuperLink/SuperNode loads (``flwr run``): the same ServerApp and
ClientApp as the simulation, reading their settings from the run config (``server.*``, ``vehicle.*``)."""

from __future__ import annotations

from driveloop.federated.client import make_client_app
from driveloop.federated.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
