"""Run a benchmark's simulated fleet as shards in processes of their own, meeting at named points.

One Python process cannot play a whole fleet (the stream bench's thousand vehicles, the log bench's 64
generators): the GIL holds them to one core. :func:`run_shards` starts one ``spawn`` process per shard (no
fork of a process that holds client threads), each running ``target(*args, sync=sync)``. A shard calls
``sync(point)`` at each of the named points; the coordinator meets every shard there (a barrier), so phases
start together, and may act before it joins a point (``before``: e.g. publish what the shards then wait for).
A shard that fails breaks the barrier, so the others stop waiting, and its error comes back as one
:class:`~driveloop.core.exceptions.ConfigError` naming it. Every process started here is joined here.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from typing import Any

from driveloop.core.exceptions import ConfigError

__all__ = ["run_shards", "shard_main", "split"]

Point = tuple[str, float]  # (name, seconds the coordinator waits for every shard to reach it)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` items as ``parts`` contiguous (first, size) shards whose sizes differ by at most one."""
    if not 1 <= parts <= max(1, n):
        raise ConfigError(f"cannot split {n} items into {parts} shards")
    return [(k * n // parts, (k + 1) * n // parts - k * n // parts) for k in range(parts)]


def shard_main(target: Callable[..., dict[str, Any]], args: tuple[Any, ...], points: tuple[str, ...], timeout_s: float,
           barrier: Any, results: Any) -> None:
    """A shard's process (picklable entry point): meets the coordinator at ``points``; its result (or its
    error) goes back through ``results``."""
    def sync(point: str) -> None:
        if point in points:
            barrier.wait(timeout=timeout_s)

    try:
        results.put(target(*args, sync=sync))
    except BaseException as e:  # noqa: BLE001 - the coordinator reports it; a shard must not hang the others
        barrier.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})


def run_shards(target: Callable[..., dict[str, Any]], shard_args: Sequence[tuple[Any, ...]], points: Sequence[Point],
               before: Callable[[str], None] | None = None, what: str = "shard",
               result_timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Each ``shard_args`` entry as ``target(*args, sync=...)`` in its own process; the shards' results in
    order of completion. ``target`` must be a module-level function (it is pickled); each shard calls
    ``sync(name)`` for every point of ``points`` in order (other names pass through)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(shard_args) + 1), ctx.Queue()
    names = tuple(name for name, _ in points)
    shard_timeout_s = max([result_timeout_s, *(t for _, t in points)])
    procs = [ctx.Process(target=shard_main, args=(target, args, names, shard_timeout_s, barrier, results), daemon=True)
             for args in shard_args]
    for proc in procs:
        proc.start()
    try:
        try:
            for name, timeout_s in points:
                if before is not None:
                    before(name)
                barrier.wait(timeout=timeout_s)
            out = [results.get(timeout=result_timeout_s) for _ in procs]
        except Exception as e:  # a broken barrier: a shard failed, its error is in the queue
            barrier.abort()
            errors = []
            for _ in procs:
                try:
                    r = results.get(timeout=5)
                except Exception:  # noqa: BLE001 - that shard is still running or died without a word
                    break
                if "error" in r and not r["error"].startswith("BrokenBarrierError"):  # a consequence, not a cause
                    errors.append(r["error"])
            raise ConfigError(f"{what} failed: {errors or f'{type(e).__name__}: {e}'}") from e
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():  # stuck past its deadline: this code started it, this code ends it
                proc.terminate()
                proc.join(timeout=10)
    failed = [r["error"] for r in out if "error" in r]
    if failed:
        raise ConfigError(f"{what} failed: {failed}")
    return out
