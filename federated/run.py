"""``driveloop fl run``: a federated fine-tune on Flower's simulation runtime, then the pipeline's gate.

    base model (registry) -> K virtual vehicles (ClientApp), each on its own spool -> R rounds of the
    ServerApp (quorum/deadline, screening, strategy, checkpoint) -> ONNX export + parity
    -> closed-loop gate on the held-out suite, current vs candidate (the cloud pipeline's gate)
    -> registered as a candidate with lineage; validated only if the gate passed (else rejected).

**Ray rule.** Flower's Ray backend starts Ray only when none is running and calls ``ray.shutdown()``
when the simulation ends. When this process already runs a Ray runtime (one the cloud pipeline shares),
the simulation runs inside ``cloud._ray.shared_runtime()``: Flower joins that runtime and its shutdown is
a logged no-op, so the pipeline's runtime survives. Otherwise Flower starts a private runtime held to
``num_cpus`` and shuts it down itself. Clients ask for 1 CPU each and train with one torch thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.evaluation import EvalSuite, GateTolerances
from driveloop.core.exceptions import ConfigError, FederatedError, RegistryError
from driveloop.federated.client import DROPOUT_MODES, VehicleSettings, format_faults, vehicle_id_for
from driveloop.federated.server import (
    ReplyCallback,
    RoundCallback,
    ServerSettings,
    load_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlRunConfig:
    home: Path
    registry_dir: Path
    rounds: int = 100  # one gradient step each (see local_optimizer); docs/BENCHMARKS.md: 100 reach the central result
    vehicles: int = 10
    strategy: str = "fedavg"
    fraction: float = 1.0
    dropout: float = 0.0  # share of vehicles that drop out mid-round: a fresh seeded draw every round
    dropout_mode: str = "dropout"  # dropout: the vehicle errors out mid-round | straggle: it answers too late
    straggle_s: float = 60.0
    poison: float = 0.0  # share of vehicles sending poisoned updates (alternating x50-scaled / sign-flipped)
    poison_kind: str = "mixed"  # mixed | scale50 | signflip
    dp: bool = False
    dp_noise_multiplier: float = 0.1
    dp_clipping_norm: float = 1.0
    quorum_frac: float = 0.6
    round_deadline_s: float = 300.0
    close_at_quorum: bool = False
    clip_median_factor: float = 3.0
    max_update_norm: float = 0.0
    base_ref: str | None = None
    episodes: int = 3
    episode_s: float = 20.0
    local_epochs: int = 1
    local_optimizer: str = "sgd"  # with batch_size 0 and lr 1.0 the update is the vehicle's full-batch gradient
    batch_size: int = 0
    lr: float = 1.0  # the vehicles' local step; the server's Adam makes the global step (server_lr)
    server_opt: str = "adam"
    server_lr: float = 3e-4
    seed: int = 0
    num_cpus: int = 2
    run_name: str | None = None
    suite: EvalSuite = field(default_factory=EvalSuite)
    tolerances: GateTolerances = field(default_factory=GateTolerances)
    evaluate: bool = True

    def __post_init__(self) -> None:
        for name in ("dropout", "poison"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{name} must be a fraction in [0, 1), got {v}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"dropout_mode must be dropout or straggle, got {self.dropout_mode!r}")
        if self.poison_kind not in ("mixed", "scale50", "signflip"):
            raise ConfigError(f"poison_kind must be mixed, scale50 or signflip, got {self.poison_kind!r}")
        if self.num_cpus < 1:
            raise ConfigError("num_cpus must be >= 1")

    def faults(self) -> dict[str, str]:
        """Which vehicles send poisoned updates in every round (seeded). Dropouts are drawn per round
        (``client.round_dropouts``): a compromised vehicle stays compromised, a lost link comes back."""
        ids = [vehicle_id_for(i) for i in range(self.vehicles)]
        order = [ids[i] for i in np.random.default_rng(self.seed).permutation(len(ids))]
        kinds = ("scale50", "signflip") if self.poison_kind == "mixed" else (self.poison_kind,)
        return {vid: kinds[j % len(kinds)] for j, vid in enumerate(order[: round(self.poison * len(ids))])}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def resolve_base(registry: Any, ref: str | None) -> Any:
    """The model to fine-tune: ``ref``, else the newest released, else the newest validated."""
    if ref is not None:
        return registry.get(ref)
    for stage in ("released", "validated"):
        with contextlib.suppress(RegistryError):
            return registry.get(stage)
    raise FederatedError("no released or validated model to fine-tune from (run `driveloop bootstrap` first)")


def settings_for(cfg: FlRunConfig, base_version: int, run_dir: Path) -> tuple[ServerSettings, VehicleSettings]:
    server = ServerSettings(
        run_dir=str(run_dir), vehicles=cfg.vehicles, rounds=cfg.rounds, strategy=cfg.strategy, fraction=cfg.fraction,
        quorum_frac=cfg.quorum_frac, round_deadline_s=cfg.round_deadline_s, close_at_quorum=cfg.close_at_quorum,
        max_update_norm=cfg.max_update_norm,
        clip_median_factor=cfg.clip_median_factor, krum_malicious=max(1, round(cfg.poison * cfg.vehicles)),
        dp=cfg.dp, dp_noise_multiplier=cfg.dp_noise_multiplier, dp_clipping_norm=cfg.dp_clipping_norm,
        server_opt=cfg.server_opt, server_lr=cfg.server_lr,
    )
    vehicle = VehicleSettings(
        home=str(Path(cfg.home).resolve()), registry_dir=str(Path(cfg.registry_dir).resolve()), base_ref=str(base_version),
        episodes=cfg.episodes, episode_s=cfg.episode_s, local_epochs=cfg.local_epochs, lr=cfg.lr, data_seed=cfg.seed,
        optimizer=cfg.local_optimizer, batch_size=cfg.batch_size,
        faults=format_faults(cfg.faults()), straggle_s=cfg.straggle_s, dropout_frac=cfg.dropout,
        dropout_mode=cfg.dropout_mode, fleet_size=cfg.vehicles,
    )
    return server, vehicle


@contextlib.contextmanager
def _ray_guard() -> Any:
    """Keep a Ray runtime this process already runs alive across Flower's ray.shutdown() (module doc)."""
    import ray

    if ray.is_initialized():
        from driveloop.cloud.ray_runtime import shared_runtime

        with shared_runtime():
            yield
    else:
        yield


def simulate(server: ServerSettings, vehicle: VehicleSettings, initial: dict[str, np.ndarray], num_cpus: int = 2,
             on_round: RoundCallback | None = None, on_reply: ReplyCallback | None = None) -> dict[str, Any]:
    """Run the ServerApp and K ClientApps on Flower's Ray simulation backend; returns the run state."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation

    from driveloop.federated.client import make_client_app
    from driveloop.federated.server import make_server_app

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "include_dashboard": False, "logging_level": logging.WARNING,
                             "log_to_driver": False}}
    with _ray_guard():
        run_simulation(server_app=make_server_app(server, initial, on_round, on_reply), client_app=make_client_app(vehicle),
                       num_supernodes=server.vehicles, backend_config=backend)  # type: ignore[arg-type]
    done = load_checkpoint(Path(server.run_dir))
    if done is None or done.state["completed_round"] < server.rounds:
        got = 0 if done is None else done.state["completed_round"]
        raise FederatedError(f"the federated run stopped after {got} of {server.rounds} rounds (see the log)")
    return done.state


def prepare_vehicles(vehicle: VehicleSettings, count: int, on_vehicle: Any = None) -> dict[str, int]:
    """Let every vehicle fill its spool and label its own data before round 1 (the same code the
    ClientApp runs on its first round), so that rounds time training, not first drives."""
    from driveloop.cloud.registry import Registry
    from driveloop.federated.vehicle_data import VehicleDataConfig, local_dataset

    data_cfg = VehicleDataConfig(episodes=vehicle.episodes, episode_s=vehicle.episode_s,
                                 mix_concentration=vehicle.mix_concentration, seed=vehicle.data_seed)
    samples: dict[str, int] = {}
    with Registry(vehicle.registry_dir) as reg:
        artifact = reg.get(vehicle.base_ref)
        for i in range(count):
            vid = vehicle_id_for(i)
            samples[vid] = len(local_dataset(vehicle.vehicle_dir(vid), vid, artifact, data_cfg)["target_action"])
            if callable(on_vehicle):
                on_vehicle(vid)
    return samples


def _start(cfg: FlRunConfig) -> tuple[Any, dict[str, np.ndarray], Path, ServerSettings, VehicleSettings]:
    """(base artifact, start weights, run dir, server settings, vehicle settings) of a run."""
    from driveloop.cloud.checkpoints import load_weights
    from driveloop.cloud.registry import Registry

    with Registry(cfg.registry_dir) as registry:
        base = resolve_base(registry, cfg.base_ref)
    initial = {k: v.detach().cpu().numpy() for k, v in load_weights(cfg.registry_dir, base.manifest).items()}
    key = {k: v for k, v in asdict(cfg).items() if k not in ("home", "registry_dir", "run_name", "suite", "tolerances", "evaluate")}
    run_name = cfg.run_name or f"run-{_digest({'cfg': key, 'base': base.manifest.sha256})[:12]}"
    run_dir = Path(cfg.home) / "federated" / run_name
    server, vehicle = settings_for(cfg, base.version, run_dir)
    return base, initial, run_dir, server, vehicle


def run_federated(cfg: FlRunConfig, on_round: RoundCallback | None = None, on_vehicle: Any = None) -> dict[str, Any]:
    """The whole ``fl run`` on the simulation runtime: simulate, export, gate, register (see ``--json``)."""
    base, initial, run_dir, server, vehicle = _start(cfg)
    samples = prepare_vehicles(vehicle, cfg.vehicles, on_vehicle)
    state = simulate(server, vehicle, initial, cfg.num_cpus, on_round)
    return finish_run(cfg, base, run_dir, server, state, {"samples_per_vehicle": samples})


def run_deployed(cfg: FlRunConfig, superlink_port: int, timeout_s: float = 3600.0) -> dict[str, Any]:
    """The same run on a deployed SuperLink (its SuperNodes already connected): submit with ``flwr run``,
    wait for the ServerApp's final checkpoint, then export, gate and register exactly like ``fl run``."""
    from driveloop.federated.deploy import submit, wait_finished

    base, initial, run_dir, server, vehicle = _start(cfg)
    run_id = submit(run_dir, superlink_port, {**server.to_run_config(), **vehicle.to_run_config()}, initial)
    state = wait_finished(run_dir, timeout_s)
    return finish_run(cfg, base, run_dir, server, state, {"flower_run_id": run_id})


def finish_run(cfg: FlRunConfig, base: Any, run_dir: Path, server: ServerSettings, state: dict[str, Any],
               extra: dict[str, Any]) -> dict[str, Any]:
    """Export the aggregated model, gate it against the base, register it with lineage: the cloud
    pipeline's own ``gate_and_register`` (same parity check, same cached gate, same stage rules)."""
    import torch

    arrays = load_checkpoint(run_dir).arrays  # type: ignore[union-attr]
    aggregated = [r for r in state["rounds"] if not r["skipped"]]
    if not aggregated:
        raise FederatedError(f"no round of run {run_dir.name} reached quorum: the base model is unchanged")
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    report: dict[str, Any] = {
        "run": run_dir.name, "strategy": cfg.strategy, "base_version": base.version, "vehicles": cfg.vehicles,
        "rounds": len(state["rounds"]), "rounds_aggregated": len(aggregated),
        "participants_per_round": [r["accepted"] for r in state["rounds"]], **extra,
        "round_log": state["rounds"], "faults": cfg.faults(), "dropout": {"fraction": cfg.dropout, "mode": cfg.dropout_mode},
        "dp": state.get("dp"), "parity_max_abs": None,
        "candidate": None, "candidate_stage": None, "gate": {},
    }
    if not cfg.evaluate:
        from driveloop.cloud.export import check_parity, export_onnx
        from driveloop.cloud.model import PolicyNet

        model = PolicyNet()
        model.load_state_dict(weights)
        report["parity_max_abs"] = float(check_parity(model, export_onnx(model, run_dir / "candidate.onnx")))
        return report
    from driveloop.cloud.pipeline import gate_and_register
    from driveloop.cloud.registry import Registry

    lineage = {"base_version": base.version, "kind": "federated", "rounds": len(state["rounds"]),
               "strategy": cfg.strategy, "participants_per_round": report["participants_per_round"],
               "vehicles": cfg.vehicles, "fraction": cfg.fraction, "dp": state.get("dp"),
               "server_optimizer": {"kind": cfg.server_opt, "lr": cfg.server_lr}}
    with Registry(cfg.registry_dir) as registry:
        shipped = gate_and_register(
            weights, base, registry, registry_dir=Path(cfg.registry_dir), work_dir=run_dir,
            eval_cache_dir=Path(cfg.home) / "cloud" / "eval_cache", suite=cfg.suite, tolerances=cfg.tolerances,
            dataset_version=None, metrics={},
            training_run={"run_id": run_dir.name, "kind": "federated", "server": asdict(server),
                          "local_epochs": cfg.local_epochs, "local_optimizer": cfg.local_optimizer, "lr": cfg.lr,
                          "batch_size": cfg.batch_size},
            lineage=lineage)
    report.update({"candidate": shipped.version, "candidate_stage": shipped.stage, "gate": shipped.gate.as_dict(),
                   "parity_max_abs": shipped.parity_max_abs})
    return report
