"""Simulation as Ray work: evaluation episodes, fleet shards and expert episodes, on a cluster or in-process.

A caller cuts its work into *units* (a module-level function and its arguments: a few vehicles' plans with
their seeds, a scenario case, an expert episode) and hands them to a :class:`SimExecutor`. With the Ray
backend each unit is a Ray task (fleet shards: one Ray actor per shard); with the local backend the same
units run one after another in this process. Rules kept here:

- **Same seeds, same results either way.** A unit is a pure function of its arguments, and results come
  back in the order of the units, whichever node ran them. Callers cut work only where a vehicle's result
  does not depend on the vehicles beside it (its simulator, sensors and supervisor are its own; ONNX
  Runtime's CPU rows do not depend on the batch), so the Ray path and the in-process path agree exactly.
- **Ray when asked.** ``backend="auto"`` uses Ray when ``RAY_ADDRESS`` names a cluster; ``"ray"`` also
  starts a local runtime (``ray_runtime.ensure_ray``); ``"local"`` never imports Ray.
- **No starvation.** Every unit asks for ``cpus_per_unit`` (1) CPU, so Ray runs at most as many units as
  the cluster has CPUs and a Ray Data or Ray Train stage holding CPUs makes units wait, never oversubscribe
  (``ray_runtime.cpu_split`` keeps Data and Train apart; the pipeline evaluates after training returned).
  Units are spread over the nodes (``SPREAD``): simulation is CPU-bound and needs no locality.
- **Nothing lost.** A unit whose worker process or node dies is run again (``max_retries``); a fleet
  shard whose actor dies is driven again by a new actor (as many times). An exception raised by the
  unit itself is a result, not a crash: it is not retried and reaches the caller as the DriveloopError it
  was (or a PipelineError naming it).
- **The model crosses the boundary as bytes.** :class:`ModelPayload` carries the ONNX bytes and the
  manifest; the worker writes them to its own disk once and ``ModelRuntime`` checks the sha256 against
  the manifest before any vehicle uses it, as on a vehicle.
- **Where work ran is reported.** Every unit records its node id and worker; ``Execution`` (``backend``,
  ``nodes``, ``workers``) is what each fleet and evaluation command prints in its JSON.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from driveloop.core.exceptions import ConfigError, DriveloopError, PipelineError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ray", "local")
LOCAL_NODE = "local"


@dataclass(frozen=True)
class Placement:
    """Where one unit ran: the Ray node id (``local`` in-process) and the worker process."""

    node: str
    worker: str


@dataclass(frozen=True)
class Execution:
    """Where a command's simulation ran: the JSON ``execution`` object of fleet and evaluation commands.

    ``nodes`` and ``workers`` count the distinct nodes and worker processes that ran at least one unit
    (0 when every result came from a cache); ``node_ids`` names the nodes."""

    backend: str
    nodes: int
    workers: int
    units: int = 0
    node_ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, backend: str, placements: Sequence[Placement]) -> Execution:
        nodes = tuple(sorted({p.node for p in placements}))
        return cls(backend, len(nodes), len({(p.node, p.worker) for p in placements}), len(placements), nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "nodes": self.nodes, "workers": self.workers, "units": self.units,
                "node_ids": list(self.node_ids)}


@dataclass(frozen=True)
class Mapped:
    """Results of a map, in the order of its units, with where each ran."""

    results: list[Any]
    placements: list[Placement]
    backend: str

    @property
    def execution(self) -> Execution:
        return Execution.of(self.backend, self.placements)


# ---------------------------------------------------------------------------------------- the model


_runtimes: dict[tuple[str, str], Any] = {}  # per process: (sha256, device) -> ModelRuntime, oldest first
_runtimes_lock = threading.Lock()
_MAX_RUNTIMES = 4  # a gate needs two at once; a long-lived worker must not keep every model it ever saw


@dataclass(frozen=True)
class ModelPayload:
    """A registry model as it travels to a worker: the ONNX bytes and the manifest they must match."""

    onnx: bytes
    manifest: Any  # contracts.manifest.ModelManifest

    @classmethod
    def read(cls, onnx_path: str | os.PathLike[str], manifest: Any) -> ModelPayload:
        return cls(Path(onnx_path).read_bytes(), manifest)

    @property
    def sha256(self) -> str:
        return str(self.manifest.sha256)

    def runtime(self, device: str = "cpu") -> Any:
        """This process's ModelRuntime for the model (loaded once per process, verified on load)."""
        from driveloop.core.atomic import file_sha256, write_atomic
        from driveloop.edge.runtime import ModelRuntime

        key = (self.sha256, device)
        with _runtimes_lock:
            if key not in _runtimes:
                path = Path(tempfile.gettempdir()) / "driveloop-models" / f"{self.sha256}.onnx"
                if not path.is_file() or file_sha256(path) != self.sha256:
                    write_atomic(path, self.onnx)
                while len(_runtimes) >= _MAX_RUNTIMES:
                    del _runtimes[next(iter(_runtimes))]
                runtime = ModelRuntime(path, self.manifest, device=device)  # IntegrityError on bad bytes
                runtime.warmup()  # first-call allocations are not a missed deadline
                _runtimes[key] = runtime
            return _runtimes[key]

    def client(self, device: str = "cpu", simulated_deadline: bool = True) -> Any:
        """An in-process inference client on this process's (warmed-up) runtime."""
        from driveloop.edge.fleet import InProcessInference

        return InProcessInference(self.runtime(device), simulated_deadline=simulated_deadline)


# ---------------------------------------------------------------------------------------- units


def _local_placement() -> Placement:
    return Placement(LOCAL_NODE, str(os.getpid()))


def _placement() -> Placement:
    """Inside a Ray worker: its node id and worker id (in-process runs use ``_local_placement``)."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return Placement(ctx.get_node_id(), ctx.get_worker_id())
    except ImportError:  # the local backend never needs Ray
        pass
    return _local_placement()


def _run_unit(fn: Callable[..., Any], *args: Any) -> tuple[Any, Placement]:
    """What a Ray task runs: the unit, and where it ran."""
    return fn(*args), _placement()


@dataclass(frozen=True)
class ShardResult:
    """One fleet shard's drive: per-vehicle metrics (in plan order) and what the shard cost its process."""

    vehicles: list[Any]  # edge.agent.VehicleMetrics
    wall_s: float
    cpu_s: float
    rss_growth_bytes: int  # resident memory added while the shard's vehicles were alive
    placement: Placement


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ShardDriver:
    """A shard of the fleet: its own model session, one batched inference call per tick for its vehicles.

    On Ray it is an actor (replaced, and its shard driven again, if its process dies); in-process, a plain
    object.
    """

    def __init__(self, payload: ModelPayload | None, device: str = "cpu") -> None:
        self.clients = {} if payload is None else {"default": payload.client(device, simulated_deadline=True)}
        self._warm = False

    def drive(self, plans: Sequence[Any], duration_s: float, config: Any = None) -> ShardResult:
        from driveloop.edge.agent import AgentConfig
        from driveloop.edge.fleet import run_fleet

        config = config or AgentConfig(model_enabled=bool(self.clients))
        if not self._warm:  # imports, compiled kernels and allocator pools are the process's, not a vehicle's
            probe = replace(plans[0], vehicle_id=f"{plans[0].vehicle_id}-warmup")
            run_fleet([probe], self.clients, config.sim.dt_s, config)
            self._warm = True
        rss0, peak = _rss_bytes(), [0]
        t0, c0 = time.perf_counter(), time.process_time()

        def on_tick(tick: int, total: int, agents: Sequence[Any]) -> None:
            if tick == total - 1 or tick % 100 == 0:  # every vehicle alive: what the shard holds for them
                peak[0] = max(peak[0], _rss_bytes())

        report = run_fleet(plans, self.clients, duration_s, config, on_tick=on_tick)
        return ShardResult(report.vehicles, time.perf_counter() - t0, time.process_time() - c0,
                           max(0, peak[0] - rss0), _placement())


# ---------------------------------------------------------------------------------------- the executor

_remote_unit: Any = None


def _remote_task() -> Any:
    """The Ray task, created once per process (Ray exports a function once)."""
    global _remote_unit
    import ray

    if _remote_unit is None:
        _remote_unit = ray.remote(_run_unit)
    return _remote_unit


def _unwrap(e: Exception, what: str, retries: int) -> DriveloopError:
    """A Ray failure as one driveloop error: the unit's own DriveloopError, or a PipelineError naming it."""
    import ray.exceptions as rx

    if isinstance(e, rx.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, DriveloopError):
            return cause  # the unit's own error (its message, without Ray's traceback text)
        return PipelineError(f"{what} failed: {type(cause).__name__ if cause else 'error'}: {cause or e}")
    if isinstance(e, (rx.WorkerCrashedError, rx.NodeDiedError, rx.ActorDiedError, rx.ActorUnavailableError,
                      rx.ObjectLostError)):
        return PipelineError(f"{what} lost its worker {retries + 1} times: {type(e).__name__}")
    return PipelineError(f"{what} failed on Ray: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class SimExecutor:
    """Where simulation units run: ``backend`` ``ray`` (tasks and actors on ``ray_address``, or on a local
    runtime of ``num_cpus`` CPUs) or ``local`` (this process). Build it with :meth:`choose`."""

    backend: str = "local"
    ray_address: str | None = None
    num_cpus: int = 2
    cpus_per_unit: float = 1.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "local"):
            raise ConfigError(f"simulation backend must be ray or local, got {self.backend!r}")
        if not self.cpus_per_unit > 0 or self.num_cpus < 1 or self.max_retries < 0:
            raise ConfigError("cpus_per_unit must be > 0, num_cpus >= 1 and max_retries >= 0")

    @classmethod
    def choose(cls, backend: str = "auto", ray_address: str | None = None, num_cpus: int = 2,
               **kwargs: Any) -> SimExecutor:
        """``auto``: Ray when ``ray_address`` names a cluster, else in-process."""
        if backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        resolved = ("ray" if ray_address else "local") if backend == "auto" else backend
        return cls(resolved, ray_address, num_cpus, **kwargs)

    @property
    def use_ray(self) -> bool:
        return self.backend == "ray"

    def _ray(self) -> Any:
        from driveloop.cloud.ray_runtime import ensure_ray

        ensure_ray(self.ray_address, self.num_cpus)
        import ray

        return ray

    def map(self, fn: Callable[..., Any], units: Sequence[tuple[Any, ...]], shared: tuple[Any, ...] = (),
            on_result: Callable[[int], None] | None = None, what: str = "simulation unit") -> Mapped:
        """``fn(*shared, *unit)`` for every unit; results in unit order. ``shared`` arguments (a model's
        bytes) travel once (Ray's object store), not once per unit. ``on_result(i)`` as each unit ends."""
        if not self.use_ray:
            results = []
            for i, unit in enumerate(units):
                results.append(fn(*shared, *unit))
                if on_result is not None:
                    on_result(i)
            return Mapped(results, [_local_placement()] * len(results), "local")
        ray = self._ray()
        task = _remote_task()
        task = task.options(num_cpus=self.cpus_per_unit, max_retries=self.max_retries, retry_exceptions=False,
                            scheduling_strategy="SPREAD")
        refs_shared = [ray.put(s) for s in shared]
        refs = [task.remote(fn, *refs_shared, *unit) for unit in units]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = index[done[0]]
                out[i] = ray.get(done[0])
                if on_result is not None:
                    on_result(i)
        except Exception as e:  # noqa: BLE001 - every Ray failure becomes one driveloop error
            for ref in pending:
                ray.cancel(ref, force=True)
            if isinstance(e, DriveloopError) and not isinstance(e, ray.exceptions.RayError):
                raise  # from on_result, in this process
            raise _unwrap(e, what, self.max_retries) from e
        return Mapped([r for r, _ in out], [p for _, p in out], "ray")

    def drive_shards(self, payload: ModelPayload | None, plans: Sequence[Any], duration_s: float,
                     shards: int, config: Any = None, device: str = "cpu",
                     driver: type[ShardDriver] = ShardDriver) -> Mapped:
        """A fleet cut into ``shards`` contiguous shards, each driven by a Ray actor (its own model session,
        batched inference per shard; at most one live actor per CPU, an actor takes the next shard when
        it is done); in-process the fleet is one shard. :class:`ShardResult` per shard, in plan order.

        A shard whose actor dies (its process or node) is driven again from the start by a new actor, up
        to ``max_retries`` times: shards are seeded, so the repeat is the same drive."""
        if shards < 1:
            raise ConfigError(f"shards must be >= 1, got {shards}")
        if not plans:
            raise ConfigError("a fleet needs at least one vehicle")
        if not self.use_ray:
            result = replace(driver(payload, device).drive(plans, duration_s, config), placement=_local_placement())
            return Mapped([result], [result.placement], "local")
        parts = split_even(list(plans), shards)
        ray = self._ray()
        import ray.exceptions as rx

        # An actor holds its CPU while it lives: more live actors than CPUs would wait for each other
        # forever. So at most one actor per CPU slot, each driving shard after shard as it frees up.
        slots = max(1, int(float(ray.cluster_resources().get("CPU", 1.0)) // self.cpus_per_unit))
        actor_cls = ray.remote(driver).options(num_cpus=self.cpus_per_unit, max_restarts=0,
                                               scheduling_strategy="SPREAD")
        payload_ref = ray.put(payload)
        started: list[Any] = []

        def new_actor() -> Any:
            started.append(actor_cls.remote(payload_ref, device))
            return started[-1]

        free = [new_actor() for _ in range(min(slots, len(parts)))]
        todo, attempts = list(range(len(parts))), [0] * len(parts)
        results: list[Any] = [None] * len(parts)
        running: dict[Any, tuple[int, Any]] = {}
        lost = (rx.ActorDiedError, rx.ActorUnavailableError, rx.WorkerCrashedError, rx.NodeDiedError)
        try:
            while todo or running:
                while todo and free:
                    i, actor = todo.pop(0), free.pop()
                    running[actor.drive.remote(parts[i], duration_s, config)] = (i, actor)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    free.append(actor)
                except lost as e:
                    attempts[i] += 1
                    if attempts[i] > self.max_retries:
                        raise _unwrap(e, f"fleet shard {i}", self.max_retries) from e
                    logger.warning("fleet shard %d lost its actor (%s); driving it again", i, type(e).__name__)
                    todo.insert(0, i)
                    free.append(new_actor())
        except Exception as e:  # noqa: BLE001 - every Ray failure becomes one driveloop error
            if isinstance(e, DriveloopError) and not isinstance(e, rx.RayError):
                raise  # ours, raised here (a shard out of retries)
            raise _unwrap(e, "fleet shard", self.max_retries) from e
        finally:
            for a in started:  # ours alone: started by this call
                ray.kill(a)
        return Mapped(results, [r.placement for r in results], "ray")


def split_even(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into at most ``parts`` contiguous, non-empty pieces whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def executor_from(settings: Any, backend: str = "auto") -> SimExecutor:
    """The executor the settings ask for (``RAY_ADDRESS``; ``DRIVELOOP_SIM_BACKEND``), for the CLI."""
    chosen = getattr(settings, "sim_backend", "auto") if backend == "auto" else backend
    return SimExecutor.choose(chosen, settings.ray_address, settings.num_cpus)
