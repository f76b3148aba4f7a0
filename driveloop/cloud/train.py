"""Fine-tuning: continue the current model on a dataset version, never from scratch.

``finetune`` is the one training step, usable anywhere (the cloud pipeline inside Ray Train, a
federated vehicle locally): it starts from the given torch state dict, trains on the dataset's mix of
mined hard frames and nominal replay frames (the replay keeps the model from forgetting what it already
does well), pulls the weights toward the base with an L2 anchor so the update stays bounded, asks the
model's change of output between consecutive frames to match the targets' (``smooth_weight``: fine-tunes
toward braking labels added jerk to nominal cruising; the targets are rate-limited, so this keeps the model's
commands as smooth as theirs), checkpoints
every epoch (atomically) and, given the same checkpoint directory again, resumes after the last
completed epoch. ``train_with_ray`` runs it under Ray Train's ``TorchTrainer`` with one 1-CPU worker, so
that Ray Data keeps the machine's other CPU (see ``cloud/_ray.py``).

Where the torch weights live: the registry stores ONNX only; ``cloud/checkpoints.py`` keeps each
registered model's torch state dict at ``<registry>/weights/<onnx sha256>.pt``. The pipeline loads the
base from there and saves the candidate's weights there when it registers it. The run's own epoch
checkpoints stay in its run directory (``<home>/cloud/runs/<run>/checkpoints``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.exceptions import ConfigError, ModelError, PipelineError

logger = logging.getLogger(__name__)

StateDict = dict[str, Any]  # name -> torch.Tensor
_CKPT_PREFIX = "epoch_"
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-4
    anchor_l2: float = 1e-3  # pull toward the base weights: bounded drift, less forgetting
    max_grad_norm: float = 1.0
    seed: int = 0
    torch_threads: int = 1
    # Targets of the replay (nominal) frames: "base" distills the base model's own outputs (keeps exactly
    # what it already does well: learning without forgetting), "label" uses the dataset's labels.
    replay_target: str = "base"
    # Weight of the temporal term: between consecutive frames of a segment the model's change of action
    # should match the targets' change (targets are rate-limited), so fine-tuning adds no jitter (jerk).
    smooth_weight: float = 1.0
    # "adam" for the cloud fine-tune; "sgd" (plain, no momentum) for a federated vehicle's local step, whose
    # adaptive optimiser runs on the server over the aggregated update (federated/_server_opt.py).
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"finetune optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.replay_target not in ("base", "label"):
            raise ConfigError(f"finetune replay_target must be 'base' or 'label', got {self.replay_target!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.torch_threads < 1:
            raise ConfigError("finetune epochs, batch_size and torch_threads must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.anchor_l2 < 0 or self.max_grad_norm <= 0:
            raise ConfigError("finetune lr and max_grad_norm must be > 0, anchor_l2 >= 0")
        if not (math.isfinite(self.smooth_weight) and self.smooth_weight >= 0):
            raise ConfigError(f"finetune smooth_weight must be >= 0, got {self.smooth_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_model() -> Any:
    from driveloop.cloud.model import PolicyNet

    return PolicyNet()


def _atomic_torch_save(obj: object, dest: Path) -> None:
    """torch.save, all-or-nothing (a crash mid-epoch never leaves a torn checkpoint)."""
    import io

    import torch

    from driveloop.core.atomic import write_atomic

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(dest, buf.getvalue())


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete epoch checkpoint in ``checkpoint_dir`` (None if none)."""
    found = sorted(checkpoint_dir.glob(f"{_CKPT_PREFIX}*.pt")) if checkpoint_dir.is_dir() else []
    return found[-1] if found else None


def _tensors(arrays: dict[str, np.ndarray], idx: np.ndarray) -> tuple[Any, Any, Any, Any]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[k][idx])) for k in ("kinematics", "lidar", "grid", "target_action"))  # type: ignore[return-value]


def next_frame_index(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Row of the next frame of the same segment for every row (-1 where the dataset does not hold it)."""
    n = len(arrays["target_action"])
    if "segment_index" not in arrays or "frame_index" not in arrays:
        return np.full(n, -1, dtype=np.int64)
    seg, frame = np.asarray(arrays["segment_index"]), np.asarray(arrays["frame_index"])
    order = np.lexsort((frame, seg))
    nxt = np.full(n, -1, dtype=np.int64)
    follows = (seg[order[1:]] == seg[order[:-1]]) & (frame[order[1:]] == frame[order[:-1]] + 1)
    nxt[order[:-1][follows]] = order[1:][follows]
    return nxt


def _smooth_term(model: Any, arrays: dict[str, np.ndarray], rows: np.ndarray, nxt: np.ndarray, pred_action: Any) -> Any:
    """Mean squared mismatch between the model's and the targets' change to the next frame (scaled)."""
    import torch

    from driveloop.cloud.model import LossWeights

    has = nxt[rows] >= 0
    if not has.any():
        return torch.zeros(())
    kin, lid, grd, tgt_next = _tensors(arrays, nxt[rows[has]])
    tgt = torch.from_numpy(np.ascontiguousarray(arrays["target_action"][rows[has]]))
    w = LossWeights()
    scale = torch.tensor([w.accel_scale_mps2, w.steering_scale_rad])
    d_pred = (model(kin, lid, grd)[0] - pred_action[torch.from_numpy(has)]) / scale
    return ((d_pred - (tgt_next - tgt) / scale) ** 2).mean()


def _eval_loss(model: Any, arrays: dict[str, np.ndarray], idx: np.ndarray, batch: int) -> float:
    """Mean action loss over ``idx`` (NaN for an empty subset)."""
    import torch

    from driveloop.cloud.model import loss_parts

    if len(idx) == 0:
        return float("nan")
    total = 0.0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(idx), batch):
            kin, lid, grd, tgt = _tensors(arrays, idx[lo : lo + batch])
            total += float(loss_parts(model(kin, lid, grd), tgt)["action"]) * len(tgt)
    return total / len(idx)


def _distilled_targets(model: Any, arrays: dict[str, np.ndarray], idx: np.ndarray, batch: int) -> np.ndarray:
    """Target actions with the replay frames' targets replaced by the (base) model's own outputs."""
    import torch

    targets = np.array(arrays["target_action"], dtype=np.float32, copy=True)
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(idx), batch):
            kin, lid, grd, _ = _tensors(arrays, idx[lo : lo + batch])
            targets[idx[lo : lo + batch]] = model(kin, lid, grd)[0].numpy()
    return targets


def finetune(
    base_state_dict: StateDict,
    dataset_arrays: dict[str, np.ndarray],
    config: FinetuneConfig,
    *,
    checkpoint_dir: Path | str | None = None,
    model_factory: Callable[[], Any] = _default_model,
    on_epoch: Callable[[int, dict[str, float], StateDict], None] | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """Train from ``base_state_dict`` on the dataset's hard + replay frames; returns (state_dict, metrics).

    ``dataset_arrays`` holds at least kinematics, lidar, grid, target_action (and optionally ``hard``).
    With ``checkpoint_dir`` every epoch is saved and a rerun resumes after the last saved epoch.
    """
    import torch

    from driveloop.cloud.model import loss_parts

    torch.set_num_threads(config.torch_threads)
    n = len(dataset_arrays.get("target_action", ()))
    if n == 0:
        raise PipelineError("cannot fine-tune on an empty dataset")
    hard = np.asarray(dataset_arrays.get("hard", np.ones(n, dtype=bool)), dtype=bool)
    model = model_factory()
    try:
        model.load_state_dict(base_state_dict)
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"base weights do not fit the policy model: {e}") from e
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = (torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=config.lr)
    hard_idx, replay_idx = np.flatnonzero(hard), np.flatnonzero(~hard)
    if config.replay_target == "base" and len(replay_idx):
        dataset_arrays = {**dataset_arrays, "target_action": _distilled_targets(model, dataset_arrays, replay_idx, config.batch_size)}
    before = {"hard_loss_before": _eval_loss(model, dataset_arrays, hard_idx, config.batch_size),
              "replay_loss_before": _eval_loss(model, dataset_arrays, replay_idx, config.batch_size)}
    nxt = next_frame_index(dataset_arrays) if config.smooth_weight > 0 else None
    start_epoch, history = 0, []
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed_from = None
    if ckpt_dir is not None and (last := latest_checkpoint(ckpt_dir)) is not None:
        ckpt = torch.load(last, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, history, before = ckpt["epoch"] + 1, ckpt["history"], ckpt["before"]
        resumed_from = ckpt["epoch"]
        logger.info("resuming fine-tune after epoch %d from %s", ckpt["epoch"], last)
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng((config.seed, epoch))  # per-epoch seed: a resumed run replays exactly
        order = rng.permutation(n)
        model.train()
        running = 0.0
        for lo in range(0, n, config.batch_size):
            rows = order[lo : lo + config.batch_size]
            kin, lid, grd, tgt = _tensors(dataset_arrays, rows)
            pred = model(kin, lid, grd)
            loss = loss_parts(pred, tgt)["total"]
            if nxt is not None:
                loss = loss + config.smooth_weight * _smooth_term(model, dataset_arrays, rows, nxt, pred[0])
            if config.anchor_l2 > 0:
                loss = loss + config.anchor_l2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            if not torch.isfinite(loss):
                raise PipelineError(f"fine-tune diverged at epoch {epoch} (loss {float(loss)})")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            running += float(loss.detach()) * len(tgt)
        record = {"epoch": epoch, "train_loss": running / n}
        history.append(record)
        if ckpt_dir is not None:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                "history": history, "before": before}, ckpt_dir / f"{_CKPT_PREFIX}{epoch:04d}.pt")
        if on_epoch is not None:
            on_epoch(epoch, record, model.state_dict())
        logger.info("fine-tune epoch %d: loss %.4f", epoch, record["train_loss"])
    delta = math.sqrt(sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(model.parameters(), anchor)))
    norm = math.sqrt(sum(float((a**2).sum()) for a in anchor))
    metrics: dict[str, Any] = {
        **before,
        "hard_loss_after": _eval_loss(model, dataset_arrays, hard_idx, config.batch_size),
        "replay_loss_after": _eval_loss(model, dataset_arrays, replay_idx, config.batch_size),
        "weight_delta_rel": delta / max(norm, 1e-12),
        "samples": n, "hard_samples": len(hard_idx), "replay_samples": len(replay_idx),
        "epochs": config.epochs, "resumed_after_epoch": resumed_from, "history": history,
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: load the dataset version's arrays and run ``finetune``, reporting each epoch."""
    import torch
    from ray import train

    arrays = dict(np.load(loop_config["arrays_path"], allow_pickle=False))
    config = FinetuneConfig(**loop_config["config"])

    def report(epoch: int, record: dict[str, float], state: StateDict) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            train.report(dict(record), checkpoint=train.Checkpoint.from_directory(d))

    state, metrics = finetune(loop_config["base_state_dict"], arrays, config,
                              checkpoint_dir=loop_config["checkpoint_dir"], on_epoch=report)
    if metrics["resumed_after_epoch"] is not None and metrics["resumed_after_epoch"] >= config.epochs - 1:
        report(config.epochs - 1, {"epoch": config.epochs - 1, "train_loss": metrics["history"][-1]["train_loss"]}, state)
    _atomic_torch_save({"state": state, "metrics": metrics}, Path(loop_config["checkpoint_dir"]) / "final.pt")


def train_with_ray(
    base_state_dict: StateDict,
    arrays_path: Path,
    config: FinetuneConfig,
    run_dir: Path,
    *,
    cpus_per_worker: float = 1.0,
) -> tuple[StateDict, dict[str, Any]]:
    """Run ``finetune`` under Ray Train (TorchTrainer, one worker); resumable via ``run_dir``.

    The caller has started Ray (``ensure_ray``) and materialized the dataset; the worker reads the
    dataset version's ``arrays.npz``, so no Ray Data pipeline competes with it for CPUs.
    """
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"base_state_dict": base_state_dict, "arrays_path": str(Path(arrays_path).resolve()),
                           "config": config.to_dict(), "checkpoint_dir": str(ckpt_dir)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"finetune-{uuid.uuid4().hex[:8]}", storage_path=str(run_dir / "ray")),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors in its own types
        raise PipelineError(f"fine-tune failed in Ray Train: {e}") from e
    final = ckpt_dir / "final.pt"
    if not final.is_file():
        raise PipelineError(f"fine-tune finished without a final checkpoint in {ckpt_dir}")
    out = torch.load(final, weights_only=False)
    return out["state"], out["metrics"]
