"""A fleet's vehicles over this host's cores: one shard in the calling thread, the others in worker processes.

The fleet runner (``edge.fleet.run_fleet``) steps every vehicle in one Python thread, so a fleet uses one
core however many the host has. :class:`FleetShardPool` cuts the plans into contiguous shards
(``sim_exec.split_even``) and drives them at the same time: the first in the calling thread, each other in a
``spawn`` worker process kept for the pool's life (its imports, compiled sensor kernels and model sessions are
paid once, not per window). Rules kept here:

- **Same results as one thread.** A vehicle's simulator, sensors and supervisor are its own, and ONNX Runtime's
  CPU rows do not depend on the batch they share (``sim_exec``), so each vehicle drives exactly as it would in
  one fleet; the shards' reports are merged back in plan order (:func:`merge_reports`).
- **The same files.** A recording shard builds the same recorders (``edge.drive.recorder_factory``: one spool,
  each segment naming the model that drove it) in whichever process it runs; the spool is safe for several
  writers (one vehicle's files are one writer's). Worker log lines come back to this process's handlers (its
  log file), so a worker writes no log of its own.
- **The model crosses as bytes** (``sim_exec.ModelPayload``): verified against its manifest on load, cached per
  process by sha256.
- **Nothing left behind.** A worker exits when this process closes the pool or dies (it watches a pipe whose
  only writer is this process). A worker that dies mid-drive fails the drive with a ``PipelineError`` (its
  vehicles' open segments are quarantined by their next recorder, as after a power cut); the next drive
  starts a new worker.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from driveloop.cloud.sim_exec import ModelPayload, split_even
from driveloop.core.exceptions import ConfigError, PipelineError

logger = logging.getLogger(__name__)

__all__ = ["FleetShardPool", "Recording", "drive_shard", "merge_reports"]


@dataclass(frozen=True)
class Recording:
    """What a shard's vehicles record into (``edge.drive.recorder_factory``), as data that crosses processes:
    the spool, its quota, the model version each vehicle's segments name, and the campaigns' triggers (as
    their fields: a compiled condition is no data, so each process compiles, and so re-validates, its own)."""

    spool_dir: Path
    quota_bytes: int
    versions: Mapping[str, str]  # vehicle id -> the model that actuates it in this drive
    campaigns: tuple[dict[str, Any], ...] = field(default=())  # edge.triggers.TriggerSpec fields

    @staticmethod
    def trigger_fields(triggers: Sequence[Any]) -> tuple[dict[str, Any], ...]:
        """``TriggerSpec``s as the fields they are built from (what ``campaigns`` holds)."""
        return tuple({f.name: getattr(t, f.name) for f in fields(t) if f.init} for t in triggers)

    def factory(self) -> Any:
        from driveloop.edge.drive import recorder_factory
        from driveloop.edge.triggers import TriggerSpec

        return recorder_factory(self.spool_dir, self.quota_bytes, dict(self.versions).__getitem__,
                                [TriggerSpec(**c) for c in self.campaigns])


def drive_shard(plans: Sequence[Any], models: Mapping[str, ModelPayload], shadows: Mapping[str, ModelPayload],
                duration_s: float, config: Any = None, recording: Recording | None = None,
                device: str = "cpu") -> Any:
    """One shard's drive on this process's (cached, warmed-up) model sessions: an ``edge.fleet.FleetReport``.
    ``models``/``shadows`` map a plan's model key to the model it runs (and the one run beside it)."""
    from driveloop.edge.fleet import run_fleet

    keys = {p.model for p in plans}
    clients = {k: models[k].client(device, simulated_deadline=True) for k in keys if k in models}
    beside = {k: shadows[k].client(device, simulated_deadline=True) for k in keys if k in shadows}
    return run_fleet(plans, clients, duration_s, config, recording.factory() if recording else None, shadows=beside)


def merge_reports(parts: Sequence[Any]) -> Any:
    """Shards' fleet reports as the one report a single fleet would give: vehicles and segments in plan order,
    per-tick costs summed over the shards (each shard ran its part of every tick), shadow comparisons summed."""
    from driveloop.edge.agent import ShadowStats
    from driveloop.edge.fleet import FleetReport

    if len(parts) == 1:
        return parts[0]
    shadow: dict[str, ShadowStats] = {}
    for p in parts:
        for key, s in p.shadow.items():
            total = shadow.setdefault(key, ShadowStats())
            total.compared_ticks += s.compared_ticks
            total.disagreements += s.disagreements
            total.abs_diff_sum += s.abs_diff_sum
    return FleetReport(
        vehicles=[v for p in parts for v in p.vehicles],
        tick_ms=[sum(t) for t in zip(*(p.tick_ms for p in parts))],
        sim_ms=[sum(t) for t in zip(*(p.sim_ms for p in parts))],
        segments=[s for p in parts for s in p.segments],
        faults={k: v for p in parts for k, v in p.faults.items()},
        shadow=shadow,
        deadline_misses=sum(p.deadline_misses for p in parts),
        inference_ms=[ms for p in parts for ms in p.inference_ms],
    )


# ---------------------------------------------------------------------------------------- worker side


def _watch_parent(conn: Any) -> None:
    """Exit when the pool's process is gone: the pipe's only writer closes, ``recv`` ends (no polling)."""
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _worker_init(parent: Any, log_queue: Any, log_level: int) -> None:
    """A worker's start: its log lines go to the pool's process; it exits with it; its imports and the
    sensors' compiled kernels are warmed up before the first shard arrives."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(log_level)
    logging.captureWarnings(True)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _warmup() -> int:
    """One tick of one fallback-only vehicle: imports and compiled kernels are the worker's, not a drive's."""
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.fleet import VehiclePlan, run_fleet

    config = AgentConfig(model_enabled=False)
    logging.disable(logging.INFO)  # its "fallback activation: model disabled" is no vehicle's
    try:
        run_fleet([VehiclePlan("warmup", "highway", 0)], {}, config.sim.dt_s, config)
    finally:
        logging.disable(logging.NOTSET)
    return os.getpid()


class _Reemit(logging.Handler):
    """A worker's log record handed to this process's logger of the same name (its handlers, its levels)."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


# ---------------------------------------------------------------------------------------- the pool


class FleetShardPool:
    """``shards`` shards per drive: the first in the calling thread, ``shards - 1`` worker processes for the
    rest (see the module docstring). ``shards=1`` drives in the calling thread alone, with no process."""

    def __init__(self, shards: int, device: str = "cpu") -> None:
        if shards < 1:
            raise ConfigError(f"fleet shards must be >= 1, got {shards}")
        self.shards, self.device = shards, device
        self._executor: ProcessPoolExecutor | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._parent_end: Any = None
        if shards > 1:
            self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds a server's threads
        child_end, self._parent_end = ctx.Pipe(duplex=False)
        log_queue = ctx.Queue()
        self._listener = logging.handlers.QueueListener(log_queue, _Reemit())
        self._listener.start()
        self._executor = ProcessPoolExecutor(self.shards - 1, mp_context=ctx, initializer=_worker_init,
                                             initargs=(child_end, log_queue, logging.getLogger().getEffectiveLevel()))
        for _ in range(self.shards - 1):  # every worker warms up now, while this process does other work
            self._executor.submit(_warmup)
        child_end.close()  # the workers hold their copies; ours must not keep the pipe's read side open

    def drive(self, plans: Sequence[Any], models: Mapping[str, ModelPayload], duration_s: float,
              shadows: Mapping[str, ModelPayload] | None = None, config: Any = None,
              recording: Recording | None = None) -> Any:
        """Drive ``plans`` over the shards; the merged ``edge.fleet.FleetReport``, vehicles in plan order."""
        if not plans:
            raise ConfigError("a fleet needs at least one vehicle")
        shadows = shadows or {}
        parts = split_even(list(plans), self.shards)
        if len(parts) > 1 and self._executor is None:
            self._start()
        futures: list[Future[Any]] = []
        try:
            for part in parts[1:]:
                futures.append(self._executor.submit(  # type: ignore[union-attr]
                    drive_shard, part, _only(models, part), _only(shadows, part), duration_s, config, recording,
                    self.device))
            first = drive_shard(parts[0], models, shadows, duration_s, config, recording, self.device)
            reports = [first, *(f.result() for f in futures)]
        except BrokenProcessPool as e:
            self._stop()  # the next drive starts a new worker
            raise PipelineError(f"a fleet shard's worker process died: {e}") from e
        finally:
            for f in futures:
                f.cancel()
        return merge_reports(reports)

    def _stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._parent_end is not None:
            self._parent_end.close()
            self._parent_end = None
        if self._listener is not None:
            self._listener.stop()  # after the workers are gone: every line they sent is handled
            self._listener = None

    def close(self) -> None:
        """Stop the workers (they finish nothing new) and hand back their last log lines."""
        self._stop()

    def __enter__(self) -> FleetShardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _only(models: Mapping[str, ModelPayload], plans: Sequence[Any]) -> dict[str, ModelPayload]:
    """The models a shard's plans name: a worker is sent no bytes it will not run."""
    keys = {p.model for p in plans}
    return {k: m for k, m in models.items() if k in keys}
