"""The server's optimiser over the aggregate (FedAdam) and why it works: FedSGD's mean update is the union's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driveloop.core.exceptions import ConfigError
from driveloop.federated._server_opt import ServerOptConfig, ServerOptState, server_step


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (scale * rng.normal(size=(3, 4))).astype(np.float32), "b": (scale * rng.normal(size=4)).astype(np.float32)}


def test_none_makes_the_aggregate_the_global_model() -> None:
    cur, agg = _arrays(0), _arrays(1)
    out, state = server_step(cur, agg, ServerOptState(), ServerOptConfig(kind="none"))
    for k in cur:
        np.testing.assert_array_equal(out[k], agg[k])
        assert out[k].dtype == np.float32
    assert state.step == 0


def test_adam_matches_torch_adam_on_the_same_pseudo_gradients() -> None:
    """Δ_t = aggregate − global is a negative gradient: the trajectory must be torch.optim.Adam's."""
    cfg = ServerOptConfig(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-8)
    cur = {k: v.astype(np.float64) for k, v in _arrays(0).items()}
    params = {k: torch.tensor(v, requires_grad=True) for k, v in cur.items()}
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    state = ServerOptState()
    for t in range(6):
        delta = _arrays(10 + t, scale=0.1 * (t + 1))
        cur, state = server_step(cur, {k: cur[k] + delta[k] for k in cur}, state, cfg)
        for k, p in params.items():
            p.grad = torch.tensor(-delta[k].astype(np.float64))
        opt.step()
        for k, p in params.items():
            np.testing.assert_allclose(cur[k], p.detach().numpy(), rtol=1e-6, atol=1e-9)
    assert state.step == 6


def test_first_adam_step_moves_each_changed_weight_by_lr_whatever_the_update_scale() -> None:
    cur = {"w": np.zeros(4, dtype=np.float32)}
    for scale in (1e-4, 1.0, 1e3):
        agg = {"w": np.array([scale, -scale, 0.0, 2 * scale], dtype=np.float32)}
        out, _ = server_step(cur, agg, ServerOptState(), ServerOptConfig(lr=3e-4))
        np.testing.assert_allclose(out["w"], [3e-4, -3e-4, 0.0, 3e-4], rtol=1e-4)


def test_oscillating_updates_are_damped_by_the_momentum() -> None:
    cfg, cur, state = ServerOptConfig(lr=1e-2), {"w": np.zeros(1)}, ServerOptState()
    steps = []
    for t in range(8):
        before = cur["w"].copy()
        cur, state = server_step(cur, {"w": cur["w"] + (1.0 if t % 2 == 0 else -1.0)}, state, cfg)
        steps.append(abs(float(cur["w"][0] - before[0])))
    assert steps[0] == pytest.approx(1e-2) and max(steps[2:]) < 0.6e-2


def test_state_round_trips_through_flat_arrays() -> None:
    _, state = server_step(_arrays(0), _arrays(1), ServerOptState(), ServerOptConfig())
    back = ServerOptState.from_arrays(state.step, state.to_arrays())
    assert back.step == 1 and set(back.m) == set(back.v) == {"w", "b"}
    for k in state.m:
        np.testing.assert_array_equal(back.m[k], state.m[k])
        np.testing.assert_array_equal(back.v[k], state.v[k])


@pytest.mark.parametrize("kw", [{"kind": "sgd"}, {"lr": 0.0}, {"lr": float("nan")}, {"beta1": 1.0},
                                {"beta2": -0.1}, {"eps": 0.0}])
def test_bad_settings_are_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError):
        ServerOptConfig(**kw)


def test_fedsgd_mean_update_is_the_union_gradient_step() -> None:
    """One local full-batch SGD step per vehicle, averaged by example count, equals that step on the union
    of the vehicles' data: the reason the server (not the vehicles) runs Adam (module doc)."""
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.train import FinetuneConfig, finetune

    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in PolicyNet().state_dict().items()}
    rng = np.random.default_rng(0)

    def data(n: int) -> dict[str, np.ndarray]:
        return {"kinematics": rng.normal(size=(n, 36)).astype(np.float32),
                "lidar": rng.uniform(0, 1, size=(n, 2, 32)).astype(np.float32),
                "grid": (rng.uniform(size=(n, 2, 16, 32)) > 0.8).astype(np.float32),
                "target_action": (rng.normal(size=(n, 2)) * [1.0, 0.05]).astype(np.float32),
                "hard": rng.uniform(size=n) > 0.5}

    vehicles = [data(n) for n in (7, 19, 30)]
    union = {k: np.concatenate([v[k] for v in vehicles]) for k in vehicles[0]}

    def step(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        cfg = FinetuneConfig(epochs=1, batch_size=len(arrays["hard"]), lr=0.5, optimizer="sgd",
                             max_grad_norm=float("inf"), replay_target="label", smooth_weight=0.0)
        return finetune(base, arrays, cfg)[0]

    ups, ns = [step(v) for v in vehicles], [len(v["hard"]) for v in vehicles]
    central = step(union)
    for k, w in base.items():
        if not w.is_floating_point():
            continue
        mean = sum(n * (u[k].double() - w.double()) for n, u in zip(ns, ups)) / sum(ns)
        torch.testing.assert_close(mean, central[k].double() - w.double(), rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(central[k], base[k]) for k in base)
