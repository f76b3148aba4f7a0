"""PolicyNet: contract shapes, bounds, determinism, size, and the BC loss."""

from __future__ import annotations

import pytest
import torch

from driveloop.cloud.model import (
    ACCEL_MAX_MPS2,
    ACCEL_MIN_MPS2,
    STEER_MAX_RAD,
    LossWeights,
    PolicyConfig,
    PolicyNet,
    count_params,
    example_inputs,
    loss,
    loss_parts,
)
from driveloop.contracts import observation as C
from driveloop.core.exceptions import ConfigError


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_output_shapes_follow_the_contract(batch: int) -> None:
    net = PolicyNet().eval()
    with torch.no_grad():
        action, conf = net(*example_inputs(batch))
    assert action.shape == (batch, *C.OUTPUTS[0].shape)
    assert conf.shape == (batch, *C.OUTPUTS[1].shape)
    assert action.dtype == conf.dtype == torch.float32


def test_forward_batch_takes_contract_named_dict() -> None:
    net = PolicyNet().eval()
    kin, lidar, grid = example_inputs(3)
    with torch.no_grad():
        a1, c1 = net(kin, lidar, grid)
        a2, c2 = net.forward_batch({"grid": grid, "kinematics": kin, "lidar": lidar})
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


def test_outputs_are_bounded_even_for_extreme_inputs() -> None:
    net = PolicyNet(PolicyConfig(seed=3)).eval()
    with torch.no_grad():
        for p in net.head.parameters():
            p.mul_(1e4)  # drive the pre-activations far into saturation
        kin, lidar, grid = (t * 1e3 for t in example_inputs(256, seed=5))
        action, conf = net(kin, lidar, grid)
    accel, steer = action[:, 0], action[:, 1]
    assert accel.max() <= ACCEL_MAX_MPS2 and accel.min() >= -ACCEL_MIN_MPS2
    assert accel.max() > 0.9 * ACCEL_MAX_MPS2 and accel.min() < -0.9 * ACCEL_MIN_MPS2  # both ends reachable
    assert steer.abs().max() <= STEER_MAX_RAD
    assert ((conf >= 0) & (conf <= 1)).all()


def test_fresh_model_starts_near_neutral() -> None:
    with torch.no_grad():
        action, conf = PolicyNet().eval()(*example_inputs(32))
    assert action[:, 0].abs().max() < 1.0  # m/s²: no surprise full brake or throttle before training
    assert (conf - 0.5).abs().max() < 0.1


def test_same_seed_same_weights_different_seed_different() -> None:
    a, b, c = PolicyNet(PolicyConfig(seed=1)), PolicyNet(PolicyConfig(seed=1)), PolicyNet(PolicyConfig(seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_init_does_not_disturb_callers_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    PolicyNet(PolicyConfig(seed=9))
    assert torch.equal(torch.rand(4), expected)


def test_param_count_is_small_and_excludes_buffers() -> None:
    net = PolicyNet()
    n = net.count_params()
    assert n == count_params(net) == sum(p.numel() for p in net.parameters())
    assert 10_000 < n < 200_000
    assert "kin_scale" in dict(net.named_buffers())
    bigger = PolicyNet(PolicyConfig(fused_features=256))
    assert bigger.count_params() > n


def test_normalisation_is_inside_the_model() -> None:
    """Scaling is a buffer, so it is saved with the weights and exported with the graph."""
    net = PolicyNet()
    state = net.state_dict()
    for name in ("kin_scale", "lidar_scale", "grid_scale"):
        assert name in state
    speed = C.EGO_FEATURES.index("speed_mps")
    assert state["kin_scale"][speed] == pytest.approx(1 / 30.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"grid_features": 0}, {"grid_channels": (0, 4)}, {"fused_features": -1}],
    ids=["zero-grid-features", "zero-conv-channels", "negative-fused"],
)
def test_config_rejects_bad_widths(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(**kwargs)


def test_loss_is_zero_at_target_and_grows_with_error() -> None:
    target = torch.tensor([[1.0, 0.05], [-2.0, 0.0]])
    conf = torch.full((2, 1), 0.5)
    zero = loss((target.clone(), conf), target)
    small = loss((target + torch.tensor([0.5, 0.0]), conf), target)
    big = loss((target + torch.tensor([3.0, 0.0]), conf), target)
    assert zero.item() == 0.0 and 0 < small.item() < big.item()
    # steering errors are scaled by steering_scale_rad: 0.05 rad weighs like 1 m/s²
    steer_err = loss((target + torch.tensor([0.0, 0.05]), conf), target)
    accel_err = loss((target + torch.tensor([1.0, 0.0]), conf), target)
    assert steer_err.item() == pytest.approx(accel_err.item(), rel=1e-5)


def test_loss_confidence_term_and_weights() -> None:
    target = torch.zeros(4, 2)
    agreed = torch.ones(4, 1)
    confident = (target, torch.full((4, 1), 0.99))
    unsure = (target, torch.full((4, 1), 0.2))
    assert loss(confident, target, agreed).item() < loss(unsure, target, agreed).item()
    parts = loss_parts(unsure, target, agreed, LossWeights(action=1.0, confidence=0.5))
    assert parts["total"].item() == pytest.approx(0.5 * parts["confidence"].item())
    assert loss_parts(unsure, target)["confidence"].item() == 0.0  # no target: no confidence term


def test_loss_trains_the_model() -> None:
    net = PolicyNet(PolicyConfig(seed=4))
    inputs = example_inputs(32, seed=1)
    target = torch.tensor([[1.5, -0.1]]).repeat(32, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        value = loss(net(*inputs), target, torch.ones(32, 1))
        value.backward()
        opt.step()
        first = value.item() if first is None else first
    assert value.item() < 0.2 * first


def test_loss_rejects_mismatched_targets() -> None:
    with pytest.raises(ConfigError):
        loss((torch.zeros(2, 2), torch.zeros(2, 1)), torch.zeros(3, 2))
    with pytest.raises(ConfigError):
        loss((torch.zeros(2, 2), torch.zeros(2, 1)), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ConfigError):
        LossWeights(steering_scale_rad=0.0)
