"""Distillation: a smaller student policy trained to reproduce its parent (the teacher) on fleet frames.

The targets are the teacher's own outputs (action and confidence), computed by ONNX Runtime on the
parent's *registered graph*: the student learns exactly the policy that passed the gate and ships, with no
dependency on the parent's torch weights (an imported or federated model has only its ONNX file). Frames
where the safety layer acted are rare and are where imitation matters most, so they are drawn
``event_oversample`` times per epoch. A tenth of the frames is held out to report how closely the
student follows the teacher (mean |error| in SI units, overall and on event frames).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.compress_frames import Frames
from driveloop.cloud.model import StudentConfig
from driveloop.core.exceptions import ConfigError, ModelError, PipelineError

logger = logging.getLogger(__name__)

_TEACHER_BATCH = 512


@dataclass(frozen=True)
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    epochs: int = 60
    batch_size: int = 256
    lr: float = 3e-3
    event_oversample: int = 4  # an event frame is drawn this many times per epoch
    holdout_frac: float = 0.1
    max_param_ratio: float = 1 / 3  # the student may have at most this share of the parent's parameters
    seed: int = 0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.event_oversample < 1 or self.torch_threads < 1:
            raise ConfigError("distill epochs, batch_size, event_oversample and torch_threads must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"distill lr must be > 0, got {self.lr}")
        if not 0.0 <= self.holdout_frac < 0.5 or not 0.0 < self.max_param_ratio <= 1.0:
            raise ConfigError("distill holdout_frac must be in [0, 0.5) and max_param_ratio in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def teacher_outputs(onnx_path: Path, frames: Frames) -> tuple[np.ndarray, np.ndarray]:
    """The parent graph's (action[N,2], confidence[N,1]) on every frame (ONNX Runtime, one thread)."""
    import onnxruntime as ort

    from driveloop.contracts import observation as C

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's load errors are untyped
        raise ModelError(f"ONNX Runtime cannot load the teacher {onnx_path}: {e}") from e
    actions, confs = [], []
    for lo in range(0, len(frames), _TEACHER_BATCH):
        a, c = sess.run(list(C.OUTPUT_NAMES), frames.batch(slice(lo, lo + _TEACHER_BATCH)))
        actions.append(a)
        confs.append(c)
    action, conf = np.concatenate(actions), np.concatenate(confs)
    if not (np.isfinite(action).all() and np.isfinite(conf).all()):
        raise ModelError(f"the teacher {onnx_path.name} gives non-finite outputs on recorded frames")
    return action.astype(np.float32), conf.astype(np.float32)


def split_holdout(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) row indices; the holdout is empty when ``frac`` is 0 or n < 10."""
    order = np.random.default_rng((seed, 1)).permutation(n)
    k = int(n * frac) if n >= 10 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def _mean_abs_error(model: Any, frames: Frames, idx: np.ndarray, target: np.ndarray) -> list[float] | None:
    """Mean |student - teacher| per action component over ``idx`` (None when empty)."""
    import torch

    if len(idx) == 0:
        return None
    with torch.no_grad():
        pred = model(*(torch.from_numpy(v) for v in frames.batch(idx).values()))[0].numpy()
    return [float(x) for x in np.abs(pred - target[idx]).mean(axis=0)]


def distill(frames: Frames, teacher_action: np.ndarray, teacher_conf: np.ndarray,
            config: DistillConfig) -> tuple[Any, dict[str, Any]]:
    """Train a ``StudentNet`` on the teacher's outputs; returns (student in eval mode, metrics)."""
    import torch

    from driveloop.cloud.model import StudentNet, loss_parts

    n = len(frames)
    if n == 0:
        raise PipelineError("no recorded frames to distill on: drive the fleet and ingest segments first")
    if teacher_action.shape != (n, 2) or teacher_conf.shape != (n, 1):
        raise PipelineError(f"teacher outputs {teacher_action.shape}, {teacher_conf.shape} do not match {n} frames")
    torch.set_num_threads(config.torch_threads)
    train_idx, hold_idx = split_holdout(n, config.holdout_frac, config.seed)
    weighted = np.concatenate([train_idx] + [train_idx[frames.event[train_idx]]] * (config.event_oversample - 1))
    model = StudentNet(config.student)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    obs = {k: torch.from_numpy(v) for k, v in frames.batch().items()}
    tgt_a, tgt_c = torch.from_numpy(teacher_action), torch.from_numpy(teacher_conf)
    history = []
    model.train()
    for epoch in range(config.epochs):
        order = np.random.default_rng((config.seed, epoch)).permutation(weighted)
        total = 0.0
        for lo in range(0, len(order), config.batch_size):
            rows = torch.from_numpy(order[lo:lo + config.batch_size])
            pred = model(*(obs[k][rows] for k in obs))
            loss = loss_parts(pred, tgt_a[rows], tgt_c[rows])["total"]
            if not torch.isfinite(loss):
                raise PipelineError(f"distillation diverged at epoch {epoch} (loss {float(loss)})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        sched.step()
        history.append(total / len(order))
        logger.info("distill epoch %d: loss %.5f", epoch, history[-1])
    model.eval()
    hold_events = hold_idx[frames.event[hold_idx]]
    metrics = {
        "frames": n, "event_frames": int(frames.event.sum()), "train_frames": len(train_idx), "holdout_frames": len(hold_idx),
        "loss_first_epoch": history[0], "loss_last_epoch": history[-1],
        "holdout_mae_accel_steer": _mean_abs_error(model, frames, hold_idx, teacher_action),
        "holdout_event_mae_accel_steer": _mean_abs_error(model, frames, hold_events, teacher_action),
    }
    return model, metrics
