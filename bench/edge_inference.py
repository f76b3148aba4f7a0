"""Edge inference bench: ONNX Runtime vs torch eager for the same policy, all measured in one run.

    python bench/edge_inference.py [--json] [--iters N] [--batch 1 64] [--device cpu|cuda]
                                   [--no-isolated] [--no-agent] [--agent-seconds S]

Reports, per batch size, p50/p99 latency (µs) of
- ``torch_eager``: ``PolicyNet`` under ``torch.inference_mode`` (1 thread),
- ``ort_session``: a bare ONNX Runtime session (CPU EP, 1 intra-op thread),
- ``ort_runtime``: :class:`driveloop.edge.runtime.ModelRuntime.run` (batch validation + latency log
  included: what the vehicle pays),
and the ratio torch_eager / ort_runtime at p50. Engines are measured in alternating rounds so that
load from other processes on the machine hits them alike. Optional extras:
- ``isolated``: submit + poll round trip through :class:`IsolatedRuntime` (model in a child process);
- ``agent``: the control loop's own cost per tick (sensors + inference + supervisor) next to the bare
  simulator step (``env.step``) for one vehicle, from :func:`driveloop.edge.fleet.run_fleet`, with a floor
  breakdown per fleet (inference call split into the ONNX Runtime call, the same call on warm caches and the
  runtime's wrapper; sensing; safety layer; recorder; bookkeeping): where the overhead that remains goes.

Targets (issue 3, acceptance 4): ORT ≥ 4× faster than torch eager at batch 1, ORT p50 ≤ 50 µs.
Benchmarks print ratios against a baseline measured in the same run; they are not timed tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROUNDS = 5  # alternating measurement rounds per engine


def summarize(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean()),
            "n": int(a.size)}


def _time(fn: Callable[[], object], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_inference(iters: int = 2000, batch_sizes: tuple[int, ...] = (1, 64), device: str = "cpu",
                    seed: int = 0) -> dict[str, Any]:
    """ORT (bare session and ModelRuntime) vs torch eager on the same weights and inputs."""
    import onnxruntime as ort
    import torch

    from driveloop.cloud.export import check_parity, export_onnx
    from driveloop.contracts.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
    from driveloop.contracts import observation as C
    from driveloop.edge.runtime import ModelRuntime

    torch.set_num_threads(1)
    net = PolicyNet(PolicyConfig(seed=seed)).eval()
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(net, Path(d) / "model.onnx")
        parity = check_parity(net, path)
        rt = ModelRuntime(path, build_manifest(path, name="bench", version=1), device=device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        results: dict[str, Any] = {"params": net.count_params(), "parity_max_abs_err": parity,
                                   "provider": rt.provider, "batches": {}}
        for n in batch_sizes:
            tensors = example_inputs(n, seed=n)
            feed = {name: t.numpy() for name, t in zip(C.INPUT_NAMES, tensors)}
            engines: dict[str, Callable[[], object]] = {
                "torch_eager": partial(net, *tensors),
                "ort_session": partial(sess.run, None, feed),
                "ort_runtime": partial(rt.run, feed),
            }
            samples: dict[str, list[float]] = {k: [] for k in engines}
            with torch.inference_mode():
                for fn in engines.values():
                    _time(fn, max(50, iters // 20))  # warm-up: allocations, arena growth, caches
                for _ in range(ROUNDS):
                    for name, fn in engines.items():
                        samples[name] += _time(fn, max(1, iters // ROUNDS))
            row: dict[str, Any] = {name: summarize(s) for name, s in samples.items()}
            row["speedup_p50"] = row["torch_eager"]["p50_us"] / row["ort_runtime"]["p50_us"]
            row["ort_runtime_per_sample_us"] = row["ort_runtime"]["p50_us"] / n
            results["batches"][str(n)] = row
    return results


def bench_isolated(iters: int = 500, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Round trip (submit + poll) through the isolated model process, vs the in-process runtime."""
    from driveloop.cloud.export import export_onnx
    from driveloop.contracts.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet, example_inputs
    from driveloop.contracts import observation as C
    from driveloop.edge.isolated import IsolatedRuntime

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(PolicyNet(PolicyConfig(seed=seed)), Path(d) / "model.onnx")
        feed = {name: t.numpy() for name, t in zip(C.INPUT_NAMES, example_inputs(batch))}
        with IsolatedRuntime(path, build_manifest(path, name="bench", version=1)) as iso:
            t0 = time.perf_counter()
            if not iso.wait_ready():
                raise RuntimeError(f"isolated model process did not start: {iso.error}")
            startup_s = time.perf_counter() - t0

            def round_trip() -> None:
                now = time.monotonic()
                if not iso.submit(feed, now) or iso.poll(now + 1.0) is None:
                    raise RuntimeError("isolated model process missed a 1 s deadline")

            _time(round_trip, 50)
            samples = _time(round_trip, iters)
    return {"batch": batch, "startup_s": startup_s, **summarize(samples)}


class _Stage:
    """Per-tick samples of one loop stage for the whole fleet: CPU time of this thread and wall time."""

    def __init__(self) -> None:
        self.cpu_s: list[float] = []
        self.wall_s: list[float] = []
        self._cpu = self._wall = 0.0

    def add(self, cpu_s: float, wall_s: float) -> None:
        self._cpu += cpu_s
        self._wall += wall_s

    def close_tick(self) -> None:
        self.cpu_s.append(self._cpu)
        self.wall_s.append(self._wall)
        self._cpu = self._wall = 0.0

    def per_vehicle(self, n: int, ticks: np.ndarray) -> dict[str, float]:
        """p50 and mean per vehicle (µs) over the given tick indices."""
        cpu, wall = np.asarray(self.cpu_s)[ticks] / n * 1e6, np.asarray(self.wall_s)[ticks] / n * 1e6
        return {"cpu_us_p50": float(np.median(cpu)), "cpu_us_mean": float(cpu.mean()),
                "wall_us_p50": float(np.median(wall)), "wall_us_mean": float(wall.mean())}


class _Timed:
    """Forwards everything to ``inner``; calls of ``method`` are timed into ``stage``.

    The timed wrapper is built once (an instance attribute, so ``__getattr__`` never sees it): the
    timing itself then costs two clock reads of each kind per call, nothing more.
    """

    def __init__(self, inner: Any, method: str, stage: _Stage) -> None:
        self._inner = inner
        attr = getattr(inner, method)
        thread_time, perf_counter, add = time.thread_time, time.perf_counter, stage.add

        def timed(*args: Any, **kwargs: Any) -> Any:
            c0, w0 = thread_time(), perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                add(thread_time() - c0, perf_counter() - w0)
        setattr(self, method, timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


STAGES = ("sense_reference", "sense", "inference", "track", "supervisor", "bookkeeping", "sim_step", "record",
          "ort_call", "ort_call_warm")
# Parts of other stages, or not part of the loop at all: shown in the floor breakdown, never summed into an overhead.
# ``ort_call`` is the ONNX Runtime kernel call inside ``inference``; ``ort_call_warm`` the same call repeated at
# once, with the caches it just filled (what the model costs when the ~1 ms simulator step has not evicted it).
FLOOR_ONLY = ("ort_call", "ort_call_warm")
OVERHEAD = ("inference", "track", "supervisor")  # + a sensing path; "full" adds the bookkeeping
ORDERS = ("grouped", "interleaved")


def _fleet_overhead(n: int, seconds: float, scenario: str, seed: int, runtime: Any, spool_dir: Path | None,
                    warmup_ticks: int = 10) -> dict[str, Any]:
    """Drive ``n`` vehicles tick by tick, timing every stage of the loop; old and new paths on the same inputs.

    Sensing: the batched sensors and the per-vehicle reference run on the same snapshots and noise
    streams every tick (and must agree exactly). Loop order: even ticks run the fleet's order (every
    vehicle ``decide``s, then every vehicle ``advance``s), odd ticks the old one (``act`` = decide +
    advance, vehicle by vehicle); the drive is the same either way, so one run compares both.
    """
    import copy

    from driveloop.edge import agent as agent_mod
    from driveloop.sim._sensors_ref import observe_reference
    from driveloop.edge.agent import VehicleAgent, sense_fleet
    from driveloop.contracts.observation import INPUT_NAMES, stack
    from driveloop.safety import ModelReply

    st = {name: _Stage() for name in STAGES}
    factory = None
    if spool_dir is not None:
        from driveloop.edge.recorder import Recorder
        from driveloop.edge.spool import Spool

        spool = Spool(spool_dir, 1 << 34)

        def factory(vehicle_id: str, scen: str, s: int) -> Any:
            return _Timed(Recorder(spool, vehicle_id, scen, s, "1"), "record", st["record"])

    agents = [VehicleAgent(f"bench{i:03d}", scenario, seed + i, recorder_factory=factory) for i in range(n)]
    dt = agents[0].config.sim.dt_s
    # The runtime's IO bindings are built on first use, on this (timed) session; a tree from before the
    # bindings (the bench also runs on older trees, alternating before/after runs) gets no ORT split.
    split = hasattr(runtime, "_cpu_bound")
    session = runtime._cpu
    if split:
        runtime._cpu = _Timed(session, "run_with_iobinding", st["ort_call"])
        runtime._cpu_bound.clear()
    clock = time.thread_time, time.perf_counter
    untimed_track = agent_mod.forward_track
    agent_mod.forward_track = _Timed(agent_mod, "forward_track", st["track"]).forward_track  # as the agent calls it
    ticks = round(seconds / dt)
    try:
        for tick in range(ticks):
            for a in agents:  # episodes restart their simulator: (re)wrap it and the supervisor
                if not isinstance(a._sim, _Timed):
                    a._sim = _Timed(a._sim, "step", st["sim_step"])
                if not isinstance(a.supervisor, _Timed):
                    a.supervisor = _Timed(a.supervisor, "step", st["supervisor"])
            # Baseline: the per-vehicle reference sensors + stack, on copies of each vehicle's noise stream.
            rngs = [copy.deepcopy(a.sensors._rng) for a in agents]
            t = [c() for c in clock]
            old = stack([observe_reference(a.snapshot, r, a.sensors.config, a.sensors._last).observation
                         for a, r in zip(agents, rngs)])
            t1 = [c() for c in clock]
            batch = sense_fleet(agents)
            t2 = [c() for c in clock]
            actions, conf = runtime.run(batch)
            t3 = [c() for c in clock]
            w = w1 = [c() for c in clock]
            if split:  # the same call again at once: warm caches, same inputs
                session.run_with_iobinding(runtime._cpu_bound[n].binding)
                w1 = [c() for c in clock]
                st["ort_call_warm"].add(w1[0] - w[0], w1[1] - w[1])
            now = tick * dt
            replies = [ModelReply(actions[i], conf[i], now + (t3[1] - t2[1]), alive=True) for i in range(n)]
            if tick % 2 == 0:
                for a, reply in zip(agents, replies):
                    a.decide(reply)
                for a in agents:
                    a.advance()
            else:
                for a, reply in zip(agents, replies):
                    a.act(reply)
            t4 = [c() for c in clock]
            for name, (u, v) in zip(("sense_reference", "sense", "inference", "bookkeeping"),
                                    ((t, t1), (t1, t2), (t2, t3), (w1, t4))):
                st[name].add(v[0] - u[0], v[1] - u[1])
            book = st["bookkeeping"]  # what decide + advance cost beyond their timed parts
            for part in ("track", "supervisor", "sim_step", "record"):
                book.add(-st[part]._cpu, -st[part]._wall)
            for stage in st.values():
                stage.close_tick()
            for name in INPUT_NAMES:  # the two paths did the same work
                if not np.array_equal(old[name], batch[name]):
                    raise RuntimeError(f"batched sensors differ from the reference on {name} at tick {tick}")
    finally:
        agent_mod.forward_track = untimed_track
        if split:
            runtime._cpu = session
            runtime._cpu_bound.clear()
        for a in agents:
            a.close()
    out: dict[str, Any] = {"vehicles": n, "ticks": ticks}
    for order, parity in zip(ORDERS, (0, 1)):
        idx = np.arange(warmup_ticks + parity, ticks, 2)
        per = {name: st[name].per_vehicle(n, idx) for name in STAGES}
        res: dict[str, Any] = {"stages_per_vehicle_us": per}
        for path, sensing in (("new", "sense"), ("old", "sense_reference")):
            for metric in ("cpu_us_p50", "cpu_us_mean", "wall_us_p50"):
                overhead = sum(per[k][metric] for k in (sensing, *OVERHEAD))
                res[f"overhead_{path}_{metric}"] = overhead
                res[f"ratio_{path}_{metric}"] = overhead / per["sim_step"][metric]
                full = overhead + per["bookkeeping"][metric]
                res[f"overhead_full_{path}_{metric}"] = full
                res[f"ratio_full_{path}_{metric}"] = full / per["sim_step"][metric]
        if split:
            res["floor_cpu_us_p50"] = _floor(per)
        res["sensing_speedup_cpu_p50"] = per["sense_reference"]["cpu_us_p50"] / per["sense"]["cpu_us_p50"]
        res["overhead_speedup_cpu_p50"] = res["overhead_old_cpu_us_p50"] / res["overhead_new_cpu_us_p50"]
        out[order] = res
    return out


def _floor(per: dict[str, dict[str, float]]) -> dict[str, float]:
    """Where the agent's overhead goes, per vehicle per tick (CPU p50, µs), and what the step leaves as its floor.

    ``inference`` splits into the ONNX Runtime call (``ort_call``) and the runtime's own wrapper (batch
    contract check, copies in and out, latency log); ``ort_call_warm`` is the same call on warm caches, so
    ``cache_penalty`` is what the simulator step's eviction of the model's weights and arena costs the call.
    """
    cpu = {name: row["cpu_us_p50"] for name, row in per.items()}
    step = cpu["sim_step"]
    parts = {"inference_call": cpu["inference"], "ort_call": cpu["ort_call"],
             "runtime_wrapper": max(0.0, cpu["inference"] - cpu["ort_call"]), "ort_call_warm": cpu["ort_call_warm"],
             "cache_penalty": max(0.0, cpu["ort_call"] - cpu["ort_call_warm"]), "sensing": cpu["sense"],
             "safety_layer": cpu["track"] + cpu["supervisor"], "recorder": cpu["record"],
             "bookkeeping": cpu["bookkeeping"], "sim_step": step}
    overhead = parts["inference_call"] + parts["sensing"] + parts["safety_layer"]
    parts["overhead"] = overhead
    parts["overhead_pct"] = 100 * overhead / step
    parts["ort_call_pct"] = 100 * parts["ort_call"] / step  # the model alone, cold, as the loop calls it
    parts["overhead_if_warm_pct"] = 100 * (overhead - parts["cache_penalty"]) / step
    return parts


def bench_agent_overhead(seconds: float = 30.0, scenario: str = "highway", seed: int = 0,
                         fleet_sizes: tuple[int, ...] = (1, 8), record: bool = False,
                         sensor_backend: str | None = None) -> dict[str, Any]:
    """The loop's own cost per vehicle per tick (sensors + inference + supervisor) beside the bare env step.

    Per fleet size: every stage in this thread's CPU time (``time.thread_time``: other processes on a
    shared machine do not count) and in wall time, p50 and mean per vehicle per tick; the batched
    sensors (``sense_fleet``) and the per-vehicle reference (``observe_reference`` + ``stack``, the
    path before batching) run on the same snapshots and noise streams every tick, so the old/new
    ratio comes from one run. ``record`` adds a real MCAP recorder (the ``record`` stage);
    ``sensor_backend`` picks the sensor geometry backend (default: the tree's default, reported).
    """
    import torch
    from driveloop.cloud.export import export_onnx
    from driveloop.contracts.manifest import build_manifest
    from driveloop.cloud.model import PolicyConfig, PolicyNet
    from driveloop.edge.runtime import ModelRuntime

    torch.set_num_threads(1)
    backend = _sensor_backend(sensor_backend)
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(PolicyNet(PolicyConfig(seed=seed)), Path(d) / "model.onnx")
        rt = ModelRuntime(path, build_manifest(path, name="bench", version=1), device="cpu")
        fleets = [_fleet_overhead(n, seconds, scenario, seed, rt, Path(d) / f"spool{n}" if record else None)
                  for n in fleet_sizes]
    return {"scenario": scenario, "seconds": seconds, "record": record, "sensor_backend": backend, "fleets": fleets}


def _sensor_backend(requested: str | None) -> str:
    """Select (if asked) and report the sensor geometry backend; trees from before the backends had numpy only."""
    from driveloop.sim import sensors

    if not hasattr(sensors, "geometry"):  # the bench also runs on older trees (alternating before/after runs)
        if requested not in (None, "numpy"):
            raise SystemExit(f"this tree has no sensor backend {requested!r}")
        return "numpy (single path)"
    from driveloop.sim import _sensor_geometry

    if requested is not None:
        _sensor_geometry.set_backend(requested)
    return _sensor_geometry.backend()


def _print_agent(ag: dict[str, Any]) -> None:
    print(f"agent loop, scenario {ag['scenario']}, {ag['seconds']:.0f} s simulated, sensor geometry "
          f"{ag.get('sensor_backend', '?')}; per vehicle per tick, µs "
          "(CPU = this thread's time; wall includes preemption by other processes)")
    for f in ag["fleets"]:
        for order in ORDERS:
            r = f[order]
            print(f"  {f['vehicles']} vehicle(s), {f['ticks']} ticks, {order} order (half the ticks)")
            print(f"    {'stage':<16} {'cpu p50':>9} {'cpu mean':>9} {'wall p50':>9}")
            for name, row in r["stages_per_vehicle_us"].items():
                if name in FLOOR_ONLY or (name == "record" and not ag["record"]):
                    continue
                print(f"    {name:<16} {row['cpu_us_p50']:9.1f} {row['cpu_us_mean']:9.1f} {row['wall_us_p50']:9.1f}")
            for path in ("old", "new"):
                print(f"    overhead {path} sensors (sensors+inference+track+supervisor): cpu p50 "
                      f"{r[f'overhead_{path}_cpu_us_p50']:.1f} µs = {100 * r[f'ratio_{path}_cpu_us_p50']:.1f}% of "
                      f"the env step (wall p50 {100 * r[f'ratio_{path}_wall_us_p50']:.1f}%); with bookkeeping "
                      f"{r[f'overhead_full_{path}_cpu_us_p50']:.1f} µs = {100 * r[f'ratio_full_{path}_cpu_us_p50']:.1f}%")
            fl = r.get("floor_cpu_us_p50")  # absent on a tree without the runtime's IO bindings
            if fl is not None:
                print(f"    floor (cpu p50 µs): inference call {fl['inference_call']:.1f} (ORT kernel call "
                      f"{fl['ort_call']:.1f}, same call on warm caches {fl['ort_call_warm']:.1f}, runtime wrapper "
                      f"{fl['runtime_wrapper']:.1f}), sensing {fl['sensing']:.1f}, safety layer "
                      f"{fl['safety_layer']:.1f}, recorder {fl['recorder']:.1f}, bookkeeping {fl['bookkeeping']:.1f}; "
                      f"env step {fl['sim_step']:.1f}")
                print(f"    floor: the ORT call alone is {fl['ort_call_pct']:.1f}% of the env step; overhead "
                      f"{fl['overhead_pct']:.1f}%, {fl['overhead_if_warm_pct']:.1f}% if the model call found warm caches")
            print(f"    old/new: sensing {r['sensing_speedup_cpu_p50']:.2f}x, overhead "
                  f"{r['overhead_speedup_cpu_p50']:.2f}x (cpu p50)")


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__}


def _print(result: dict[str, Any]) -> None:
    if "inference" not in result:
        if "agent" in result:
            _print_agent(result["agent"])
        return
    inf = result["inference"]
    print(f"policy: {inf['params']} params, parity max |ORT-torch| = {inf['parity_max_abs_err']:.2e}, "
          f"provider {inf['provider']}")
    print(f"{'batch':>5} {'engine':<12} {'p50 µs':>9} {'p99 µs':>9}")
    for n, row in inf["batches"].items():
        for engine in ("torch_eager", "ort_session", "ort_runtime"):
            print(f"{n:>5} {engine:<12} {row[engine]['p50_us']:9.1f} {row[engine]['p99_us']:9.1f}")
        print(f"{n:>5} {'speedup':<12} {row['speedup_p50']:8.2f}x  (torch eager / ORT runtime, p50)")
    if "isolated" in result:
        iso = result["isolated"]
        print(f"isolated round trip (batch {iso['batch']}): p50 {iso['p50_us']:.1f} µs, p99 {iso['p99_us']:.1f} µs, "
              f"child startup {iso['startup_s']:.2f} s")
    if "agent" in result:
        _print_agent(result["agent"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--no-isolated", action="store_true")
    p.add_argument("--no-agent", action="store_true")
    p.add_argument("--agent-seconds", type=float, default=30.0)
    p.add_argument("--agent-vehicles", type=int, nargs="+", default=[1, 8], help="fleet sizes for the agent bench")
    p.add_argument("--agent-record", action="store_true", help="agent bench with a real MCAP recorder")
    p.add_argument("--agent-only", action="store_true", help="only the agent bench (no inference engines)")
    p.add_argument("--sensor-backend", choices=("compiled", "numpy"), default=None,
                   help="sensor geometry backend for the agent bench (default: compiled where numba is installed)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"machine": machine()}
    if not args.agent_only:
        result["inference"] = bench_inference(args.iters, tuple(args.batch), args.device)
        if not args.no_isolated:
            result["isolated"] = bench_isolated(max(100, args.iters // 5))
    if not args.no_agent:
        result["agent"] = bench_agent_overhead(args.agent_seconds, fleet_sizes=tuple(args.agent_vehicles),
                                               record=args.agent_record, sensor_backend=args.sensor_backend)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return result


if __name__ == "__main__":
    main()
