"""The stream benchmark (``driveloop stream bench``, bench/stream.py): a simulated fleet on one StreamLoop.

Phase 1, telemetry: ``vehicles`` connections each publish 10 Hz telemetry for ``seconds`` through
:class:`edge.stream_client.VehicleStream` (async publish, bounded pending acks, msg ids); it reports the acked
rate, publish-to-ack latency, and ``lost``/``duplicates`` from the broker's per-subject counts against what
each vehicle published. Phase 2, hazards: every vehicle watches the cells 1 km ahead of it; signed hazards
(``contracts.hazard``) are published on their relevance cells and timed publish → receive at each vehicle;
``hazard_outside`` counts receipts by vehicles that watch none of the hazard's cells (must be 0).
The baseline, measured in the same run: one connection publishing with ``js.publish``, awaiting each ack.
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.broker import EmbeddedBroker, ServerSpec, ensure_streams, free_port
from driveloop.contracts.stream import Telemetry, cells_ahead, telemetry_subject
from driveloop.core.exceptions import ConfigError
from driveloop.edge.stream_client import StreamLoop, VehicleStream, nats_servers

logger = logging.getLogger(__name__)

SPACING_M = 40.0  # vehicles spread along the road
HORIZON_M = 1000.0  # cells each vehicle watches ahead


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _baseline(url: str, seconds: float) -> float:
    """``js.publish`` awaiting each ack: acked messages per second on one connection."""
    import nats

    nc = await nats.connect(nats_servers(url))
    js = nc.jetstream()
    payload = Telemetry(vehicle_id="baseline", seq=0, t_s=0, wall_ts=time.time(), x_m=0, y_m=0, lane=0, speed_mps=0,
                        accel_mps2=0, mode="model").model_dump_json().encode()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await js.publish(telemetry_subject("baseline"), payload, headers={"Nats-Msg-Id": f"baseline:{n}"})
        n += 1
    elapsed = time.perf_counter() - t0
    await nc.close()
    return n / elapsed


async def _stored_per_subject(url: str) -> dict[str, int]:
    import nats

    nc = await nats.connect(nats_servers(url))
    try:
        info = await nc.jetstream().stream_info("TELEMETRY", subjects_filter="tel.>")
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


async def _publish_hazards(url: str, count: int, road: str, max_x: float, seed: int) -> list[tuple[int, float, tuple[int, ...]]]:
    """Publish ``count`` signed hazards on their relevance cells; (sequence, publish wall time, cells) each."""
    import nats
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from driveloop.contracts.hazard import (
        ActionId,
        Hazard,
        HazardAdvisory,
        HazardSigner,
        encode_hazard,
        relevance_area,
    )
    from driveloop.contracts.stream import hazard_subject

    signer = HazardSigner(Ed25519PrivateKey.generate())
    rng = random.Random(seed)
    nc = await nats.connect(nats_servers(url))
    out = []
    try:
        for k in range(count):
            x = rng.uniform(HORIZON_M, max(HORIZON_M + 1.0, max_x))
            now = time.time()
            area = relevance_area(road, x, "increasing", 1500.0, 50.0)
            hazard = signer.sign(Hazard(
                action_id=ActionId(station_id="bench-cloud", sequence_number=k), detection_time=now,
                reference_time=now, validity_s=600.0, cause=27, road=road, x_m=x, relevance=area,
                advisory=HazardAdvisory(speed_mps=20.0),
            ))  # fmt: skip
            data = encode_hazard(hazard)
            sent = time.time()
            for cell in area.cells:
                await nc.publish(hazard_subject(road, cell), data)
            await nc.flush()
            out.append((k, sent, area.cells))
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return out


def run_bench(vehicles: int, seconds: float, *, url: str | None = None, rate_hz: float = 10.0,
              sync_interval: str = "always", hazards: int = 20, baseline_s: float = 3.0,
              workdir: Path | None = None, seed: int = 0, processes: int = 1) -> dict[str, Any]:
    """Run both phases (see the module docstring); an embedded broker unless ``url`` is given. ``processes``
    shards the simulated fleet over that many client processes (one Python thread cannot publish for a
    thousand vehicles at 10 Hz; a real fleet has one client per vehicle)."""
    if vehicles < 1 or seconds <= 0 or rate_hz <= 0:
        raise ConfigError("vehicles, seconds and rate must be positive")
    if not 1 <= processes <= vehicles:
        raise ConfigError(f"processes must be between 1 and the number of vehicles, got {processes}")
    tmp = tempfile.TemporaryDirectory(prefix="stream-bench-", dir=workdir)
    root = Path(tmp.name)
    broker = None
    try:
        if url is None:
            spec = ServerSpec(name="bench", port=free_port(), http_port=free_port(), store_dir=root / "js",
                              sync_interval=sync_interval)
            broker = EmbeddedBroker(spec).start()
            url = broker.url

        async def setup() -> None:
            import nats

            nc = await nats.connect(nats_servers(url))
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(setup())
        baseline = asyncio.run(_baseline(url, baseline_s)) if baseline_s > 0 else None
        result = _run_fleet(url, vehicles, seconds, rate_hz, hazards, root / "spool", seed, processes)
        result.update({"vehicles": vehicles, "seconds": seconds, "rate_hz": rate_hz, "sync_interval": sync_interval,
                       "baseline_js_publish_per_s": baseline,
                       "ratio_vs_baseline": (result["acked_per_s"] / baseline) if baseline else None})
        return result
    finally:
        if broker is not None:
            broker.stop()
        tmp.cleanup()


def _shard(url: str, first: int, n: int, seconds: float, rate_hz: float, spool: Path, hazards: bool,
           sync: Callable[[str], None]) -> dict[str, Any]:
    """Vehicles ``first … first+n-1`` on one StreamLoop: the telemetry phase, then (``hazards``) watch the cells
    ahead and collect what arrives. ``sync(point)`` is where shards meet the coordinator ("start", "watching",
    "published"); in one process it only publishes the hazards at "watching"."""
    loop = StreamLoop(f"stream-bench-{first}")
    ids = [f"bench-{i:05d}" for i in range(first, first + n)]
    streams: list[VehicleStream] = []
    try:
        streams = [VehicleStream(v, url, spool, loop=loop) for v in ids]
        deadline = time.monotonic() + 60
        while not all(s.connected() for s in streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        base = [Telemetry(vehicle_id=v, seq=0, t_s=0.0, wall_ts=time.time(), x_m=(first + i) * SPACING_M, y_m=0.0,
                          lane=(first + i) % 3, speed_mps=30.0, accel_mps2=0.0, mode="model")
                for i, v in enumerate(ids)]
        period = 1.0 / rate_hz
        published = [0] * n
        behind_s = 0.0
        sync("start")
        t0 = time.monotonic()
        tick = 0
        while time.monotonic() - t0 < seconds:
            wall = time.time()
            for i, s in enumerate(streams):
                s.publish(base[i].model_copy(update={"seq": tick, "t_s": tick * period, "wall_ts": wall}))
                published[i] += 1
            tick += 1
            spare = t0 + tick * period - time.monotonic()
            if spare > 0:
                time.sleep(spare)
            else:
                behind_s = max(behind_s, -spare)
        elapsed = time.monotonic() - t0
        # every message acked (or the deadline) before the broker's counts are read
        flush_deadline = time.monotonic() + max(120.0, 10 * seconds)
        flushed = all(s.flush(max(0.0, flush_deadline - time.monotonic())) for s in streams)
        out: dict[str, Any] = {
            "ids": ids, "published": published, "elapsed": elapsed, "drain_s": time.monotonic() - t0 - elapsed,
            "behind_s": behind_s, "flushed": flushed, "latencies": [x for s in streams for x in s.ack_latencies_ms()],
            "acked": sum(s.stats()["acked"] for s in streams),
            "reconnects": sum(s.stats()["reconnects"] for s in streams), "watched": {}, "firsts": {},
        }  # fmt: skip
        if hazards:
            for i, s in enumerate(streams):
                cells = cells_ahead((first + i) * SPACING_M, HORIZON_M)
                s.watch_cells("hw1", cells)
                out["watched"][first + i] = set(cells)
            time.sleep(1.0 + n / 500)  # subscriptions in place
            for s in streams:
                s.received()
        sync("watching")
        if hazards:
            sync("published")
            time.sleep(1.0)
            for i, s in enumerate(streams):
                for subject, data, at in s.received():
                    key = (first + i, _hazard_seq(data, subject))
                    out["firsts"][key] = min(at, out["firsts"].get(key, at))
        return out
    finally:
        for s in streams:
            s.close()
        loop.close()


def _hazard_seq(data: bytes, subject: str) -> int:
    from driveloop.contracts.hazard import decode_hazard

    return decode_hazard(data, subject).action_id.sequence_number


def _shard_process(args: tuple[Any, ...], barrier: Any, results: Any) -> None:
    """A shard in a process of its own (picklable entry point); its result goes back through ``results``."""
    def sync(point: str) -> None:
        if point != "published" or args[6]:
            barrier.wait(timeout=600)

    try:
        results.put(_shard(*args, sync=sync))
    except BaseException as e:  # noqa: BLE001 - the coordinator reports it; a shard must not hang the others
        barrier.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})


def _run_fleet(url: str, n: int, seconds: float, rate_hz: float, hazards: int, spool: Path, seed: int,
               processes: int = 1) -> dict[str, Any]:
    """The fleet as ``processes`` shards (one StreamLoop thread each), then the aggregate report."""
    sent: list[tuple[int, float, tuple[int, ...]]] = []

    def publish() -> None:
        sent.extend(asyncio.run(_publish_hazards(url, hazards, "hw1", n * SPACING_M, seed)))

    bounds = [(k * n // processes, (k + 1) * n // processes - k * n // processes) for k in range(processes)]
    if processes == 1:
        shards = [_shard(url, 0, n, seconds, rate_hz, spool, hazards > 0,
                         sync=lambda point: publish() if point == "published" else None)]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no fork of a process that holds client threads
        barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
        procs = [ctx.Process(target=_shard_process, args=((url, first, size, seconds, rate_hz, spool / str(k),
                                                           hazards > 0), barrier, results), daemon=True)
                 for k, (first, size) in enumerate(bounds)]
        for proc in procs:
            proc.start()
        try:
            barrier.wait(timeout=600)  # every shard connected: the telemetry phase starts together
            barrier.wait(timeout=600 + 10 * seconds)  # every shard flushed and (with hazards) watching
            if hazards > 0:
                publish()
                barrier.wait(timeout=60)
            shards = [results.get(timeout=600) for _ in procs]
        except Exception as e:  # noqa: BLE001 - a broken barrier: a shard failed, its error is in the queue
            errors = [r["error"] for r in (results.get(timeout=5) for _ in procs) if "error" in r]
            raise ConfigError(f"stream bench shard failed: {errors or e}") from e
        finally:
            for proc in procs:
                proc.join(timeout=30)
        if any("error" in r for r in shards):
            raise ConfigError(f"stream bench shard failed: {[r['error'] for r in shards if 'error' in r]}")
    return _aggregate(url, shards, n, rate_hz, sent)


def _aggregate(url: str, shards: list[dict[str, Any]], n: int, rate_hz: float,
               sent: list[tuple[int, float, tuple[int, ...]]]) -> dict[str, Any]:
    stored = asyncio.run(_stored_per_subject(url))
    published = {v: p for r in shards for v, p in zip(r["ids"], r["published"])}
    lost = sum(max(0, p - stored.get(telemetry_subject(v), 0)) for v, p in published.items())
    dups = sum(max(0, stored.get(telemetry_subject(v), 0) - p) for v, p in published.items())
    wall = max(r["elapsed"] + r["drain_s"] for r in shards)
    latencies = [x for r in shards for x in r["latencies"]]
    acked = sum(r["acked"] for r in shards)
    out: dict[str, Any] = {
        "processes": len(shards), "published": sum(published.values()), "acked": acked, "acked_per_s": acked / wall,
        "offered_per_s": n * rate_hz, "p50_ack_ms": _pct(latencies, 50), "p99_ack_ms": _pct(latencies, 99),
        "max_behind_s": max(r["behind_s"] for r in shards), "drain_s": max(r["drain_s"] for r in shards),
        "flushed": all(r["flushed"] for r in shards), "lost": lost, "duplicates": dups,
        "reconnects": sum(r["reconnects"] for r in shards),
    }  # fmt: skip
    if not sent:
        out["hazard_p99_ms"] = None
        return out
    watched = {i: cells for r in shards for i, cells in r["watched"].items()}
    first = {key: at for r in shards for key, at in r["firsts"].items()}
    sent_at = {k: t for k, t, _ in sent}
    expected = {(i, k) for k, _, cells in sent for i, w in watched.items() if w & set(cells)}
    hazard_ms = [(at - sent_at[k]) * 1e3 for (i, k), at in first.items() if (i, k) in expected]
    out.update({
        "hazards": len(sent), "hazard_expected": len(expected), "hazard_received": len(set(first) & expected),
        "hazard_outside": len(set(first) - expected), "hazard_p50_ms": _pct(hazard_ms, 50),
        "hazard_p99_ms": _pct(hazard_ms, 99),
    })  # fmt: skip
    return out
