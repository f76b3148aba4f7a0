"""Ray runtime helpers shared by the cloud pipeline and its fine-tune step. (A federated run's simulation
has a Ray runtime of its own, in Flower's ``flwr-simulation`` process: ``federated/deploy.py``.)

Rules kept here (so no caller has to remember them):

- **One runtime per process, started on demand.** ``ensure_ray`` connects to ``RAY_ADDRESS`` when one is
  given (a Ray cluster), else starts a local runtime held to this machine's CPUs (2 here), without the
  dashboard and with quiet logs. It is idempotent: every Ray stage calls it, so a runtime that someone
  else shut down in between is simply started again ("re-init on demand"). ``local_mode`` is never used.
- **Data and Train never starve each other.** ``cpu_split`` reserves CPUs for the trainer workers and
  gives Ray Data what is left (at least one), and the pipeline materializes its dataset before training.
  No fractional reservation strands a node's last CPU (``_whole_cpus_for_data``: nodes of 1 CPU each).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from driveloop.core.exceptions import ConfigError, PipelineError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_started_here = False  # True when ensure_ray started (and therefore owns) the current runtime


@dataclass(frozen=True)
class RayRuntime:
    """What ensure_ray connected to."""

    address: str | None  # None: a local runtime started by this process
    num_cpus: float  # CPUs the cluster offers
    started_here: bool


@dataclass(frozen=True)
class CpuSplit:
    """CPUs for the trainer workers and for Ray Data, so neither can take them all."""

    train_workers: int
    cpus_per_train_worker: float
    data_cpus: float


def cpu_split(total_cpus: float, train_workers: int = 1) -> CpuSplit:
    """Reserve one CPU per trainer worker and leave the rest (at least one) to Ray Data.

    On 2 CPUs: one trainer worker with 1 CPU and 1 CPU for Data. A trainer that asked for every CPU
    would leave Ray Data backpressured forever (the known hang), so this refuses such a split.
    """
    if train_workers < 1:
        raise ConfigError(f"train_workers must be >= 1, got {train_workers}")
    if total_cpus < train_workers + 1:
        raise ConfigError(
            f"{total_cpus:g} CPUs cannot hold {train_workers} trainer worker(s) plus one CPU for Ray Data"
        )
    return CpuSplit(train_workers=train_workers, cpus_per_train_worker=1.0, data_cpus=float(total_cpus - train_workers))


def ensure_ray(address: str | None = None, num_cpus: int = 2) -> RayRuntime:
    """Start or join the Ray runtime once; later calls return the running one.

    ``address`` (e.g. from ``RAY_ADDRESS``) joins an existing cluster; without it a local runtime is
    limited to ``num_cpus`` CPUs. Never uses ``local_mode``.
    """
    global _started_here
    if num_cpus < 1:
        raise ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with _lock:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "log_to_driver": False,
                "configure_logging": True,
            }
            try:
                if address:
                    ray.init(address=address, **kwargs)
                    _started_here = False
                else:
                    # The runtime's workers import our code from this interpreter's environment. "local"
                    # starts a runtime of our own: without it Ray joins any cluster already running on
                    # the machine (another user's, a test's) and refuses our CPU limit.
                    ray.init(address="local", num_cpus=num_cpus, **kwargs)
                    _started_here = True
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise PipelineError(f"cannot start Ray ({address or 'local'}): {e}") from e
            logger.info("Ray runtime %s (%s CPUs)", address or "local", ray.cluster_resources().get("CPU"))
        _quiet_ray()
        _whole_cpus_for_data()
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
    return RayRuntime(address=address, num_cpus=cpus, started_here=_started_here)


def _quiet_ray() -> None:
    """Ray's own lines go to our log file, not the user's terminal: Ray Data's progress bars off, and the
    handlers Ray and Ray Data put on their loggers at import replaced by ours (``core.logsetup``). Runs on
    every ``ensure_ray``, so a Ray module imported since is taken over too."""
    import ray.data

    from driveloop.core.logsetup import adopt_library_logs

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    adopt_library_logs("ray", "ray.data", "ray.train", "ray.tune")


def _whole_cpus_for_data() -> None:
    """Ray Data's hash-shuffle aggregators (``groupby``) reserve 0.01 CPU each, spread over the nodes; on
    nodes of one CPU each (the 2 × 1-CPU cluster) no node then has the whole CPU a shuffle task asks for,
    and the dataset waits forever. The aggregators are light until their final step (which runs alone),
    so they reserve none."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.hash_shuffle_operator_actor_num_cpus_override = 0.0
    ctx.hash_aggregate_operator_actor_num_cpus_override = 0.0


def shutdown_ray() -> None:
    """Shut down the runtime only if this process started it (never a cluster we merely joined)."""
    global _started_here
    import ray

    with _lock:
        if ray.is_initialized() and _started_here:
            ray.shutdown()
        _started_here = False
