"""driveloop.ota — signed releases (TUF), the director, the rollout controller, health gates, the fleet
server, metrics, dashboard and Grafana. See docs/ARCHITECTURE.md.

Imports core, contracts, safety, sim and edge; never cloud (the registry is reached through the
``RegistryLike`` Protocol in ``ota.release``). Public names are lazy: python-tuf loads only when used.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ReleaseService": "release", "TargetInfo": "release", "RepoPolicy": "release", "KeyStore": "keys",
    "OfflineRoot": "offline_root", "DirectorRepo": "director_repo",
    "RolloutPlan": "controller", "StageSpec": "controller", "RolloutState": "controller", "Decision": "controller",
    "OperatorAction": "controller", "decide": "controller", "apply": "controller", "replay": "controller",
    "GateTolerances": "gates", "HealthWindow": "gates", "aggregate": "gates", "assign": "director",
    "JsonlAuditLog": "audit", "FleetStore": "store",
    "ServerConfig": "server", "create_app": "server", "SimConfig": "simulate", "SimResult": "simulate",
    "provision": "grafana", "PromHealthSource": "promql",
})
