"""ONNX export: a valid graph with a dynamic batch axis that matches torch within 1e-4 in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from driveloop.cloud.export import OPSET, PARITY_TOL, check_parity, export_onnx
from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
from driveloop.contracts import observation as C
from driveloop.core.exceptions import ModelError


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[PolicyNet, Path]:
    net = PolicyNet(PolicyConfig(seed=11))
    path = export_onnx(net, tmp_path_factory.mktemp("export") / "model.onnx")
    return net, path


def test_graph_has_contract_names_dynamic_batch_and_opset(exported: tuple[PolicyNet, Path]) -> None:
    _, path = exported
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(C.INPUT_NAMES)
    assert [o.name for o in model.graph.output] == list(C.OUTPUT_NAMES)
    for value, spec in zip([*model.graph.input, *model.graph.output], [*C.INPUTS, *C.OUTPUTS]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert [d.dim_value for d in dims[1:]] == list(spec.shape)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    assert not list(path.parent.glob("*.tmp"))  # atomic: no temp file left behind


def test_parity_within_tolerance_through_a_real_ort_session(exported: tuple[PolicyNet, Path]) -> None:
    net, path = exported
    err = check_parity(net, path, n=256, seed=3)
    assert 0.0 <= err <= PARITY_TOL


@pytest.mark.parametrize("batch", [1, 5, 64, 200])
def test_ort_runs_any_batch_size_and_matches_torch(exported: tuple[PolicyNet, Path], batch: int) -> None:
    net, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(batch, seed=batch)
    action, conf = sess.run(None, {n: t.numpy() for n, t in zip(C.INPUT_NAMES, inputs)})
    with torch.no_grad():
        ref_action, ref_conf = net.eval()(*inputs)
    np.testing.assert_allclose(action, ref_action.numpy(), atol=PARITY_TOL)
    np.testing.assert_allclose(conf, ref_conf.numpy(), atol=PARITY_TOL)


def test_parity_catches_a_model_that_differs_from_the_graph(exported: tuple[PolicyNet, Path]) -> None:
    _, path = exported
    other = PolicyNet(PolicyConfig(seed=12))  # same architecture, other weights
    with torch.no_grad():
        other.head.weight.mul_(100.0)  # make the difference visible at the outputs
    with pytest.raises(ModelError, match="parity"):
        check_parity(other, path, n=64)


def test_parity_rejects_an_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError):
        check_parity(PolicyNet(), bad, n=8)
    with pytest.raises(ModelError):
        check_parity(PolicyNet(), bad, n=0)


def test_export_keeps_training_mode_and_overwrites_atomically(tmp_path: Path) -> None:
    net = PolicyNet(PolicyConfig(seed=1)).train()
    dest = tmp_path / "sub" / "model.onnx"
    export_onnx(net, dest)
    first = dest.read_bytes()
    assert net.training
    export_onnx(PolicyNet(PolicyConfig(seed=2)), dest)
    assert dest.read_bytes() != first
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx"]


class _NotAPolicy(torch.nn.Module):
    def forward(self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    with pytest.raises(ModelError, match="export"):
        export_onnx(_NotAPolicy(), dest)
    assert list(tmp_path.iterdir()) == []
