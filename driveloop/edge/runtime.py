"""ModelRuntime: the vehicle's ONNX Runtime session, checked before it is trusted with a vehicle.

Before the first inference the runtime proves that it runs the model the fleet server released:
the file's sha256 must equal the manifest's (IntegrityError), and the session's input/output names,
shapes and dtypes must equal both ``contracts.observation`` and the manifest (ContractError). A model that
passes is run on:

- the CPU execution provider (default, and everywhere without a working GPU), one intra-op thread so
  several vehicles share a small CPU predictably; each batch size's inputs and outputs are numpy
  buffers bound once by IO binding (``CpuBinding``); or
- the CUDA execution provider when one is present *and works* (ORT silently falls back to CPU when the
  CUDA libraries fail to load, so we check the provider the session really got). On CUDA the batch is
  padded up to a fixed bucket (1, 2, 4, … 512); each bucket gets its own session with CUDA graphs on,
  inputs/outputs bound once to fixed device buffers by IO binding, so a tick is one H2D copy, one
  graph replay and one D2H copy.

Every call's latency is recorded (``latency``) for the health report's inference p99.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from driveloop.contracts import observation as C
from driveloop.core.exceptions import ConfigError, ContractError, IntegrityError, ModelError

if TYPE_CHECKING:
    from driveloop.contracts.manifest import ModelManifest

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_CPU_BINDINGS = 16  # batch sizes with bound CPU buffers kept at once (a few KB each at fleet sizes)
DEVICES = ("auto", "cpu", "cuda")
_ORT_FLOAT = "tensor(float)"


@runtime_checkable
class ModelRunner(Protocol):
    """Anything that turns a contract batch into (actions[B,2], confidence[B,1]) float32 arrays."""

    @property
    def manifest(self) -> ModelManifest: ...

    @property
    def provider(self) -> str: ...

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


def validate_batch(batch: dict[str, np.ndarray]) -> int:
    """Check a batch against the contract (names, float32, trailing shapes, one batch size); returns B."""
    missing = [n for n in C.INPUT_NAMES if n not in batch]
    if missing:
        raise ContractError(f"batch lacks inputs {missing}")
    sizes = set()
    for spec in C.INPUTS:
        arr = batch[spec.name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise ContractError(f"input {spec.name} must be a float32 ndarray, got {getattr(arr, 'dtype', type(arr))}")
        if arr.ndim != len(spec.shape) + 1 or tuple(arr.shape[1:]) != spec.shape:
            raise ContractError(f"input {spec.name} has shape {arr.shape}, contract is [B, {', '.join(map(str, spec.shape))}]")
        sizes.add(arr.shape[0])
    if len(sizes) != 1 or 0 in sizes:
        raise ContractError(f"inputs disagree on (or have zero) batch size: {sorted(sizes)}")
    return sizes.pop()


def check_session_io(inputs: list[Any], outputs: list[Any], manifest: ModelManifest) -> None:
    """Compare an ORT session's I/O metadata with the contract and the manifest; ContractError if not equal."""
    if not manifest.io_matches_contract():
        raise ContractError(
            f"manifest v{manifest.version} declares obs_version {manifest.obs_version} I/O {manifest.inputs} -> "
            f"{manifest.outputs}, this vehicle's contract is {C.io_contract()}"
        )
    for kind, metas, specs in (("input", inputs, C.INPUTS), ("output", outputs, C.OUTPUTS)):
        got = [m.name for m in metas]
        if got != [s.name for s in specs]:
            raise ContractError(f"model {kind}s are {got}, contract is {[s.name for s in specs]}")
        for meta, spec in zip(metas, specs):
            dims = list(meta.shape)
            if meta.type != _ORT_FLOAT:
                raise ContractError(f"model {kind} {spec.name} is {meta.type}, contract is float32")
            if len(dims) != len(spec.shape) + 1 or list(dims[1:]) != list(spec.shape):
                want = ", ".join(map(str, spec.shape))
                raise ContractError(f"model {kind} {spec.name} has shape {dims}, contract is [batch, {want}]")
            if isinstance(dims[0], int) and dims[0] > 0:
                raise ContractError(f"model {kind} {spec.name} has a fixed batch size {dims[0]}; "
                                    "a dynamic batch axis is required")


@lru_cache(maxsize=1)
def cuda_works() -> bool:
    """True when the CUDA EP is built in AND a session really gets it (libraries load, a GPU is present)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    probe = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the failed CUDA load is expected on CPU machines; we log it ourselves
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        ok = sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception as e:  # a missing libcudart or no device shows up as a load error
        logger.info("CUDA execution provider unusable: %s", e)
        return False
    return ok


def bucket_for(n: int) -> int:
    """The smallest fixed batch bucket that holds ``n`` rows (CUDA graphs need fixed shapes)."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    raise ContractError(f"batch of {n} exceeds the largest bucket {BATCH_BUCKETS[-1]}")


class LatencyLog:
    """Ring buffer of the last ``capacity`` call latencies (seconds)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._s: deque[float] = deque(maxlen=capacity)
        self.calls = 0

    def record(self, seconds: float) -> None:
        self._s.append(seconds)
        self.calls += 1

    def percentile_us(self, q: float) -> float:
        """q-th percentile in microseconds over the buffered calls; NaN before the first call."""
        return float(np.percentile(np.fromiter(self._s, float), q) * 1e6) if self._s else float("nan")


class BoundBucket:
    """One fixed batch size with its buffers bound once by IO binding (on CUDA: plus a captured CUDA graph).

    ``device="cpu"`` builds the same thing on the CPU EP; it exists so the padding/binding logic is
    tested on machines without a GPU.
    """

    def __init__(self, model_path: str, threads: int, size: int, *, device: str = "cuda", graph: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if device == "cuda":
            provider: Any = ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1" if graph else "0"})
        else:
            provider = "CPUExecutionProvider"
        self.sess = ort.InferenceSession(model_path, opts, providers=[provider])
        if self.sess.get_providers()[0] != ("CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"):
            raise ModelError(f"{device} session fell back to {self.sess.get_providers()[0]}")
        self.size = size
        self.host = {s.name: np.zeros((size, *s.shape), np.float32) for s in C.INPUTS}
        self.dev = {n: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in self.host.items()}
        self.outs = {s.name: ort.OrtValue.ortvalue_from_shape_and_type((size, *s.shape), np.float32, device, 0)
                     for s in C.OUTPUTS}
        self.binding = self.sess.io_binding()
        for name, value in self.dev.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.sess.run_with_iobinding(self.binding)  # first run captures the CUDA graph (when enabled)

    def run(self, batch: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [0, n) of the bucket carry the batch; the padding rows are zeroed, computed and dropped."""
        if not 0 < n <= self.size:
            raise ContractError(f"batch of {n} does not fit bucket {self.size}")
        for name, host in self.host.items():
            host[:n] = batch[name]
            host[n:] = 0.0
            self.dev[name].update_inplace(host)  # same device address: the captured graph stays valid
        self.sess.run_with_iobinding(self.binding)
        action, conf = self.binding.copy_outputs_to_cpu()
        return np.array(action[:n]), np.array(conf[:n])


class CpuBinding:
    """The CPU session's IO binding for one batch size: inputs and outputs live in numpy buffers bound once.

    ``sess.run`` converts the feed and allocates the outputs on every call; with the buffers bound,
    a call is three memcpys and one ``run_with_iobinding`` (measured ~10 % cheaper per fleet tick in
    the control loop). Not thread-safe: ``ModelRuntime`` uses it under a lock and falls back to
    ``sess.run`` when another thread holds it.
    """

    def __init__(self, sess: Any, size: int) -> None:
        self.host = C.empty_batch(size)
        self.outs = {s.name: np.empty((size, *s.shape), np.float32) for s in C.OUTPUTS}
        self.binding = sess.io_binding()
        for name, arr in self.host.items():
            self.binding.bind_cpu_input(name, arr)
        for name, arr in self.outs.items():
            self.binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self._sess = sess

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        for name, host in self.host.items():
            np.copyto(host, batch[name])
        self._sess.run_with_iobinding(self.binding)
        return self.outs["action"].copy(), self.outs["confidence"].copy()


class ModelRuntime:
    """A verified ONNX Runtime session for one model (see module docstring). Implements ModelRunner."""

    def __init__(
        self, onnx_path: Path | str, manifest: ModelManifest, *, device: str = "auto", intra_op_threads: int = 1
    ) -> None:
        from driveloop.contracts.manifest import sha256_file

        if device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
        if intra_op_threads < 1:
            raise ConfigError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        actual = sha256_file(self.path)
        if actual != manifest.sha256:
            raise IntegrityError(
                f"{self.path.name}: sha256 {actual[:12]}… does not match manifest v{manifest.version} ({manifest.sha256[:12]}…)"
            )
        self._manifest = manifest
        self._threads = intra_op_threads
        self._cpu = self._cpu_session()
        check_session_io(self._cpu.get_inputs(), self._cpu.get_outputs(), manifest)
        if device == "cuda" and not cuda_works():
            raise ModelError("device 'cuda' requested but the CUDA execution provider does not work here")
        self._use_cuda = device != "cpu" and cuda_works()
        self._buckets: dict[int, BoundBucket] = {}
        self._cpu_bound: dict[int, CpuBinding] = {}  # per batch size; a fleet uses one or a few
        self._cpu_lock = threading.Lock()
        self._cuda_graphs = True  # cleared if a capture fails (e.g. a node the CUDA EP does not take)
        self.latency = LatencyLog()
        logger.info("model v%d loaded on %s", manifest.version, self.provider)

    def _cpu_session(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's load errors are untyped (corrupt protobuf, unknown op…)
            raise ModelError(f"ONNX Runtime cannot load {self.path.name}: {e}") from e

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self._use_cuda else "CPUExecutionProvider"

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Infer one batch; returns (action[B,2], confidence[B,1]) float32. ContractError on a bad batch."""
        n = validate_batch(batch)
        t0 = time.perf_counter()
        if self._use_cuda:
            size = bucket_for(n)
            bucket = self._buckets.get(size) or self._new_bucket(size)
            action, conf = bucket.run(batch, n)
        elif self._cpu_lock.acquire(blocking=False):
            try:
                bound = self._cpu_bound.get(n)
                if bound is None:
                    if len(self._cpu_bound) >= MAX_CPU_BINDINGS:
                        self._cpu_bound.clear()
                    bound = self._cpu_bound[n] = CpuBinding(self._cpu, n)
                action, conf = bound.run(batch)
            finally:
                self._cpu_lock.release()
        else:  # another thread is using the bound buffers
            feed = {name: np.ascontiguousarray(batch[name]) for name in C.INPUT_NAMES}
            action, conf = self._cpu.run(list(C.OUTPUT_NAMES), feed)
        self.latency.record(time.perf_counter() - t0)
        return action, conf

    def _new_bucket(self, size: int) -> BoundBucket:
        """A session for one batch bucket; without CUDA graphs if capturing fails (IO binding still applies)."""
        if self._cuda_graphs:
            try:
                bucket = self._buckets[size] = BoundBucket(str(self.path), self._threads, size, graph=True)
                return bucket
            except Exception as e:  # ORT reports capture problems as untyped runtime errors
                logger.warning("CUDA graph capture failed (%s); using IO binding without graphs", e)
                self._cuda_graphs = False
        try:
            bucket = self._buckets[size] = BoundBucket(str(self.path), self._threads, size, graph=False)
        except Exception as e:
            raise ModelError(f"cannot run {self.path.name} on CUDA at batch {size}: {e}") from e
        return bucket

    def warmup(self, sizes: tuple[int, ...] = (1,)) -> None:
        """Run zero batches once per size so first-tick latency (allocations, graph capture) is paid now."""
        for n in sizes:
            self.run(C.empty_batch(n))

