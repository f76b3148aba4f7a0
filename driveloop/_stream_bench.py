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
              workdir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Run both phases (see the module docstring); an embedded broker unless ``url`` is given."""
    if vehicles < 1 or seconds <= 0 or rate_hz <= 0:
        raise ConfigError("vehicles, seconds and rate must be positive")
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
        result = _run_fleet(url, vehicles, seconds, rate_hz, hazards, root / "spool", seed)
        result.update({"vehicles": vehicles, "seconds": seconds, "rate_hz": rate_hz, "sync_interval": sync_interval,
                       "baseline_js_publish_per_s": baseline,
                       "ratio_vs_baseline": (result["acked_per_s"] / baseline) if baseline else None})
        return result
    finally:
        if broker is not None:
            broker.stop()
        tmp.cleanup()


def _run_fleet(url: str, n: int, seconds: float, rate_hz: float, hazards: int, spool: Path, seed: int) -> dict[str, Any]:
    loop = StreamLoop("stream-bench")
    ids = [f"bench-{i:05d}" for i in range(n)]
    streams: list[VehicleStream] = []
    try:
        streams = [VehicleStream(v, url, spool, loop=loop) for v in ids]
        deadline = time.monotonic() + 60
        while not all(s.connected() for s in streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        base = [Telemetry(vehicle_id=v, seq=0, t_s=0.0, wall_ts=time.time(), x_m=i * SPACING_M, y_m=0.0, lane=i % 3,
                          speed_mps=30.0, accel_mps2=0.0, mode="model") for i, v in enumerate(ids)]
        period = 1.0 / rate_hz
        published = [0] * n
        behind_s = 0.0
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
        # every message acked (or the deadline) before counting what the broker stored
        flush_deadline = time.monotonic() + max(120.0, 10 * seconds)
        flushed = all(s.flush(max(0.0, flush_deadline - time.monotonic())) for s in streams)
        drain_s = time.monotonic() - t0 - elapsed
        latencies = [x for s in streams for x in s.ack_latencies_ms()]
        acked = sum(s.stats()["acked"] for s in streams)
        stored = asyncio.run(_stored_per_subject(url))
        lost = sum(max(0, published[i] - stored.get(telemetry_subject(v), 0)) for i, v in enumerate(ids))
        dups = sum(max(0, stored.get(telemetry_subject(v), 0) - published[i]) for i, v in enumerate(ids))
        out: dict[str, Any] = {
            "published": sum(published), "acked": acked, "acked_per_s": acked / (elapsed + drain_s),
            "offered_per_s": n * rate_hz, "p50_ack_ms": _pct(latencies, 50), "p99_ack_ms": _pct(latencies, 99),
            "max_behind_s": behind_s, "drain_s": drain_s, "flushed": flushed, "lost": lost, "duplicates": dups,
            "reconnects": sum(s.stats()["reconnects"] for s in streams),
        }  # fmt: skip
        out.update(_hazard_phase(url, ids, streams, hazards, seed))
        return out
    finally:
        for s in streams:
            s.close()
        loop.close()


def _hazard_phase(url: str, ids: list[str], streams: list[VehicleStream], hazards: int, seed: int) -> dict[str, Any]:
    from driveloop.contracts.hazard import decode_hazard

    if hazards <= 0:
        return {"hazard_p99_ms": None}
    watched = []
    for i, s in enumerate(streams):
        cells = cells_ahead(i * SPACING_M, HORIZON_M)
        s.watch_cells("hw1", cells)
        watched.append(set(cells))
    time.sleep(1.0 + len(streams) / 500)  # subscriptions in place
    for s in streams:
        s.received()
    sent = asyncio.run(_publish_hazards(url, hazards, "hw1", len(streams) * SPACING_M, seed))
    time.sleep(1.0)
    first: dict[tuple[int, int], float] = {}
    for i, s in enumerate(streams):
        for subject, data, at in s.received():
            seq = decode_hazard(data, subject).action_id.sequence_number
            first[(i, seq)] = min(at, first.get((i, seq), at))
    sent_at = {k: t for k, t, _ in sent}
    expected = {(i, k) for k, _, cells in sent for i in range(len(streams)) if watched[i] & set(cells)}
    latencies = [(at - sent_at[k]) * 1e3 for (i, k), at in first.items() if (i, k) in expected]
    return {
        "hazards": len(sent), "hazard_expected": len(expected), "hazard_received": len(set(first) & expected),
        "hazard_outside": len(set(first) - expected), "hazard_p50_ms": _pct(latencies, 50),
        "hazard_p99_ms": _pct(latencies, 99),
    }
