"""ModelRuntime: verified before use (sha256, I/O contract), real ONNX Runtime inference, latency log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from driveloop.cloud.export import PARITY_TOL, export_onnx
from driveloop.contracts.manifest import build_manifest
from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
from driveloop.cloud.registry import Registry
from driveloop.contracts import observation as C
from driveloop.edge.runtime import ModelRunner, ModelRuntime, bucket_for, cuda_works, validate_batch
from driveloop.wiring import load_runtime
from driveloop.core.exceptions import ConfigError, ContractError, IntegrityError, ModelError
from tests.fakes.runner import FakeRunner

_AXES = {n: {0: "batch"} for n in (*C.INPUT_NAMES, *C.OUTPUT_NAMES)}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[PolicyNet, Path]:
    net = PolicyNet(PolicyConfig(seed=5)).eval()
    return net, export_onnx(net, tmp_path_factory.mktemp("rt") / "model.onnx")


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(C.INPUT_NAMES, example_inputs(n, seed=seed))}


@pytest.mark.parametrize("n", [1, 64])
def test_runs_and_matches_torch(policy: tuple[PolicyNet, Path], n: int) -> None:
    net, path = policy
    rt = ModelRuntime(path, build_manifest(path, name="policy", version=1), device="cpu")
    assert isinstance(rt, ModelRunner) and rt.provider == "CPUExecutionProvider"
    batch = _batch(n, seed=n)
    action, conf = rt.run(batch)
    with torch.no_grad():
        ref_a, ref_c = net(*(torch.from_numpy(batch[k]) for k in C.INPUT_NAMES))
    assert action.shape == (n, 2) and conf.shape == (n, 1) and action.dtype == np.float32
    np.testing.assert_allclose(action, ref_a.numpy(), atol=PARITY_TOL)
    np.testing.assert_allclose(conf, ref_c.numpy(), atol=PARITY_TOL)


def test_records_latency_per_call(policy: tuple[PolicyNet, Path]) -> None:
    _, path = policy
    rt = ModelRuntime(path, build_manifest(path, name="policy", version=1))
    assert np.isnan(rt.latency.percentile_us(50))
    rt.warmup((1, 4))
    for _ in range(10):
        rt.run(_batch(1))
    assert rt.latency.calls == 12
    assert 0 < rt.latency.percentile_us(50) <= rt.latency.percentile_us(99)


def test_tampered_file_is_refused(policy: tuple[PolicyNet, Path], tmp_path: Path) -> None:
    _, path = policy
    manifest = build_manifest(path, name="policy", version=1)
    tampered = tmp_path / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        ModelRuntime(tampered, manifest)
    with pytest.raises(ModelError):
        ModelRuntime(tmp_path / "absent.onnx", manifest)


class _WrongLidar(torch.nn.Module):
    def forward(self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor) -> tuple:
        return kinematics[:, :2] + lidar[:, 0, :2], grid[:, 0, 0, 0:1]


def _export_raw(module: torch.nn.Module, path: Path, lidar_cells: int = C.LIDAR_CELLS, axes: dict | None = _AXES,
                input_names: tuple[str, ...] = C.INPUT_NAMES) -> Path:
    args = (torch.zeros(1, C.KIN_DIM), torch.zeros(1, 2, lidar_cells), torch.zeros(1, C.GRID_CHANNELS, C.GRID_H, C.GRID_W))
    torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(C.OUTPUT_NAMES),
                      dynamic_axes=axes, dynamo=False)
    return path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lidar_cells": 16}, "lidar"),
        ({"axes": None}, "fixed batch"),
        ({"input_names": ("kinematics", "lidar", "camera")}, "inputs"),
    ],
    ids=["wrong-lidar-shape", "static-batch", "wrong-input-name"],
)
def test_wrong_io_is_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    path = _export_raw(_WrongLidar(), tmp_path / "wrong.onnx", **kwargs)
    manifest = build_manifest(path, name="policy", version=1)  # honest hash: only the I/O is wrong
    with pytest.raises(ContractError, match=match):
        ModelRuntime(path, manifest)


def test_manifest_declaring_another_contract_is_refused(policy: tuple[PolicyNet, Path]) -> None:
    _, path = policy
    manifest = build_manifest(path, name="policy", version=1).model_copy(update={"obs_version": 99})
    with pytest.raises(ContractError, match="obs_version"):
        ModelRuntime(path, manifest)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("grid"),
        lambda b: b.__setitem__("lidar", b["lidar"].astype(np.float64)),
        lambda b: b.__setitem__("kinematics", b["kinematics"][:, :10]),
        lambda b: b.__setitem__("grid", b["grid"][:1]),
        lambda b: b.__setitem__("kinematics", b["kinematics"][0]),
        lambda b: [b.__setitem__(k, v[:0]) for k, v in list(b.items())],
    ],
    ids=["missing", "float64", "short-kinematics", "batch-mismatch", "no-batch-axis", "empty"],
)
def test_bad_batches_are_refused(policy: tuple[PolicyNet, Path], mutate) -> None:
    _, path = policy
    rt = ModelRuntime(path, build_manifest(path, name="policy", version=1))
    batch = _batch(2)
    mutate(batch)
    with pytest.raises(ContractError):
        rt.run(batch)
    assert rt.latency.calls == 0


def test_device_choice(policy: tuple[PolicyNet, Path]) -> None:
    _, path = policy
    manifest = build_manifest(path, name="policy", version=1)
    with pytest.raises(ConfigError):
        ModelRuntime(path, manifest, device="tpu")
    with pytest.raises(ConfigError):
        ModelRuntime(path, manifest, intra_op_threads=0)
    auto = ModelRuntime(path, manifest, device="auto")
    assert auto.provider == ("CUDAExecutionProvider" if cuda_works() else "CPUExecutionProvider")
    if not cuda_works():
        with pytest.raises(ModelError, match="cuda"):
            ModelRuntime(path, manifest, device="cuda")


def test_bucket_for() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 512)] == [1, 2, 4, 8, 64, 128, 512]
    with pytest.raises(ContractError):
        bucket_for(513)


def test_load_runtime_from_registry(policy: tuple[PolicyNet, Path], tmp_path: Path) -> None:
    _, path = policy
    with Registry(tmp_path / "reg") as reg:
        reg.register(path)
        reg.set_stage(1, "validated", "eval ok")
    rt = load_runtime(tmp_path / "reg", "validated", device="cpu")
    assert rt.manifest.version == 1
    assert rt.run(_batch(3))[0].shape == (3, 2)


@pytest.mark.skipif(not cuda_works(), reason="needs a working CUDA execution provider")
def test_cuda_graph_buckets_match_cpu(policy: tuple[PolicyNet, Path]) -> None:
    _, path = policy
    manifest = build_manifest(path, name="policy", version=1)
    cpu = ModelRuntime(path, manifest, device="cpu")
    gpu = ModelRuntime(path, manifest, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    for n in (1, 3, 64, 3, 256):  # 3 twice: the captured graph is replayed with new inputs
        batch = _batch(n, seed=n + gpu.latency.calls)
        a_cpu, c_cpu = cpu.run(batch)
        a_gpu, c_gpu = gpu.run(batch)
        assert a_gpu.shape == (n, 2) and c_gpu.shape == (n, 1)
        np.testing.assert_allclose(a_gpu, a_cpu, atol=1e-3)
        np.testing.assert_allclose(c_gpu, c_cpu, atol=1e-3)


def test_fake_runner_is_a_model_runner_with_programmed_faults() -> None:
    fake = FakeRunner(faults={1: "nan", 2: "garbage", 3: "raise"})
    assert isinstance(fake, ModelRunner)
    batch = C.empty_batch(2)
    speed, set_speed = C.EGO_FEATURES.index("speed_mps"), C.EGO_FEATURES.index("set_speed_mps")
    batch["kinematics"][:, set_speed] = 30.0
    batch["kinematics"][:, speed] = [29.0, 40.0]
    action, conf = fake.run(batch)
    np.testing.assert_allclose(action[:, 0], [0.5, -3.0])
    assert np.isnan(fake.run(batch)[0]).all()
    assert fake.run(batch)[0].shape == (2, 7)
    with pytest.raises(ModelError):
        fake.run(batch)
    assert fake.run(batch)[0].shape == (2, 2) and fake.batch_sizes == [2] * 5
    assert validate_batch(batch) == 2


def test_bound_bucket_pads_and_slices_like_the_plain_session(policy: tuple[PolicyNet, Path]) -> None:
    """The CUDA path's IO-binding/padding logic, run on the CPU EP so it is exercised without a GPU."""
    from driveloop.edge.runtime import BoundBucket

    _, path = policy
    plain = ModelRuntime(path, build_manifest(path, name="policy", version=1), device="cpu")
    bucket = BoundBucket(str(path), 1, 8, device="cpu", graph=False)
    for n, seed in ((3, 1), (8, 2), (1, 3), (3, 4)):  # refills must not leak rows of the previous batch
        batch = _batch(n, seed=seed)
        action, conf = bucket.run(batch, n)
        ref_a, ref_c = plain.run(batch)
        assert action.shape == (n, 2) and conf.shape == (n, 1)
        np.testing.assert_allclose(action, ref_a, atol=1e-6)
        np.testing.assert_allclose(conf, ref_c, atol=1e-6)
    with pytest.raises(ContractError):
        bucket.run(_batch(9), 9)


def test_cpu_io_binding_gives_the_plain_sessions_outputs(policy: tuple[PolicyNet, Path]) -> None:
    """The bound buffers are reused across calls: outputs must equal sess.run's and never alias each other."""
    from driveloop.edge import runtime as runtime_mod

    _, path = policy
    rt = ModelRuntime(path, build_manifest(path, name="p", version=1), device="cpu")
    plain = list(C.OUTPUT_NAMES)
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for seed, n in enumerate((1, 8, 3, 8, 1, 64)):
        batch = _batch(n, seed)
        if seed == 2:  # a non-contiguous view (a fleet group sliced out of the sensors' batch)
            batch = {k: np.repeat(v, 2, axis=0)[::2] for k, v in batch.items()}
            assert not batch["grid"].flags.c_contiguous
        action, conf = rt.run(batch)
        expected = rt._cpu.run(plain, {k: np.ascontiguousarray(v) for k, v in batch.items()})
        np.testing.assert_array_equal(action, expected[0])
        np.testing.assert_array_equal(conf, expected[1])
        if previous is not None and previous[0].shape == action.shape:
            assert not np.shares_memory(previous[0], action)
        previous = (action, conf)
    assert sorted(rt._cpu_bound) == [1, 3, 8, 64]
    kept = np.array(previous[0])
    rt.run(_batch(64, 99))
    np.testing.assert_array_equal(previous[0], kept)  # a returned array is the caller's, not a live buffer

    with rt._cpu_lock:  # another thread holds the buffers: the plain session answers the same
        action, conf = rt.run(_batch(8, 5))
    np.testing.assert_array_equal(action, rt._cpu.run(plain, _batch(8, 5))[0])

    for n in range(1, runtime_mod.MAX_CPU_BINDINGS + 3):  # many batch sizes: the cache stays bounded
        rt.run(_batch(n, n))
    assert 0 < len(rt._cpu_bound) <= runtime_mod.MAX_CPU_BINDINGS
