"""Fine-tune: starts from the given weights, learns the hard data, stays near the base, resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from driveloop.cloud.model import PolicyNet
from driveloop.cloud.train import FinetuneConfig, finetune, latest_checkpoint, train_with_ray
from driveloop.core.exceptions import ConfigError, ModelError, PipelineError

CFG = FinetuneConfig(epochs=4, batch_size=16, lr=3e-3, seed=0)


def _arrays(n: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    """Hard frames: a slower lead close ahead (lidar cell 0 near) -> brake; replay: open road -> hold."""
    rng = np.random.default_rng(seed)
    kin = np.zeros((n, 36), dtype=np.float32)
    kin[:, 0] = rng.uniform(20, 30, n)
    kin[:, 5] = 25.0
    lidar = np.zeros((n, 2, 32), dtype=np.float32)
    lidar[:, 0] = 80.0
    hard = np.arange(n) % 2 == 0
    lidar[hard, 0, 0] = rng.uniform(5, 15, hard.sum())
    lidar[hard, 1, 0] = rng.uniform(3, 8, hard.sum())
    grid = np.zeros((n, 2, 16, 32), dtype=np.float32)
    target = np.zeros((n, 2), dtype=np.float32)
    target[hard, 0] = -4.0
    return {"kinematics": kin, "lidar": lidar, "grid": grid, "target_action": target, "hard": hard}


def _base() -> dict[str, torch.Tensor]:
    return PolicyNet().state_dict()


def test_finetune_starts_from_base_learns_and_stays_bounded() -> None:
    base = _base()
    state, m = finetune(base, _arrays(), CFG)
    # it starts from the given weights: the 'before' loss is the base model's loss on this data
    probe = PolicyNet()
    probe.load_state_dict(base)
    with torch.no_grad():
        a = _arrays()
        pred, _ = probe(*(torch.from_numpy(a[k][a["hard"]]) for k in ("kinematics", "lidar", "grid")))
    assert m["hard_loss_before"] == pytest.approx(
        float(torch.nn.functional.huber_loss(pred / torch.tensor([1.0, 0.05]), torch.from_numpy(a["target_action"][a["hard"]]) / torch.tensor([1.0, 0.05]))),
        rel=1e-4,
    )
    assert m["hard_loss_after"] < 0.5 * m["hard_loss_before"]
    assert m["replay_loss_after"] < 1.0
    assert 0 < m["weight_delta_rel"] < 0.5
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    assert changed and set(state) == set(base)
    assert (m["hard_samples"], m["replay_samples"]) == (48, 48)


def test_anchor_bounds_the_drift() -> None:
    loose = finetune(_base(), _arrays(), FinetuneConfig(epochs=3, batch_size=32, lr=2e-3, anchor_l2=0.0))[1]
    tight = finetune(_base(), _arrays(), FinetuneConfig(epochs=3, batch_size=32, lr=2e-3, anchor_l2=1.0))[1]
    assert tight["weight_delta_rel"] < loose["weight_delta_rel"]


def test_resume_continues_after_the_last_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    full, _ = finetune(_base(), _arrays(), CFG)
    finetune(_base(), _arrays(), FinetuneConfig(epochs=2, batch_size=16, lr=3e-3), checkpoint_dir=ckpt)
    assert latest_checkpoint(ckpt).name == "epoch_0001.pt"
    resumed, m = finetune(_base(), _arrays(), CFG, checkpoint_dir=ckpt)
    assert m["resumed_after_epoch"] == 1 and [h["epoch"] for h in m["history"]] == [0, 1, 2, 3]
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bit-identical to an uninterrupted run


def test_bad_inputs() -> None:
    with pytest.raises(PipelineError, match="empty"):
        finetune(_base(), {"target_action": np.zeros((0, 2), np.float32)}, CFG)
    with pytest.raises(ModelError, match="base weights"):
        finetune({"nope": torch.zeros(1)}, _arrays(), CFG)
    with pytest.raises(ConfigError):
        FinetuneConfig(lr=0.0)


@pytest.mark.slow
def test_ray_train_runs_the_same_step_and_resumes(tmp_path: Path) -> None:
    from driveloop.cloud.ray_runtime import ensure_ray

    ensure_ray(None, num_cpus=2)
    arrays_path = tmp_path / "arrays.npz"
    np.savez(arrays_path, **_arrays())
    state, m = train_with_ray(_base(), arrays_path, CFG, tmp_path / "run")
    local, _ = finetune(_base(), _arrays(), CFG)
    assert all(torch.allclose(state[k], local[k], atol=1e-6) for k in local)
    assert m["hard_loss_after"] < m["hard_loss_before"]
    # a rerun over the same run dir resumes after the last epoch instead of training again
    state2, m2 = train_with_ray(_base(), arrays_path, CFG, tmp_path / "run")
    assert m2["resumed_after_epoch"] == CFG.epochs - 1
    assert all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize(
    ("cpus", "workers", "data_cpus"),
    [(2, 1, 1.0), (4, 1, 3.0), (8, 3, 5.0)],
)
def test_cpu_split_leaves_ray_data_a_cpu(cpus: int, workers: int, data_cpus: float) -> None:
    from driveloop.cloud.ray_runtime import cpu_split

    split = cpu_split(cpus, workers)
    assert split.data_cpus == data_cpus and split.train_workers * split.cpus_per_train_worker + split.data_cpus == cpus


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 2), (2, 0)])
def test_cpu_split_refuses_a_trainer_that_takes_every_cpu(cpus: int, workers: int) -> None:
    from driveloop.cloud.ray_runtime import cpu_split

    with pytest.raises(ConfigError):
        cpu_split(cpus, workers)


@pytest.mark.slow
def test_a_runtime_shut_down_by_someone_else_is_started_again_on_demand() -> None:
    import ray

    from driveloop.cloud.ray_runtime import ensure_ray

    assert ensure_ray(None, num_cpus=2).num_cpus == 2
    ray.shutdown()  # another library's doing
    assert not ray.is_initialized()
    assert ensure_ray(None, num_cpus=2).num_cpus == 2  # the next stage simply starts it again


def test_replay_distills_the_base_model_so_nominal_behaviour_is_kept() -> None:
    arrays = _arrays()
    _, distilled = finetune(_base(), arrays, CFG)  # replay_target="base" is the default
    _, labelled = finetune(_base(), arrays, FinetuneConfig(epochs=4, batch_size=16, lr=3e-3, replay_target="label"))
    assert distilled["replay_loss_before"] == pytest.approx(0.0, abs=1e-9)  # its targets are its own outputs
    assert distilled["replay_loss_after"] < 0.5 * distilled["hard_loss_before"]  # nominal outputs moved little
    assert labelled["replay_loss_before"] > 0  # against the dataset's labels instead
    with pytest.raises(ConfigError, match="replay_target"):
        FinetuneConfig(replay_target="teacher")


def test_next_frame_index_links_consecutive_frames_of_the_same_segment() -> None:
    from driveloop.cloud.train import next_frame_index

    seg = np.array([1, 0, 0, 1, 0, 2])
    frame = np.array([5, 3, 4, 7, 9, 0])  # rows shuffled; 1:5 -> 1:7 is a gap, 0:4 -> 0:9 too
    nxt = next_frame_index({"target_action": np.zeros((6, 2)), "segment_index": seg, "frame_index": frame})
    assert nxt.tolist() == [-1, 2, -1, -1, -1, -1]
    assert (next_frame_index({"target_action": np.zeros((3, 2))}) == -1).all()  # no frame indices: no pairs


def test_smooth_term_measures_the_change_mismatch_to_the_next_frame() -> None:
    from driveloop.cloud.train import _smooth_term

    class Constant(torch.nn.Module):
        def forward(self, kin: torch.Tensor, lid: torch.Tensor, grd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(len(kin), 2), torch.ones(len(kin))

    a = _arrays(n=4)
    a["target_action"] = np.array([[0.0, 0.0], [0.5, 0.0], [0.5, 0.05], [9.0, 9.0]], dtype=np.float32)
    nxt = np.array([1, 2, -1, -1])
    rows = np.arange(4)
    pred = torch.zeros(4, 2)
    # a model whose output never changes misses the targets' change (0.5 m/s^2, then 1 scaled steering unit)
    got = float(_smooth_term(Constant(), a, rows, nxt, pred[:, :]))
    assert got == pytest.approx(np.mean([0.5**2, 0.0, 0.0, 1.0**2]))
    assert float(_smooth_term(Constant(), a, rows[2:], nxt, pred[2:])) == 0.0  # no pairs in this batch


def test_smooth_weight_is_validated() -> None:
    with pytest.raises(ConfigError, match="smooth_weight"):
        FinetuneConfig(smooth_weight=-1.0)


def test_sgd_one_full_batch_step_is_the_plain_gradient_step() -> None:
    """The federated vehicle's local step: w - lr * dL/dw on its whole dataset, nothing adaptive."""
    from driveloop.cloud.model import loss_parts

    torch.manual_seed(1)
    base, arrays = _base(), _arrays(40)
    cfg = FinetuneConfig(epochs=1, batch_size=40, lr=0.3, optimizer="sgd", max_grad_norm=float("inf"),
                         anchor_l2=0.0, smooth_weight=0.0, replay_target="label")
    got, _ = finetune(base, arrays, cfg)
    net = PolicyNet()
    net.load_state_dict(base)
    net.train()
    loss = loss_parts(net(*(torch.from_numpy(arrays[k]) for k in ("kinematics", "lidar", "grid"))),
                      torch.from_numpy(arrays["target_action"]))["total"]
    grads = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))
    for name, g in grads.items():
        torch.testing.assert_close(got[name], base[name] - 0.3 * g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="optimizer"):
        FinetuneConfig(optimizer="rmsprop")
