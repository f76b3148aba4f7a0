"""``driveloop fl run``: a federated fine-tune on Flower's simulation runtime, then the pipeline's gate.

    base model (registry) -> K virtual vehicles (ClientApp), each on its own spool -> R rounds of the
    ServerApp (quorum/deadline, screening, strategy, checkpoint) -> ONNX export + parity
    -> closed-loop gate on the held-out suite, current vs candidate (the cloud pipeline's gate)
    -> registered as a candidate with lineage; validated only if the gate passed (else rejected).

**The simulation runs in Flower's own processes** (the supported path since ``run_simulation`` was
deprecated): a SuperLink in simulation mode on a free loopback port, its SuperExec, and the run's
``flwr-simulation`` process, started by ``deploy.start_simulation`` and submitted with ``flwr run`` like a
deployed run. The driver follows the run through its checkpoint (``deploy.wait_finished``: each round as
it lands, a dead process as an error with its log's tail) and stops every process it started. Their logs
go to ``<run_dir>/logs/``, never to the terminal.

**Ray rule.** The simulation's Ray runtime belongs to its process: held to ``num_cpus``, never joining
another (``RAY_ADDRESS=local``), gone with the process. A Ray runtime this process runs (the cloud
pipeline's) is neither joined nor shut down. Clients ask for 1 CPU each and train with one torch thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from driveloop.cloud.evaluation import EvalSuite, GateTolerances
from driveloop.core.exceptions import ConfigError, FederatedError, NoModelError
from driveloop.federated.client import VehicleSettings, format_faults, vehicle_id_for
from driveloop.federated.server import RoundCallback, ServerSettings, load_checkpoint

logger = logging.getLogger(__name__)


# --poison-kind -> the client faults the poisoned vehicles send, dealt out in turn (client.FAULTS names).
POISON_KINDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "mixed": ("scale50", "signflip"),
    "scale50": ("scale50",),
    "signflip": ("signflip",),
})
# What the run sets in the composed settings (from its other fields): they must be left at their defaults.
_RUN_SETS = {"server": ("run_dir", "krum_malicious"), "vehicle": ("base_ref", "faults", "fleet_size")}
# The flat names FlRunConfig's fields had before it composed the settings: the default run name is a digest
# of the settings under these names, so a rerun of a run named before still finds (and resumes) it.
_FLAT_NAMES = {
    "rounds": ("server", "rounds"), "vehicles": ("server", "vehicles"), "strategy": ("server", "strategy"),
    "fraction": ("server", "fraction"), "dp": ("server", "dp"), "dp_noise_multiplier": ("server", "dp_noise_multiplier"),
    "dp_clipping_norm": ("server", "dp_clipping_norm"), "quorum_frac": ("server", "quorum_frac"),
    "round_deadline_s": ("server", "round_deadline_s"), "close_at_quorum": ("server", "close_at_quorum"),
    "clip_median_factor": ("server", "clip_median_factor"), "max_update_norm": ("server", "max_update_norm"),
    "server_opt": ("server", "server_opt"), "server_lr": ("server", "server_lr"),
    "dropout": ("vehicle", "dropout_frac"), "dropout_mode": ("vehicle", "dropout_mode"),
    "straggle_s": ("vehicle", "straggle_s"), "episodes": ("vehicle", "episodes"), "episode_s": ("vehicle", "episode_s"),
    "local_epochs": ("vehicle", "local_epochs"), "local_optimizer": ("vehicle", "optimizer"),
    "batch_size": ("vehicle", "batch_size"), "lr": ("vehicle", "lr"), "seed": ("vehicle", "data_seed"),
}


@dataclass(frozen=True)
class FlRunConfig:
    """One ``fl run``: the server's and the vehicles' settings (each default defined there, once) plus what
    only the run has. ``vehicle.home``/``vehicle.registry_dir`` are the run's data directory and registry;
    ``vehicle.data_seed`` seeds both the vehicles' data and the poison assignment.

    The run fills in what it derives: ``server.run_dir`` (named by ``run_name`` or a digest of the
    settings), ``server.krum_malicious`` (from ``poison``), ``vehicle.base_ref`` (the resolved ``base_ref``),
    ``vehicle.faults`` (from ``poison``/``poison_kind``) and ``vehicle.fleet_size`` (``server.vehicles``).
    """

    vehicle: VehicleSettings
    server: ServerSettings = field(default_factory=ServerSettings)
    base_ref: str | None = None  # None: the newest released model, else the newest validated
    poison: float = 0.0  # share of vehicles sending poisoned updates (see poison_kind)
    poison_kind: str = "mixed"  # a key of POISON_KINDS
    num_cpus: int = 2
    run_name: str | None = None
    suite: EvalSuite = field(default_factory=EvalSuite)
    tolerances: GateTolerances = field(default_factory=GateTolerances)
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.poison < 1.0:
            raise ConfigError(f"--poison must be a fraction in [0, 1), got {self.poison}")
        if self.poison_kind not in POISON_KINDS:
            raise ConfigError(f"unknown poison_kind {self.poison_kind!r}; valid: {', '.join(POISON_KINDS)}")
        if self.num_cpus < 1:
            raise ConfigError("num_cpus must be >= 1")
        for part, names in _RUN_SETS.items():
            settings = getattr(self, part)
            for f in fields(settings):
                if f.name in names and getattr(settings, f.name) != f.default:
                    raise ConfigError(f"{part}.{f.name} is set by the run; leave it at its default")

    @property
    def home(self) -> Path:
        return Path(self.vehicle.home)

    @property
    def registry_dir(self) -> Path:
        return Path(self.vehicle.registry_dir)

    def faults(self) -> dict[str, str]:
        """Which vehicles send poisoned updates in every round (seeded). Dropouts are drawn per round
        (``client.round_dropouts``): a compromised vehicle stays compromised, a lost link comes back."""
        ids = [vehicle_id_for(i) for i in range(self.server.vehicles)]
        order = [ids[i] for i in np.random.default_rng(self.vehicle.data_seed).permutation(len(ids))]
        kinds = POISON_KINDS[self.poison_kind]
        return {vid: kinds[j % len(kinds)] for j, vid in enumerate(order[: round(self.poison * len(ids))])}

    def run_key(self) -> dict[str, Any]:
        """What names a run (digested into the default run name): every setting but where the data lives
        and how the result is gated, under its flat name (``_FLAT_NAMES``); settings that had no flat name
        count only when changed from their default, so the name of a run configured before is unchanged."""
        key: dict[str, Any] = {flat: getattr(getattr(self, part), name) for flat, (part, name) in _FLAT_NAMES.items()}
        key |= {"base_ref": self.base_ref, "poison": self.poison, "poison_kind": self.poison_kind, "num_cpus": self.num_cpus}
        for part in ("server", "vehicle"):
            settings = getattr(self, part)
            named = {n for p, n in _FLAT_NAMES.values() if p == part} | set(_RUN_SETS[part]) | {"home", "registry_dir"}
            key |= {f"{part}.{f.name}": getattr(settings, f.name) for f in fields(settings)
                    if f.name not in named and getattr(settings, f.name) != f.default}
        return key


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def settings_for(cfg: FlRunConfig, base_version: int, run_dir: Path) -> tuple[ServerSettings, VehicleSettings]:
    """The run's settings with what it derives filled in (see FlRunConfig)."""
    n = cfg.server.vehicles
    server = replace(cfg.server, run_dir=str(run_dir), krum_malicious=max(1, round(cfg.poison * n)))
    vehicle = replace(cfg.vehicle, home=str(cfg.home.resolve()), registry_dir=str(cfg.registry_dir.resolve()),
                      base_ref=str(base_version), faults=format_faults(cfg.faults()), fleet_size=n)
    return server, vehicle


# How long the simulation's processes get to start, and a finished run's simulation process to shut its
# Ray runtime down by itself, before they are stopped.
_START_TIMEOUT_S = 120.0
_EXIT_GRACE_S = 10.0


def simulate(server: ServerSettings, vehicle: VehicleSettings, initial: dict[str, np.ndarray], num_cpus: int = 2,
             on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the ServerApp and K ClientApps on Flower's simulation runtime (module doc); returns the run state.
    Resumes the run in ``server.run_dir`` after its last checkpointed round; ``on_round`` sees each round
    completed here as it lands."""
    from driveloop.federated.deploy import log_dir_of, start_simulation, submit, wait_finished

    run_dir = Path(server.run_dir)
    done = load_checkpoint(run_dir)
    after = 0 if done is None else int(done.state["completed_round"])
    if done is not None and done.state.get("finished") and after >= server.rounds:
        return done.state  # nothing left to run
    # The simulation's settings: one SuperNode per vehicle, each ClientApp on 1 CPU, Ray held to num_cpus
    # with its own logs in its session folder (log_to_driver off), WARNING and above.
    federation = {"num-supernodes": server.vehicles, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0,
                  "init-args-num-cpus": num_cpus, "init-args-num-gpus": 0, "init-args-logging-level": "WARNING",
                  "init-args-log-to-driver": False}
    sim = start_simulation(run_dir, timeout_s=_START_TIMEOUT_S)
    try:
        run_id = submit(run_dir, sim.port, {**server.to_run_config(), **vehicle.to_run_config()}, initial,
                        timeout_s=_START_TIMEOUT_S, federation_config=federation)
        sim.follow(run_id)
        logger.info("federated run %s: Flower run %s on the simulation SuperLink at port %d (logs in %s)",
                    run_dir.name, run_id, sim.port, log_dir_of(run_dir))
        budget_s = _START_TIMEOUT_S + (server.rounds - after) * (server.round_deadline_s + 60.0)
        state = wait_finished(run_dir, budget_s, poll_s=0.2, on_round=on_round, after_round=after, check=sim.check,
                              rounds=server.rounds)
        if not sim.wait_simulation_exit(_EXIT_GRACE_S):
            logger.warning("the simulation process of run %s did not exit within %g s: stopping it",
                           run_dir.name, _EXIT_GRACE_S)
    finally:
        sim.stop()
    return state


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
        try:
            base = registry.learning_base(cfg.base_ref)  # resolve(), a variant → its parent
        except NoModelError as e:
            raise FederatedError("no released or validated model to fine-tune from "
                                 "(run `driveloop bootstrap` first)") from e
    initial = {k: v.detach().cpu().numpy() for k, v in load_weights(cfg.registry_dir, base.manifest).items()}
    run_name = cfg.run_name or f"run-{_digest({'cfg': cfg.run_key(), 'base': base.manifest.sha256})[:12]}"
    run_dir = cfg.home / "federated" / run_name
    server, vehicle = settings_for(cfg, base.version, run_dir)
    return base, initial, run_dir, server, vehicle


@dataclass(frozen=True)
class FlTrained:
    """A federated run's rounds done, not yet gated: what ``finish`` needs. Apart from ``finish`` so that a
    caller can train beside other work and gate/register the candidates in an order of its own."""

    base: Any  # the registry artifact the run fine-tuned from
    run_dir: Path
    server: ServerSettings
    state: dict[str, Any]  # the final run state (rounds, dp, finished)
    extra: dict[str, Any]  # report fields of this runtime (samples per vehicle, Flower run id)


def train_federated(cfg: FlRunConfig, on_round: RoundCallback | None = None, on_vehicle: Any = None) -> FlTrained:
    """The rounds of an ``fl run`` on the simulation runtime: prepare the vehicles, then simulate."""
    base, initial, run_dir, server, vehicle = _start(cfg)
    samples = prepare_vehicles(vehicle, server.vehicles, on_vehicle)
    state = simulate(server, vehicle, initial, cfg.num_cpus, on_round)
    return FlTrained(base, run_dir, server, state, {"samples_per_vehicle": samples})


def run_federated(cfg: FlRunConfig, on_round: RoundCallback | None = None, on_vehicle: Any = None) -> dict[str, Any]:
    """The whole ``fl run`` on the simulation runtime: simulate, export, gate, register (see ``--json``)."""
    return finish(cfg, train_federated(cfg, on_round, on_vehicle))


def run_deployed(cfg: FlRunConfig, superlink_port: int, timeout_s: float = 3600.0) -> dict[str, Any]:
    """The same run on a deployed SuperLink (its SuperNodes already connected): submit with ``flwr run``,
    wait for the ServerApp's final checkpoint, then export, gate and register exactly like ``fl run``."""
    from driveloop.federated.deploy import submit, wait_finished

    base, initial, run_dir, server, vehicle = _start(cfg)
    run_id = submit(run_dir, superlink_port, {**server.to_run_config(), **vehicle.to_run_config()}, initial)
    state = wait_finished(run_dir, timeout_s, rounds=server.rounds)
    return finish(cfg, FlTrained(base, run_dir, server, state, {"flower_run_id": run_id}))


def finish(cfg: FlRunConfig, trained: FlTrained) -> dict[str, Any]:
    """Export a trained run's aggregated model, gate it against the base, register it with lineage (the
    ``fl run`` report): the cloud pipeline's own ``gate_and_register`` (same parity check, same cached
    gate, same stage rules)."""
    base, run_dir, server, state, extra = trained.base, trained.run_dir, trained.server, trained.state, trained.extra
    import torch

    arrays = load_checkpoint(run_dir).arrays  # type: ignore[union-attr]
    aggregated = [r for r in state["rounds"] if not r["skipped"]]
    if not aggregated:
        raise FederatedError(f"no round of run {run_dir.name} reached quorum: the base model is unchanged")
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    report: dict[str, Any] = {
        "run": run_dir.name, "strategy": server.strategy, "base_version": base.version, "vehicles": server.vehicles,
        "rounds": len(state["rounds"]), "rounds_aggregated": len(aggregated),
        "participants_per_round": [r["accepted"] for r in state["rounds"]], **extra,
        "round_log": state["rounds"], "faults": cfg.faults(),
        "dropout": {"fraction": cfg.vehicle.dropout_frac, "mode": cfg.vehicle.dropout_mode},
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
               "strategy": server.strategy, "participants_per_round": report["participants_per_round"],
               "vehicles": server.vehicles, "fraction": server.fraction, "dp": state.get("dp"),
               "server_optimizer": {"kind": server.server_opt, "lr": server.server_lr}}
    with Registry(cfg.registry_dir) as registry:
        shipped = gate_and_register(
            weights, base, registry, registry_dir=cfg.registry_dir, work_dir=run_dir,
            eval_cache_dir=cfg.home / "cloud" / "eval_cache", suite=cfg.suite, tolerances=cfg.tolerances,
            dataset_version=None, metrics={},
            training_run={"run_id": run_dir.name, "kind": "federated", "server": asdict(server),
                          "local_epochs": cfg.vehicle.local_epochs, "local_optimizer": cfg.vehicle.optimizer,
                          "lr": cfg.vehicle.lr, "batch_size": cfg.vehicle.batch_size},
            lineage=lineage)
    report.update({"candidate": shipped.version, "candidate_stage": shipped.stage, "gate": shipped.gate.as_dict(),
                   "parity_max_abs": shipped.parity_max_abs,
                   "execution": shipped.execution.to_dict() if shipped.execution else {}})  # the gate's episodes
    return report
