"""INT8 static quantization of a registered policy graph with ONNX Runtime (QDQ, per-channel weights).

Steps (``quantize_int8``):
0. ORT's quantization pre-processing (shape inference, constant folding) on the float graph, as its
   quantizer recommends; node names and the dynamic batch axis survive it;
1. calibration frames come from ``compress_frames.select_calibration`` (recorded frames, safety events
   included) and are fed in batches to ``quantize_static`` (MinMax ranges);
2. per-node error: each weight-bearing node (Conv, Gemm, MatMul) is quantized *alone* and its output
   tensor compared with the float graph's on the calibration frames (relative RMS error, so nodes of any
   scale compare), together with the error it causes in the action output (scaled by the loss's units:
   1 m/s², 0.05 rad);
3. the nodes whose own error exceeds ``max_node_rel_error`` stay float (``nodes_to_exclude``), worst
   first, at most ``max_excluded`` of them (``pick_excluded``, pure); everything else is quantized once more
   with those exclusions, and the final graph's action error on the calibration frames is reported.

Only Conv/Gemm/MatMul are quantized: the normalisation ``Mul`` nodes multiply by per-channel constant
buffers that the quantizer would otherwise treat as weights with the wrong axis (ORT then refuses to run).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.compress_frames import Frames
from driveloop.core.exceptions import ConfigError, ModelError

logger = logging.getLogger(__name__)

QUANT_OPS = ("Conv", "Gemm", "MatMul")
ACTION_SCALES = (1.0, 0.05)  # m/s², rad: the units of one loss unit (cloud.model.LossWeights)


@dataclass(frozen=True)
class Int8Config:
    calibration_frames: int = 512
    event_share: float = 0.25  # up to this share of the calibration set are safety-event frames
    calibration_batch: int = 64
    max_node_rel_error: float = 0.05  # a node whose own quantized output is off by more stays float
    max_excluded: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_frames < 1 or self.calibration_batch < 1 or self.max_excluded < 0:
            raise ConfigError("int8 calibration_frames and calibration_batch must be >= 1, max_excluded >= 0")
        if not 0.0 < self.event_share <= 1.0 or not (math.isfinite(self.max_node_rel_error) and self.max_node_rel_error >= 0):
            raise ConfigError("int8 event_share must be in (0, 1] and max_node_rel_error >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_excluded(errors: Mapping[str, float], max_rel_error: float, max_excluded: int) -> list[str]:
    """Nodes to keep float: error > ``max_rel_error``, worst first (ties by name), at most ``max_excluded``."""
    over = sorted((n for n, e in errors.items() if e > max_rel_error or not math.isfinite(e)),
                  key=lambda n: (-errors[n] if math.isfinite(errors[n]) else -math.inf, n))
    return over[:max_excluded]


def action_error(reference: np.ndarray, other: np.ndarray) -> float:
    """RMS of the action difference in loss units (accel / 1 m/s², steering / 0.05 rad)."""
    scale = np.asarray(ACTION_SCALES, dtype=np.float64)
    return float(np.sqrt(np.mean(((other.astype(np.float64) - reference) / scale) ** 2)))


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """||other - reference|| / ||reference|| (RMS ratio; inf when the reference is all zero and other is not)."""
    ref = reference.astype(np.float64)
    num, den = float(np.sqrt(np.mean((other - ref) ** 2))), float(np.sqrt(np.mean(ref**2)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _reader(frames: Frames, batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = (frames.batch(slice(lo, lo + batch)) for lo in range(0, len(frames), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Batches()


def quantizable_nodes(model_path: Path) -> list[str]:
    """Names of the weight-bearing nodes the quantizer may touch, in graph order."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    nodes = [n.name for n in graph.node if n.op_type in QUANT_OPS]
    if len(set(nodes)) != len(nodes) or not all(nodes):
        raise ModelError(f"{model_path.name}: quantizable nodes need unique names, got {nodes}")
    return nodes


def _quantize(src: Path, dst: Path, frames: Frames, batch: int, *, only: list[str] | None = None,
              exclude: list[str] | None = None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    try:
        quantize_static(str(src), str(dst), _reader(frames, batch), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANT_OPS),
                        nodes_to_quantize=only, nodes_to_exclude=exclude or [])
    except Exception as e:  # the quantizer raises untyped errors for graphs it cannot handle
        raise ModelError(f"INT8 quantization of {src.name} failed: {e}") from e


def _with_outputs(src: Path, dst: Path, names: list[str]) -> Path:
    """A copy of the graph that also outputs the tensors ``names`` (for per-node comparisons)."""
    import onnx

    model = onnx.load(str(src))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
    return dst


def _run(path: Path, frames: Frames, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in sess.run(outputs, frames.batch())]


def _dequantized_name(model_path: Path, tensor: str) -> str:
    """The name under which the QDQ graph carries ``tensor`` after its own quantize/dequantize (if it has one)."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    q = next((n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == tensor), None)
    dq = None if q is None else next((n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]), None)
    return tensor if dq is None else dq.output[0]


def node_errors(src: Path, frames: Frames, work_dir: Path, batch: int) -> dict[str, dict[str, float]]:
    """Per quantizable node: its output's relative error and the action error when it alone is INT8."""
    import onnx

    outputs = {n.name: n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type in QUANT_OPS}
    probe = _with_outputs(src, work_dir / "float_probe.onnx", list(outputs.values()))
    ref = dict(zip(["action", *outputs.values()], _run(probe, frames, ["action", *outputs.values()])))
    out: dict[str, dict[str, float]] = {}
    for node in quantizable_nodes(src):
        solo = work_dir / "solo.onnx"
        _quantize(src, solo, frames, batch, only=[node])
        tensor = _dequantized_name(solo, outputs[node])
        action, got = _run(_with_outputs(solo, work_dir / "solo_probe.onnx", [tensor]), frames, ["action", tensor])
        out[node] = {"rel_error": relative_error(ref[outputs[node]], got), "action_error": action_error(ref["action"], action)}
    return out


def describe_qdq(path: Path) -> dict[str, Any]:
    """What a quantized graph holds: QDQ node counts, and per weight its quantization axis and scale count."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    weights: dict[str, dict[str, Any]] = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8 \
                and inits[n.input[0]].ndim >= 2:
            axis = next((a.i for a in n.attribute if a.name == "axis"), None)
            weights[n.input[0]] = {"axis": axis, "scales": int(np.asarray(inits[n.input[1]]).size),
                                   "channels": int(inits[n.input[0]].shape[0 if axis is None else axis])}
    float_nodes = [n.name for n in graph.node if n.op_type in QUANT_OPS
                   and any(i in inits and inits[i].dtype == np.float32 and inits[i].ndim >= 2 for i in n.input)]
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "weights": weights, "float_nodes": float_nodes}


def quantize_int8(src: Path, dst: Path, calibration: Frames, config: Int8Config, work_dir: Path) -> dict[str, Any]:
    """Quantize ``src`` into ``dst`` (see module docstring); returns the per-node errors, exclusions and final error."""
    if len(calibration) == 0:
        raise ModelError("INT8 calibration needs at least one frame")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work_dir.mkdir(parents=True, exist_ok=True)
    pre = work_dir / "float_pre.onnx"
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as e:  # untyped errors from shape inference / the optimizer
        raise ModelError(f"INT8 pre-processing of {src.name} failed: {e}") from e
    errors = node_errors(pre, calibration, work_dir, config.calibration_batch)
    excluded = pick_excluded({n: e["rel_error"] for n, e in errors.items()}, config.max_node_rel_error, config.max_excluded)
    _quantize(pre, dst, calibration, config.calibration_batch, exclude=excluded)
    (ref,) = _run(src, calibration, ["action"])
    (got,) = _run(dst, calibration, ["action"])
    report = {"node_errors": errors, "excluded_nodes": excluded, "action_error": action_error(ref, got),
              "max_abs_action_diff": [float(x) for x in np.abs(got - ref).max(axis=0)], "qdq": describe_qdq(dst)}
    logger.info("int8: excluded %s; action error %.4f", excluded or "none", report["action_error"])
    return report
