"""Bootstrap by behaviour cloning + DAgger: the correlated DART noise, the learner-driven rounds (real
simulator, expert labels checked by replay), seed hygiene, config validation and a small end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest

from driveloop.cloud import bootstrap as bs
from driveloop.core.exceptions import ConfigError

DT_S = 0.1


@pytest.mark.parametrize(("corr_s", "lag1"), [(0.0, 0.0), (1.0, float(np.exp(-0.1))), (0.5, float(np.exp(-0.2)))])
def test_ar1_noise_has_the_configured_std_and_correlation(corr_s: float, lag1: float) -> None:
    noise = bs._ar1_noise(np.random.default_rng(0), (0.6, 0.02), corr_s, DT_S, 40_000)
    assert noise.shape == (40_000, 2)
    assert noise.std(axis=0) == pytest.approx([0.6, 0.02], rel=0.08)
    for col in range(2):
        x = noise[:, col]
        assert np.corrcoef(x[:-1], x[1:])[0, 1] == pytest.approx(lag1, abs=0.03)


def test_ar1_noise_is_replayable() -> None:
    a = bs._ar1_noise(np.random.default_rng([5, 3]), (1.0, 1.0), 1.0, DT_S, 50)
    b = bs._ar1_noise(np.random.default_rng([5, 3]), (1.0, 1.0), 1.0, DT_S, 50)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("negative correlation time", {"noise_corr_s": -0.1}),
        ("negative DAgger rounds", {"dagger_rounds": -1}),
        ("DAgger round without epochs", {"dagger_rounds": 1, "dagger_epochs": 0}),
        ("DAgger round without episodes", {"dagger_rounds": 1, "dagger_episodes": 0, "episodes": 1}),
    ],
)
def test_bad_config_is_refused(name: str, kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        bs.BootstrapConfig(**kw)


def test_dagger_rounds_default_to_twice_the_cloning_episodes() -> None:
    assert bs.BootstrapConfig(episodes=7).dagger_episode_count == 14
    assert bs.BootstrapConfig(episodes=7, dagger_episodes=3).dagger_episode_count == 3


def test_no_dagger_needs_no_dagger_sizes() -> None:
    cfg = bs.BootstrapConfig(dagger_rounds=0, dagger_epochs=0)
    assert cfg.dagger_rounds == 0


def test_training_seeds_never_overlap_evaluation_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety suite evaluates seeds 0, 1, …; demonstrations and DAgger rounds use their own ranges."""
    calls: list[tuple[str, int, bool]] = []

    def fake(scenario: str, seed: int, *args: object) -> bs.Demonstrations:
        calls.append((scenario, seed, args[-1] is not None))
        z = np.zeros((1, 1), np.float32)
        return bs.Demonstrations(z, z, z, z)

    monkeypatch.setattr(bs, "demonstrate", fake)
    cfg = bs.BootstrapConfig(episodes=4, workers=1)
    bs.collect(cfg)
    bs.collect(cfg, learner_state={"w": 1}, dagger_round=1)
    bs.collect(cfg, learner_state={"w": 1}, dagger_round=2)
    seeds = [s for _, s, _ in calls]
    assert len(set(seeds)) == 4 + 8 + 8 and min(seeds) >= bs.TRAIN_SEED_BASE
    assert [learner for _, _, learner in calls] == [False] * 4 + [True] * 16
    assert {sc for sc, _, _ in calls} == set(bs.DEMO_SCENARIOS)


def _policy_state() -> dict[str, object]:
    import torch

    from driveloop.cloud.model import PolicyNet

    torch.manual_seed(3)
    return PolicyNet().state_dict()


def test_dagger_episode_is_driven_by_the_learner_and_labelled_by_the_expert() -> None:
    """Replay: the learner's own commands reproduce the recorded states, and every label is the expert's
    action in that state (not the learner's)."""
    from driveloop.sim.scenarios import parse_scenario
    from driveloop.sim.sensors import SensorSuite
    from driveloop.sim.simulator import Simulator

    state = _policy_state()
    seed, episode_s = 1_000_123, 3.0
    learned = bs.demonstrate("highway", seed, episode_s, 0.0, 0.0, 0.0, learner_state=state)
    expert_driven = bs.demonstrate("highway", seed, episode_s, 0.0, 0.0, 0.0)
    assert len(learned) == len(expert_driven) == 30
    assert np.array_equal(learned.kinematics[0], expert_driven.kinematics[0])  # same start
    assert not np.allclose(learned.kinematics[-1], expert_driven.kinematics[-1])  # a different drive

    act = bs._load_learner(state)
    with Simulator(parse_scenario("highway"), seed) as sim:
        snap = sim.reset()
        sensors = SensorSuite(seed=seed)
        for k in range(len(learned)):
            arrays = sensors.observe(snap).observation.arrays()
            assert np.array_equal(arrays["kinematics"], learned.kinematics[k])
            assert np.allclose(learned.actions[k], sim.expert_action(), atol=1e-6)
            command = act(arrays)
            assert not np.allclose(command, learned.actions[k], atol=1e-3)  # the label is not the learner's
            snap = sim.step(float(command[0]), float(command[1]))


def test_small_bootstrap_runs_dagger_and_records_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = bs.BootstrapConfig(episodes=2, episode_s=6.0, epochs=2, dagger_rounds=1, dagger_episodes=2,
                             dagger_epochs=1, workers=1, check_episodes=1)
    summary = bs.bootstrap(tmp_path / "registry", cfg)
    assert summary["stage"] == "validated" and summary["version"] == 1
    # cloning ticks + one learner-driven round (2 episodes, shorter where the weak learner crashed)
    assert 2 * 60 < summary["samples"] <= 2 * 60 * 2
    from driveloop.cloud.registry import Registry

    with Registry(tmp_path / "registry") as reg:
        run = reg.get(1).manifest.training_run
    assert run["config"]["dagger_rounds"] == 1 and run["samples"] == summary["samples"]
