"""driveloop.ota — see DESIGN.md. Public API listed in __all__ (kept import-light)."""

from __future__ import annotations

__all__: list[str] = []

# Signed releases (lazy: python-tuf loads only when these names are used).
_LAZY_RELEASE_API = {"ReleaseService": "release", "TargetInfo": "release", "RepoPolicy": "_tuf_repo", "KeyStore": "keys"}
__all__ += list(_LAZY_RELEASE_API)

# Rollouts: controller, gates, director, audit, fleet server, simulation (lazy too; resolved by __getattr__).
_LAZY_ROLLOUT_API = {
    "RolloutPlan": "controller", "StageSpec": "controller", "RolloutState": "controller", "Decision": "controller",
    "OperatorAction": "controller", "decide": "controller", "apply": "controller", "replay": "controller",
    "GateTolerances": "gates", "HealthWindow": "gates", "aggregate": "gates", "assign": "director",
    "HealthReport": "messages", "UpdateOffer": "messages", "JsonlAuditLog": "audit", "FleetStore": "store",
    "ServerConfig": "server", "create_app": "server", "SimConfig": "simulate", "SimResult": "simulate",
    "provision": "grafana", "PromHealthSource": "promql",
}
_LAZY_RELEASE_API.update(_LAZY_ROLLOUT_API)
__all__ += list(_LAZY_ROLLOUT_API)


def __getattr__(name: str) -> object:
    if name in _LAZY_RELEASE_API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_RELEASE_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
