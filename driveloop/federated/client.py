"""The vehicle side of federated fine-tuning: a Flower ClientApp (Message API).

On a ``train`` message a vehicle: loads the global weights from the message, builds its *own* dataset
from its *own* spool (``vehicle_data``: drives its seeded mix first when the spool is empty, then mines
and hindsight-labels locally), runs the cloud's ``finetune`` step from the global weights, and replies
with exactly three records:

- ``arrays``: the updated model tensors (same names and shapes as the global model, nothing else);
- ``metrics``: numbers only (``num-examples``, losses, seconds);
- ``meta``: the vehicle id.

No segment bytes, paths, frames or labels are ever put in a reply: raw data never leaves the vehicle.
FedProx's ``proximal-mu`` becomes the fine-tune's L2 anchor (μ/2·‖w − w_global‖², the same term); with the
default single local step its gradient is zero at the round's start, so FedProx then equals FedAvg.

Settings come either from the factory (simulation: ``make_client_app(settings)``) or, for a deployed
SuperNode, from the Flower run config (``VehicleSettings.from_run_config``); the vehicle id comes from
the node config (``vehicle-id``) or, in simulation, from the node's ``partition-id``.

Faults (for the robustness benchmarks): ``faults`` maps a vehicle id to ``scale50`` / ``signflip``
(poisoned updates), ``dropout`` (the vehicle trains, then drops off mid-round: its reply is an error),
``straggle`` (it answers only after ``straggle_s``: past the round's deadline), ``nan``, ``shape`` (broken
updates) or ``impostor`` (claims an id outside the fleet), in every round. ``dropout_frac`` instead drops a
fresh seeded share of the fleet each round (``round_dropouts``), as connectivity loss does on the road.
What each fault does is its row in :data:`FAULTS`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from driveloop.cloud.train import OPTIMIZERS
from driveloop.core.exceptions import ConfigError, FederatedError
from driveloop.core.ids import check_vehicle_id

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def _scale50(state: Arrays, base: Arrays) -> Arrays:
    return {k: (base[k] + 50.0 * (v - base[k])).astype(v.dtype) for k, v in state.items()}


def _signflip(state: Arrays, base: Arrays) -> Arrays:
    return {k: (base[k] - (v - base[k])).astype(v.dtype) for k, v in state.items()}


def _nan(state: Arrays, base: Arrays) -> Arrays:
    out = dict(state)
    first = next(iter(out))
    bad = out[first].copy()
    bad.flat[0] = np.nan
    out[first] = bad
    return out


def _wrong_shape(state: Arrays, base: Arrays) -> Arrays:
    out = dict(state)
    first = next(iter(out))
    out[first] = np.zeros((*out[first].shape, 2), dtype=out[first].dtype)
    return out


@dataclass(frozen=True)
class VehicleFault:
    """What an injected fault does to a vehicle's round (see the module docstring)."""

    poison: Callable[[Arrays, Arrays], Arrays] | None = None  # (honest update, global) -> the update sent
    drop: bool = False  # trains, then errors mid-round
    straggle: bool = False  # answers only after straggle_s
    impostor: bool = False  # claims an id outside the fleet


# Fault name -> what it does: one table for parse_faults, poison and handle_train. Its order is that of
# the valid names in error messages.
FAULTS: Mapping[str, VehicleFault] = MappingProxyType({
    "scale50": VehicleFault(poison=_scale50),
    "signflip": VehicleFault(poison=_signflip),
    "dropout": VehicleFault(drop=True),
    "straggle": VehicleFault(straggle=True),
    "nan": VehicleFault(poison=_nan),
    "shape": VehicleFault(poison=_wrong_shape),
    "impostor": VehicleFault(impostor=True),
})
NO_FAULT = VehicleFault()
# How a vehicle drawn by round_dropouts leaves the round: the faults that drop or delay its reply.
DROPOUT_MODES = tuple(name for name, f in FAULTS.items() if f.drop or f.straggle)
META_KEY, ARRAYS_KEY, METRICS_KEY = "meta", "arrays", "metrics"


def vehicle_id_for(index: int) -> str:
    """The fleet's vehicle ids: ``fl000``, ``fl001``, …"""
    return f"fl{index:03d}"


def parse_faults(text: str) -> dict[str, str]:
    """``"fl001:scale50,fl004:dropout"`` -> {vehicle: fault}; ConfigError on an unknown fault."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        vid, _, fault = item.partition(":")
        vehicle_fault(fault, f" for {vid!r}")
        out[vid] = fault
    return out


def vehicle_fault(name: str, where: str = "") -> VehicleFault:
    """The row of fault ``name``; ConfigError listing the valid names when there is none."""
    try:
        return FAULTS[name]
    except KeyError:
        raise ConfigError(f"unknown fault {name!r}{where}; valid: {', '.join(FAULTS)}") from None


def format_faults(faults: dict[str, str]) -> str:
    return ",".join(f"{v}:{f}" for v, f in sorted(faults.items()))


@dataclass(frozen=True)
class VehicleSettings:
    """Flat (Flower run-config compatible) settings of every vehicle in a run."""

    home: str  # the data directory: vehicles live in <home>/federated/vehicles/<id>
    registry_dir: str  # where the vehicle finds the base model to drive with when its spool is empty
    base_ref: str = "validated"
    episodes: int = 3
    episode_s: float = 20.0
    mix_concentration: float = 1.0
    # One local full-batch SGD step per round by default: the update is the vehicle's gradient (times lr),
    # and the server's Adam turns the fleet's mean gradient into the central optimiser (server.py, why:
    # federated/_server_opt.py). Several local epochs drift toward each vehicle's own data.
    local_epochs: int = 1
    batch_size: int = 0  # 0: the vehicle's whole dataset in one batch
    optimizer: str = "sgd"
    lr: float = 1.0
    anchor_l2: float = 1e-3
    data_seed: int = 0
    faults: str = ""
    straggle_s: float = 60.0
    dropout_frac: float = 0.0  # a fresh seeded share of the fleet drops out of every round
    dropout_mode: str = "dropout"  # dropout: error mid-round | straggle: reply after the deadline
    fleet_size: int = 0  # the draw is over fl000 … fl{fleet_size-1}

    def __post_init__(self) -> None:
        parse_faults(self.faults)
        if not 0.0 <= self.dropout_frac < 1.0:
            raise ConfigError(f"dropout_frac must be a fraction in [0, 1), got {self.dropout_frac}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"unknown dropout_mode {self.dropout_mode!r}; valid: {', '.join(DROPOUT_MODES)}")
        if self.local_epochs < 1 or self.batch_size < 0:
            raise ConfigError("local_epochs must be >= 1 and batch_size >= 0 (0: whole dataset)")
        if self.optimizer not in OPTIMIZERS:  # checked here too: before any vehicle drives or trains
            raise ConfigError(f"vehicle optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def to_run_config(self) -> dict[str, Any]:
        return {f"vehicle.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> VehicleSettings:
        kw = {f.name: run_config[f"vehicle.{f.name}"] for f in fields(cls) if f"vehicle.{f.name}" in run_config}
        if "home" not in kw or "registry_dir" not in kw:
            raise ConfigError("the run config lacks vehicle.home / vehicle.registry_dir")
        return cls(**kw)

    def vehicle_dir(self, vehicle_id: str) -> Path:
        return Path(self.home) / "federated" / "vehicles" / vehicle_id


def resolve_vehicle_id(node_config: dict[str, Any]) -> str:
    if "vehicle-id" in node_config:  # names the vehicle's data folder: the one id rule, no "." or ".."
        return check_vehicle_id(str(node_config["vehicle-id"]))
    if "partition-id" in node_config:
        return vehicle_id_for(int(node_config["partition-id"]))
    raise ConfigError("node config has neither vehicle-id nor partition-id")


def round_dropouts(fleet_size: int, frac: float, server_round: int, seed: int) -> set[str]:
    """The vehicles that drop out of ``server_round``: ``round(frac × fleet_size)`` of them, drawn afresh each
    round from (seed, round), so every vehicle (and the report) computes the same set without talking."""
    n = round(frac * fleet_size)
    order = np.random.default_rng((seed, server_round)).permutation(fleet_size)
    return {vehicle_id_for(int(i)) for i in order[:n]}


def poison(state: Arrays, base: Arrays, fault: str) -> Arrays:
    """A poisoned/broken version of an honest update (pure: for the robustness benchmarks and tests);
    a fault that does not touch the update (dropout, straggle, impostor) leaves it as it is."""
    rewrite = vehicle_fault(fault).poison
    return state if rewrite is None else rewrite(state, base)


def train_locally(settings: VehicleSettings, vehicle_id: str, global_state: dict[str, Any], mu: float) -> tuple[dict[str, Any], dict[str, float | int]]:
    """Fine-tune ``global_state`` on this vehicle's own data; (new state dict, numeric metrics)."""
    import torch

    from driveloop.cloud.registry import Registry
    from driveloop.cloud.train import FinetuneConfig, finetune
    from driveloop.federated.vehicle_data import (
        VehicleDataConfig,
        local_dataset,
        vehicle_seed,
    )

    torch.set_num_threads(1)
    data_cfg = VehicleDataConfig(episodes=settings.episodes, episode_s=settings.episode_s,
                                 mix_concentration=settings.mix_concentration, seed=settings.data_seed)
    with Registry(settings.registry_dir) as reg:
        artifact = reg.get(settings.base_ref)
        arrays = local_dataset(settings.vehicle_dir(vehicle_id), vehicle_id, artifact, data_cfg)
    # Unclipped: bounding updates is the server's job (robust.py clips every update against the round's).
    config = FinetuneConfig(epochs=settings.local_epochs, batch_size=settings.batch_size or len(arrays["target_action"]),
                            lr=settings.lr, optimizer=settings.optimizer, max_grad_norm=math.inf,
                            anchor_l2=max(settings.anchor_l2, mu / 2.0), seed=vehicle_seed(vehicle_id), torch_threads=1,
                            replay_target="label")  # replay targets: the released model's, distilled once
    state, metrics = finetune(global_state, arrays, config)
    # A fixed set of finite numbers: strategies require the same metric keys from every vehicle.
    numeric = {"num-examples": int(metrics["samples"]), "hard-samples": int(metrics["hard_samples"]),
               "replay-samples": int(metrics["replay_samples"]), "weight-delta-rel": float(metrics["weight_delta_rel"]),
               "train-loss": float(metrics["history"][-1]["train_loss"])}
    return state, numeric


def handle_train(settings: VehicleSettings, vehicle_id: str, msg: Any) -> Any:
    """One round on one vehicle: the reply Message (see module docstring)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    t0 = time.perf_counter()
    config = msg.content.get("config", ConfigRecord())
    name = parse_faults(settings.faults).get(vehicle_id)
    if settings.dropout_frac > 0 and vehicle_id in round_dropouts(
            settings.fleet_size, settings.dropout_frac, int(config.get("server-round", 0)), settings.data_seed):
        name = settings.dropout_mode
    fault = FAULTS[name] if name else NO_FAULT
    if fault.straggle:
        time.sleep(settings.straggle_s)
    global_arrays = msg.content[ARRAYS_KEY]
    mu = float(config.get("proximal-mu", 0.0))
    base = {k: np.asarray(a.numpy()) for k, a in global_arrays.items()}
    state, metrics = train_locally(settings, vehicle_id, {k: torch.from_numpy(v.copy()) for k, v in base.items()}, mu)
    if fault.drop:
        raise FederatedError(f"vehicle {vehicle_id} dropped out mid-round (injected fault)")
    np_state = {k: v.detach().cpu().numpy() for k, v in state.items()}
    if fault.poison is not None:
        np_state = fault.poison(np_state, base)
    out_arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in np_state.items()})
    metrics["train-time-s"] = time.perf_counter() - t0
    claimed = f"impostor-{vehicle_id}" if fault.impostor else vehicle_id
    content = RecordDict({ARRAYS_KEY: out_arrays, METRICS_KEY: MetricRecord(metrics),
                          META_KEY: ConfigRecord({"vehicle-id": claimed})})
    logger.info("vehicle %s trained on %d samples in %.2f s", vehicle_id, metrics["num-examples"], metrics["train-time-s"])
    return Message(content=content, reply_to=msg)


def make_client_app(settings: VehicleSettings | None = None) -> Any:
    """The ClientApp; ``settings`` None reads them from the Flower run config (deployment)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        s = settings if settings is not None else VehicleSettings.from_run_config(dict(context.run_config))
        return handle_train(s, resolve_vehicle_id(dict(context.node_config)), msg)

    return app
