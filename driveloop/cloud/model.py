"""The torch policy: a small multimodal fusion net mapping the observation contract to a control command.

Why this shape: the vehicle runs the exported graph at 10 Hz for many vehicles on a CPU, so the net
has to stay well under 0.2 ms per call at batch 1 on ONNX Runtime. Each modality gets a tiny encoder
that matches its structure (a 2-D CNN for the occupancy-grid "camera", a circular 1-D conv for the
360° lidar ring, an MLP for the kinematics vector) and a fusion MLP joins them.

Rules this module keeps:
- Inputs and outputs follow ``contracts.observation`` exactly (names, shapes, float32, SI units).
- Input normalisation constants are buffers inside the module, so they are part of the ONNX graph
  and the vehicle never guesses scales.
- Outputs are bounded by construction: acceleration in [-ACCEL_MIN_MPS2, ACCEL_MAX_MPS2]
  (asymmetric tanh: 0 maps to 0 m/s², braking reaches -9 m/s² — about the friction limit on dry
  asphalt — and throttle +4 m/s²), steering in ±STEER_MAX_RAD, confidence in (0, 1) by a sigmoid.
  The safety layer still clamps everything; the bounds only keep training well-conditioned.
- Deterministic: the same seed gives bit-identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from driveloop.contracts import observation as C
from driveloop.core.exceptions import ConfigError

logger = logging.getLogger(__name__)

ACCEL_MAX_MPS2 = 4.0  # strongest throttle the policy may ask for
ACCEL_MIN_MPS2 = 9.0  # magnitude of the strongest braking (≈ 0.9 g, dry-asphalt friction limit)
STEER_MAX_RAD = 0.3  # front-wheel angle bound; highway manoeuvres stay well inside it

# Per-feature scales (the unit each feature is divided by), chosen so typical highway values land in ~[-1, 1].
_EGO_SCALE = {
    "speed_mps": 30.0,
    "accel_mps2": 5.0,
    "heading_rad": 0.5,
    "lane_offset_m": 2.0,
    "steering_rad": STEER_MAX_RAD,
    "set_speed_mps": 30.0,
}
_NEIGHBOUR_SCALE = {"present": 1.0, "dx_m": 50.0, "dy_m": 5.0, "dvx_mps": 10.0, "dvy_mps": 2.0}
_SPEED_SCALE_MPS = 10.0  # relative/closing speeds in lidar and grid


def _kinematics_scale() -> torch.Tensor:
    ego = [_EGO_SCALE[f] for f in C.EGO_FEATURES]
    nb = [_NEIGHBOUR_SCALE[f] for f in C.NEIGHBOUR_FEATURES] * C.N_NEIGHBOURS
    return torch.tensor(ego + nb, dtype=torch.float32)


@dataclass(frozen=True)
class PolicyConfig:
    """Encoder widths. Defaults give ~74k parameters (≈30 µs per batch-1 ONNX Runtime call on one CPU core)."""

    grid_channels: tuple[int, int] = (8, 16)
    lidar_channels: tuple[int, int] = (8, 16)
    grid_features: int = 64
    lidar_features: int = 32
    kin_features: int = 64
    fused_features: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        widths = (*self.grid_channels, *self.lidar_channels, self.grid_features, self.lidar_features,
                  self.kin_features, self.fused_features)
        if any(w < 1 for w in widths):
            raise ConfigError(f"PolicyConfig widths must be >= 1, got {widths}")


@dataclass(frozen=True)
class StudentConfig:
    """A distillation student: one stride-4 conv per sensor, one kinematics layer, one fusion layer.

    Why this shape and not a narrower ``PolicyConfig``: at batch 1 ONNX Runtime's cost is mostly per
    node, not per FLOP (measured: the parent's widths cut to a quarter still took 0.87x its time), so
    the student has fewer layers, not just thinner ones. Defaults give 22,947 parameters (0.31 of the parent's
    74,355); on the demo's model a student of 18.6k (kinematics 32, fusion 48) needed the fallback 3 times on
    the held-out highway class where its teacher needed it never (docs/BENCHMARKS.md, issue 20).
    """

    grid_channels: int = 8
    lidar_channels: int = 8
    kin_features: int = 48
    fused_features: int = 56
    seed: int = 0

    def __post_init__(self) -> None:
        widths = (self.grid_channels, self.lidar_channels, self.kin_features, self.fused_features)
        if any(w < 1 for w in widths):
            raise ConfigError(f"StudentConfig widths must be >= 1, got {widths}")


class _FusionNet(nn.Module):
    """Shared skeleton: normalisation buffers, per-modality encoders built by ``_build``, bounded head."""

    kin_scale: torch.Tensor
    lidar_scale: torch.Tensor
    grid_scale: torch.Tensor
    accel_bounds: torch.Tensor

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # deterministic init without disturbing the caller's RNG
        try:
            self._build(config)
        finally:
            torch.random.set_rng_state(gen_state)
        self.register_buffer("kin_scale", _kinematics_scale().reciprocal())
        lidar_scale = torch.tensor([1.0 / C.LIDAR_RANGE_M, 1.0 / _SPEED_SCALE_MPS]).view(1, 2, 1)
        self.register_buffer("lidar_scale", lidar_scale)
        self.register_buffer("grid_scale", torch.tensor([1.0, 1.0 / _SPEED_SCALE_MPS]).view(1, 2, 1, 1))
        self.register_buffer("accel_bounds", torch.tensor([ACCEL_MAX_MPS2, ACCEL_MIN_MPS2]))

    def _build(self, cfg: Any) -> None:
        raise NotImplementedError

    def _init_head(self) -> None:
        # Start near "hold speed, go straight, unsure": small head weights, zero bias.
        nn.init.normal_(self.head.weight, std=1e-2)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kin_enc(kinematics * self.kin_scale)
        lid = self.lidar_enc(lidar * self.lidar_scale)
        g = self.grid_enc(grid * self.grid_scale)
        raw = self.head(self.fusion(torch.cat((g, lid, k), dim=1)))
        t = torch.tanh(raw[:, 0:2])
        # Asymmetric accel bound: positive side scaled by the throttle limit, negative by the brake limit.
        accel = t[:, 0:1] * torch.where(t[:, 0:1] >= 0, self.accel_bounds[0], self.accel_bounds[1])
        steer = t[:, 1:2] * STEER_MAX_RAD
        action = torch.cat((accel, steer), dim=1)
        confidence = torch.sigmoid(raw[:, 2:3])
        return action, confidence

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Call with a contract-named dict (as produced by ``contracts.observation.stack``)."""
        return self(*(batch[n] for n in C.INPUT_NAMES))

    def count_params(self) -> int:
        return count_params(self)


class PolicyNet(_FusionNet):
    """Multimodal policy: forward(kinematics[B,36], lidar[B,2,32], grid[B,2,16,32]) -> (action[B,2], confidence[B,1])."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config or PolicyConfig())

    def _build(self, cfg: PolicyConfig) -> None:
        g1, g2 = cfg.grid_channels
        # 16x32 -> 8x16 -> 4x8 with stride-2 convs: cheap and keeps the spatial layout.
        self.grid_enc = nn.Sequential(
            nn.Conv2d(C.GRID_CHANNELS, g1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(g1, g2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(g2 * (C.GRID_H // 4) * (C.GRID_W // 4), cfg.grid_features), nn.ReLU(),
        )
        l1, l2 = cfg.lidar_channels
        # The lidar is a ring: circular padding lets the conv see across cell 31 -> cell 0.
        self.lidar_enc = nn.Sequential(
            nn.Conv1d(2, l1, 5, stride=2, padding=2, padding_mode="circular"), nn.ReLU(),
            nn.Conv1d(l1, l2, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(l2 * (C.LIDAR_CELLS // 4), cfg.lidar_features), nn.ReLU(),
        )
        self.kin_enc = nn.Sequential(
            nn.Linear(C.KIN_DIM, cfg.kin_features), nn.ReLU(),
            nn.Linear(cfg.kin_features, cfg.kin_features), nn.ReLU(),
        )
        fused_in = cfg.grid_features + cfg.lidar_features + cfg.kin_features
        self.fusion = nn.Sequential(
            nn.Linear(fused_in, cfg.fused_features), nn.ReLU(),
            nn.Linear(cfg.fused_features, cfg.fused_features // 2), nn.ReLU(),
        )
        self.head = nn.Linear(cfg.fused_features // 2, len(C.ACTION_NAMES) + 1)
        self._init_head()


class StudentNet(_FusionNet):
    """The distillation student (``StudentConfig``): same contract and output bounds as ``PolicyNet``."""

    def __init__(self, config: StudentConfig | None = None) -> None:
        super().__init__(config or StudentConfig())

    def _build(self, cfg: StudentConfig) -> None:
        g, lc = cfg.grid_channels, cfg.lidar_channels
        # Non-overlapping 4x4 patches of the grid and 4-cell arcs of the lidar ring: one node each.
        self.grid_enc = nn.Sequential(nn.Conv2d(C.GRID_CHANNELS, g, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.lidar_enc = nn.Sequential(nn.Conv1d(2, lc, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.kin_enc = nn.Sequential(nn.Linear(C.KIN_DIM, cfg.kin_features), nn.ReLU())
        fused_in = g * (C.GRID_H // 4) * (C.GRID_W // 4) + lc * (C.LIDAR_CELLS // 4) + cfg.kin_features
        self.fusion = nn.Sequential(nn.Linear(fused_in, cfg.fused_features), nn.ReLU())
        self.head = nn.Linear(cfg.fused_features, len(C.ACTION_NAMES) + 1)
        self._init_head()


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as the normalisation constants excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def example_inputs(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random contract-shaped inputs in realistic SI ranges (for export tracing, parity and benches)."""
    gen = torch.Generator().manual_seed(seed)
    kin = torch.randn(batch, C.KIN_DIM, generator=gen) * _kinematics_scale()
    lidar = torch.rand(batch, 2, C.LIDAR_CELLS, generator=gen)
    lidar = lidar * torch.tensor([C.LIDAR_RANGE_M, 2 * _SPEED_SCALE_MPS]).view(1, 2, 1)
    lidar[:, 1] -= _SPEED_SCALE_MPS
    grid = torch.rand(batch, C.GRID_CHANNELS, C.GRID_H, C.GRID_W, generator=gen)
    grid[:, 1] = (grid[:, 1] - 0.5) * 2 * _SPEED_SCALE_MPS
    return kin, lidar, grid


@dataclass(frozen=True)
class LossWeights:
    """How the loss terms are weighed; scales are the error (in SI units) that counts as 'one unit' of loss."""

    action: float = 1.0
    confidence: float = 0.1
    accel_scale_mps2: float = 1.0
    steering_scale_rad: float = 0.05
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.action < 0 or self.confidence < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.accel_scale_mps2 <= 0 or self.steering_scale_rad <= 0 or self.huber_delta <= 0:
            raise ConfigError("loss scales and huber_delta must be > 0")


def loss_parts(
    pred: tuple[torch.Tensor, torch.Tensor],
    target_action: torch.Tensor,
    target_conf: torch.Tensor | None = None,
    weights: LossWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Behaviour-cloning loss terms: Huber on the scaled action error, BCE on the confidence.

    ``target_conf`` is 1 where the expert agreed with the model's action (it is trusted) and 0 where
    not; without it only the action term counts. Returns {"action", "confidence", "total"}.
    """
    w = weights or LossWeights()
    action, conf = pred
    if target_action.shape != action.shape:
        raise ConfigError(f"target_action shape {tuple(target_action.shape)} != prediction {tuple(action.shape)}")
    scale = torch.tensor([w.accel_scale_mps2, w.steering_scale_rad], dtype=action.dtype, device=action.device)
    action_term = F.huber_loss(action / scale, target_action / scale, delta=w.huber_delta)
    if target_conf is None:
        conf_term = torch.zeros((), dtype=action.dtype, device=action.device)
    else:
        if target_conf.shape != conf.shape:
            raise ConfigError(f"target_conf shape {tuple(target_conf.shape)} != prediction {tuple(conf.shape)}")
        conf_term = F.binary_cross_entropy(conf.clamp(1e-6, 1 - 1e-6), target_conf.to(conf.dtype))
    return {"action": action_term, "confidence": conf_term, "total": w.action * action_term + w.confidence * conf_term}


def loss(
    pred: tuple[torch.Tensor, torch.Tensor],
    target_action: torch.Tensor,
    target_conf: torch.Tensor | None = None,
    weights: LossWeights | None = None,
) -> torch.Tensor:
    """The scalar training loss (see ``loss_parts``)."""
    return loss_parts(pred, target_action, target_conf, weights)["total"]
