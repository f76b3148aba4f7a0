"""Export the torch policy to ONNX and prove the exported graph computes what torch computes.

Why a parity check: the vehicle runs the ONNX graph, the cloud trains the torch module; an exporter
bug (a wrong op lowering, a lost normalisation buffer) would ship a different policy than the one the
eval gate scored. Every export is checked against ONNX Runtime at batch 1 and at a fleet batch, and
a model that differs by more than ``PARITY_TOL`` is refused (ModelError).

Rules: the graph has a dynamic batch axis named ``batch`` on every input and output, names from
``contracts.observation``; the file appears atomically (temp file, fsync, rename) so a crash never leaves a
half-written model where the registry or a vehicle could pick it up.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from driveloop.cloud.model import example_inputs
from driveloop.contracts import observation as C
from driveloop.core.atomic import fsync_replace, temp_path_for
from driveloop.core.exceptions import ModelError

logger = logging.getLogger(__name__)

OPSET = 17
PARITY_TOL = 1e-4
BATCH_AXIS = "batch"
_PARITY_BATCH = 64  # a fleet-sized batch
_PARITY_SINGLES = 16  # how many samples are also run one at a time (batch 1)


def export_onnx(model: nn.Module, path: Path | str, *, opset: int = OPSET) -> Path:
    """Export ``model`` (forward(kinematics, lidar, grid) -> (action, confidence)) to ``path`` atomically."""
    dest = Path(path)
    was_training = model.training
    model.eval()
    tmp = temp_path_for(dest)
    try:
        axes = {n: {0: BATCH_AXIS} for n in (*C.INPUT_NAMES, *C.OUTPUT_NAMES)}
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter gives a small, fully static graph (no symbolic-shape ops) with a
            # dynamic batch; its deprecation notice is not actionable for us.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model,
                example_inputs(1),
                str(tmp),
                input_names=list(C.INPUT_NAMES),
                output_names=list(C.OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        _check_graph(tmp)
        fsync_replace(tmp, dest)
    except ModelError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # exporter failures come in many types; wrap them at the boundary
        tmp.unlink(missing_ok=True)
        raise ModelError(f"ONNX export to {dest} failed: {e}") from e
    finally:
        model.train(was_training)
    logger.info("exported %s (%d bytes, opset %d)", dest, dest.stat().st_size, opset)
    return dest


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"exported graph {path.name} is not valid ONNX: {e}") from e


def _cpu_session(onnx_path: Path | str) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
        raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {e}") from e


def check_parity(
    model: nn.Module, onnx_path: Path | str, *, n: int = 256, seed: int = 0, tol: float = PARITY_TOL
) -> float:
    """Max |ORT - torch| over both outputs for ``n`` random contract-shaped samples; ModelError if > tol.

    The samples are run in fleet batches of 64 and the first few also one at a time (batch 1), so a
    graph whose batch axis is not really dynamic fails here, not on the vehicle.
    """
    if n < 1:
        raise ModelError(f"parity needs n >= 1 samples, got {n}")
    sess = _cpu_session(onnx_path)
    inputs = example_inputs(n, seed=seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_action, ref_conf = (t.numpy() for t in model(*inputs))
    finally:
        model.train(was_training)
    feeds = {name: t.numpy() for name, t in zip(C.INPUT_NAMES, inputs)}
    worst = 0.0
    chunks = [(s, min(s + _PARITY_BATCH, n)) for s in range(0, n, _PARITY_BATCH)]
    chunks += [(i, i + 1) for i in range(min(n, _PARITY_SINGLES))]
    for lo, hi in chunks:
        try:
            action, conf = sess.run(list(C.OUTPUT_NAMES), {k: v[lo:hi] for k, v in feeds.items()})  # type: ignore[attr-defined]
        except Exception as e:
            raise ModelError(f"ONNX Runtime failed on a batch of {hi - lo}: {e}") from e
        if action.shape != ref_action[lo:hi].shape or conf.shape != ref_conf[lo:hi].shape:
            raise ModelError(f"ONNX output shapes {action.shape}, {conf.shape} differ from torch at batch {hi - lo}")
        err = max(float(np.max(np.abs(action - ref_action[lo:hi]))), float(np.max(np.abs(conf - ref_conf[lo:hi]))))
        if not np.isfinite(err):
            raise ModelError(f"non-finite parity error at batch {hi - lo}")
        worst = max(worst, err)
    if worst > tol:
        raise ModelError(f"ONNX/torch parity error {worst:.3g} exceeds {tol:.3g}")
    logger.info("parity ok: max abs error %.3g over %d samples", worst, n)
    return worst
