"""The stream benchmark (``driveloop stream bench``, bench/stream.py; its shards serve bench/hazards.py too): a
simulated fleet, sharded over client processes (``core.shards``), one StreamLoop thread each.

Phase 1, telemetry: ``vehicles`` connections each publish 10 Hz telemetry for ``seconds`` through
:class:`edge.stream_client.VehicleStream` (async publish, bounded pending acks, msg ids), their ticks spread over
the period as a real fleet's unsynchronised clocks are (:func:`_schedule`); it reports the acked rate,
publish-to-ack latency (from each vehicle's ``publish`` call to its ack), and ``lost``/``duplicates`` from the
broker's per-subject counts against what each vehicle published. Phase 2, hazards: every vehicle subscribes to
the cell it is in, as a driving vehicle does (``edge.hazards.HazardFilter.cells``); signed hazards
(``contracts.hazard``) are published on their ``contracts.stream.hazard_cells`` and timed publish → receive at each
vehicle. ``expected`` = the vehicles whose road ahead (``HazardFilter.road_ahead``) meets the hazard's relevance
cells, worked out apart from the publication rule; ``hazard_outside`` counts receipts by any other vehicle (must
be 0). Each shard freezes its start-up heap (``core.heap``) while it serves, as a long-running vehicle
process does.
The baseline, measured in the same run: one connection publishing with ``js.publish``, awaiting each ack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.cloud.broker import EmbeddedBroker, ServerSpec, ensure_streams, free_port
from driveloop.contracts.stream import WATCH_HORIZON_M, Telemetry, cells_ahead, telemetry_subject
from driveloop.core.exceptions import ConfigError
from driveloop.core.heap import frozen_heap
from driveloop.core.shards import run_shards, split
from driveloop.edge.stream_client import StreamLoop, VehicleStream, nats_servers

logger = logging.getLogger(__name__)

SPACING_M = 40.0  # vehicles spread along the road
HORIZON_M = WATCH_HORIZON_M  # how far ahead each vehicle hears of hazards (the protocol's)


# a vehicle due within this is published now rather than after a sleep of its own: the fleet's ticks go out in
# groups of ~25 per shard every 5 ms (a 5 % jitter on a 100 ms tick), which costs the client ~20 % less CPU per
# message than 1 ms slots (one pass of its event loop serves a group) and times each from its own publish call
SLOT_S = 0.005


MAX_PROCESSES = 64


def default_processes(vehicles: int) -> int:
    """Client processes by default: one per CPU (one Python thread cannot publish for a thousand vehicles, and the
    broker's own threads share the CPUs anyway), never more than the vehicles."""
    return max(1, min(os.cpu_count() or 1, vehicles, MAX_PROCESSES))


def ticks(seconds: float, rate_hz: float) -> int:
    """Whole ticks each vehicle publishes in ``seconds`` (at least one)."""
    return max(1, round(seconds * rate_hz))


def _schedule(n: int, ticks: int, period: float) -> Iterator[tuple[int, int, float]]:
    """(tick, vehicle index, due time from the start) in time order. Vehicle i's ticks are offset by
    ``i / n`` of the period: real vehicles' 10 Hz clocks are not phase-locked, and a fleet publishing all at
    the tick's start would time its own burst (the n-th message waits for the n-1 before it in every queue on
    the way), not the stream."""
    for tick in range(ticks):
        for i in range(n):
            yield tick, i, (tick + i / n) * period


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
    """Publish ``count`` signed hazards on their ``hazard_cells``; (sequence, publish wall time, relevance cells)
    each."""
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
    from driveloop.contracts.stream import hazard_cells, hazard_subject

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
            for cell in hazard_cells(area.cells, "increasing"):
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
                       "pacing": "vehicle i of a shard's n ticks i/n of a period after vehicle 0",
                       "baseline_js_publish_per_s": baseline,
                       "ratio_vs_baseline": (result["acked_per_s"] / baseline) if baseline else None})
        return result
    finally:
        if broker is not None:
            broker.stop()
        tmp.cleanup()


@dataclass(frozen=True)
class ShardPlan:
    """One shard of a simulated fleet (picklable: it crosses to the shard's process). Vehicle ``first + i`` is
    ``<prefix><first+i>`` at x = (first + i) x ``spacing_m`` on ``road``."""

    url: str
    first: int
    n: int
    spool: Path
    seconds: float = 0.0  # the telemetry phase (0: none)
    rate_hz: float = 10.0
    hazards: bool = False  # subscribe to the vehicle's cell (its road ahead: ``HORIZON_M``), collect what arrives
    prefix: str = "bench-"
    spacing_m: float = SPACING_M
    road: str = "hw1"
    passwords: dict[str, str] | None = None  # per-vehicle broker credentials (vehicle id -> password)
    trusted_keys: tuple[bytes, ...] = ()  # each vehicle's HazardFilter judges what it got, after the clock stops
    settle_s: float = 1.0  # after "published": time for the last hazard to arrive

    def ids(self) -> list[str]:
        return vehicle_ids(self.prefix, self.first, self.n)


def vehicle_ids(prefix: str, first: int, n: int) -> list[str]:
    """The ids of bench vehicles ``first … first+n-1`` (a shard's, or a whole fleet's to issue credentials)."""
    return [f"{prefix}{i:05d}" for i in range(first, first + n)]


def shard_plans(url: str, n: int, processes: int, spool: Path, **kw: Any) -> list[ShardPlan]:
    """The fleet of ``n`` vehicles as ``processes`` contiguous shards, each with its own spool directory."""
    return [ShardPlan(url, first, size, spool / str(k), **kw) for k, (first, size) in enumerate(split(n, processes))]


def _shard(plan: ShardPlan, sync: Callable[[str], None]) -> dict[str, Any]:
    """Vehicles ``plan.first … first+n-1`` on one StreamLoop: the telemetry phase, then (``plan.hazards``) watch
    the cells ahead and collect what arrives. ``sync(point)`` is where shards meet the coordinator ("start",
    "watching", "published"); in one process it only publishes the hazards at "published"."""
    loop = StreamLoop(f"stream-bench-{plan.first}")
    ids, first, n = plan.ids(), plan.first, plan.n
    pw = plan.passwords or {}
    streams: list[VehicleStream] = []
    try:
        streams = [VehicleStream(v, plan.url, plan.spool, user=v if v in pw else None, password=pw.get(v), loop=loop)
                   for v in ids]
        deadline = time.monotonic() + 60 + n / 20
        while not all(s.connected() for s in streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not all(s.connected() for s in streams):
            raise ConfigError(f"{sum(not s.connected() for s in streams)} of {n} bench vehicles did not connect")
        base = [Telemetry(vehicle_id=v, seq=0, t_s=0.0, wall_ts=time.time(), x_m=(first + i) * plan.spacing_m,
                          y_m=0.0, lane=(first + i) % 3, speed_mps=30.0, accel_mps2=0.0, mode="model")
                for i, v in enumerate(ids)]
        period = 1.0 / plan.rate_hz
        published = [0] * n
        behind_s = 0.0
        # serving from here on, as a long-running vehicle process (core.heap): the first full collection after
        # building 500 connections walks ~1M objects, a 70-230 ms stop of the loop inside the telemetry phase
        with frozen_heap():
            sync("start")
            t0 = time.monotonic()
            for tick, i, due in _schedule(n, ticks(plan.seconds, plan.rate_hz) if plan.seconds > 0 else 0, period):
                now = time.monotonic()
                if t0 + due - now > SLOT_S:
                    time.sleep(t0 + due - now)
                else:
                    behind_s = max(behind_s, now - t0 - due)
                streams[i].publish(base[i].model_copy(update={"seq": tick, "t_s": tick * period, "wall_ts": time.time()}))
                published[i] += 1
            elapsed = time.monotonic() - t0
            # every message acked (or the deadline) before the broker's counts are read
            flush_deadline = time.monotonic() + max(120.0, 10 * plan.seconds)
            flushed = all(s.flush(max(0.0, flush_deadline - time.monotonic())) for s in streams)
            out: dict[str, Any] = {
                "ids": ids, "published": published, "elapsed": elapsed, "drain_s": time.monotonic() - t0 - elapsed,
                "behind_s": behind_s, "flushed": flushed, "latencies": [x for s in streams for x in s.ack_latencies_ms()],
                "acked": sum(s.stats()["acked"] for s in streams),
                "reconnects": sum(s.stats()["reconnects"] for s in streams), "watched": {}, "firsts": {}, "verdicts": {},
            }  # fmt: skip
            if plan.hazards:
                from driveloop.edge.hazards import HazardFilter

                for i, s in enumerate(streams):
                    x = (first + i) * plan.spacing_m
                    s.watch_cells(plan.road, HazardFilter.cells(x))  # as a driving vehicle does
                    out["watched"][first + i] = set(cells_ahead(x, HORIZON_M))  # its road ahead: what it must get
                deadline = time.monotonic() + 60 + n / 20
                while not all(s.watch_settled() for s in streams) and time.monotonic() < deadline:
                    time.sleep(0.05)  # every subscription in place and its stored hazards read
                for s in streams:
                    s.received()
            sync("watching")
            if plan.hazards:
                sync("published")
                time.sleep(plan.settle_s)
                got = [s.received() for s in streams]
        if plan.hazards:
            for i, items in enumerate(got):  # the clock has stopped: decoding and verifying are not timed
                for subject, data, at in items:
                    key = (first + i, _hazard_seq(data))
                    out["firsts"][key] = min(at, out["firsts"].get(key, at))
            if plan.trusted_keys:
                out["verdicts"] = _verdicts(plan, got)
        return out
    finally:
        for s in streams:
            s.close()
        loop.close()


def _verdicts(plan: ShardPlan, got: list[list[tuple[str, bytes, float]]]) -> dict[str, int]:
    """Every receipt through its vehicle's own HazardFilter (signature, validity, replay): verdict counts."""
    from driveloop.contracts.hazard import HazardVerifier
    from driveloop.edge.hazards import HazardFilter

    verifier = HazardVerifier(list(plan.trusted_keys))
    counts: Counter[str] = Counter()
    for items in got:
        hazard_filter = HazardFilter(verifier)
        for subject, data, at in items:
            counts[hazard_filter.offer(subject, data, at)] += 1
    return dict(counts)


def _hazard_seq(data: bytes) -> int:
    from driveloop.contracts.hazard import decode_hazard

    # which hazard it is; whether it was addressed to the cell it came on is the vehicles' filters' verdict
    return decode_hazard(data).action_id.sequence_number


def run_fleet(plans: list[ShardPlan], publish: Callable[[], None]) -> list[dict[str, Any]]:
    """Every shard's result: one shard runs in this process, more in processes of their own
    (``core.shards``); ``publish`` runs once every shard watches (with hazards) and before they collect."""
    hazards = any(p.hazards for p in plans)
    if len(plans) == 1:
        return [_shard(plans[0], sync=lambda point: publish() if point == "published" else None)]
    points = [("start", 600.0), ("watching", 600.0 + 10 * max(p.seconds for p in plans))]
    if hazards:
        points.append(("published", 600.0))
    return run_shards(_shard, [(p,) for p in plans], points, what="stream bench shard",
                      before=lambda point: publish() if point == "published" else None)


def _run_fleet(url: str, n: int, seconds: float, rate_hz: float, hazards: int, spool: Path, seed: int,
               processes: int = 1) -> dict[str, Any]:
    """The fleet as ``processes`` shards (one StreamLoop thread each), then the aggregate report."""
    sent: list[tuple[int, float, tuple[int, ...]]] = []

    def publish() -> None:
        sent.extend(asyncio.run(_publish_hazards(url, hazards, "hw1", n * SPACING_M, seed)))

    plans = shard_plans(url, n, processes, spool, seconds=seconds, rate_hz=rate_hz, hazards=hazards > 0)
    return _aggregate(url, run_fleet(plans, publish), n, rate_hz, sent)


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
    out.update({f"hazard_{k}": v for k, v in hazard_delivery(shards, sent).items()})
    out["hazards"] = len(sent)
    return out


def hazard_delivery(shards: list[dict[str, Any]], sent: list[tuple[int, float, tuple[int, ...]]]) -> dict[str, Any]:
    """``sent`` hazards (sequence, start wall time, relevance cells) against what the shards' vehicles got:
    ``expected`` = (vehicle, hazard) pairs whose road ahead (``watched``) meets the hazard's relevance cells,
    ``received`` of those, ``outside`` = receipts by any other vehicle; start → first receipt p50/p99 (ms).
    Receipts of hazards not in ``sent`` are not counted."""
    watched = {i: cells for r in shards for i, cells in r["watched"].items()}
    sent_at = {k: t for k, t, _ in sent}
    first = {key: at for r in shards for key, at in r["firsts"].items() if key[1] in sent_at}
    expected = {(i, k) for k, _, cells in sent for i, w in watched.items() if w & set(cells)}
    ms = [(at - sent_at[k]) * 1e3 for (i, k), at in first.items() if (i, k) in expected]
    return {"expected": len(expected), "received": len(set(first) & expected), "outside": len(set(first) - expected),
            "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99), "max_ms": _pct(ms, 100)}
