"""A vehicle's own dataset: built from its spool, replay targets distilled from the released model."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_replay_targets_are_the_released_models_outputs_and_frames_pair_up(fl_home: Path) -> None:
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.train import next_frame_index
    from driveloop.edge.runtime import ModelRuntime
    from driveloop.federated.client import vehicle_id_for
    from driveloop.federated.vehicle_data import VehicleDataConfig, local_dataset

    vid = vehicle_id_for(0)
    with Registry(fl_home / "registry") as reg:
        art = reg.get("validated")
    arrays = local_dataset(fl_home / "federated" / "vehicles" / vid, vid, art, VehicleDataConfig(episodes=2, episode_s=10.0))
    hard = arrays["hard"].astype(bool)
    assert hard.any() and (~hard).any()
    runtime = ModelRuntime(art.onnx_path, art.manifest, device="cpu")
    replay = np.flatnonzero(~hard)
    want = runtime.run({k: np.ascontiguousarray(arrays[k][replay]) for k in ("kinematics", "lidar", "grid")})[0]
    np.testing.assert_allclose(arrays["target_action"][replay], want, atol=1e-5)  # the released model's outputs
    assert not np.allclose(arrays["target_action"][hard], runtime.run(
        {k: np.ascontiguousarray(arrays[k][hard]) for k in ("kinematics", "lidar", "grid")})[0], atol=1e-3)  # hard: labels
    assert (next_frame_index(arrays) >= 0).sum() > len(hard) // 2  # mined windows are consecutive frames
    again = local_dataset(fl_home / "federated" / "vehicles" / vid, vid, art, VehicleDataConfig(episodes=2, episode_s=10.0))
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)  # the cached copy is the same dataset
