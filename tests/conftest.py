"""Suite-wide settings: the suite runs on 2 cores, so every library is held to them."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _limit_threads() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # torch-free test subsets
        pass


# -- shared model fixtures ------------------------------------------------------------------------
# A random-weight model is enough to exercise every path (verification, batching, supervision,
# recording); the trained one is built once per session by the real bootstrap, reduced in size.


def _register_random(root, seed: int = 0, stage: str = "validated"):
    import torch

    from driveloop.cloud.checkpoints import save_weights
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.registry import Registry

    torch.manual_seed(seed)
    net = PolicyNet()
    onnx = export_onnx(net, root / f"random{seed}.onnx")
    with Registry(root / "registry") as reg:
        manifest = reg.register(onnx, training_run={"kind": "random-init-for-tests", "seed": seed})
        save_weights(root / "registry", manifest.sha256, net.state_dict())
        if stage != "candidate":
            reg.set_stage(manifest.version, stage, "test fixture")
    return manifest


@pytest.fixture(scope="session")
def random_home(tmp_path_factory):
    """A data directory whose registry holds one random-weight model, stage validated."""
    home = tmp_path_factory.mktemp("random_home")
    _register_random(home)
    return home


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory):
    """A data directory with a real (reduced) bootstrap model v1: behaviour cloning on the expert."""
    from driveloop.cloud.bootstrap import BootstrapConfig, bootstrap

    home = tmp_path_factory.mktemp("trained_home")
    bootstrap(home / "registry", BootstrapConfig(episodes=16, episode_s=25.0, epochs=10, workers=2, check_episodes=1))
    return home
