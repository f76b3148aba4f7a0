"""Stream bench (issue 16): the fleet's live data plane on one machine, against a baseline in the same run.

    python bench/stream.py [--vehicles 1000] [--seconds 60] [--sync always 1s] [--ceiling 1500 2000 3000]
                           [--json]

For each ``--sync`` (JetStream ``sync_interval``: ``always`` fsyncs every message before acking it):
- the fleet run of ``driveloop stream bench`` (``driveloop/_stream_bench.py``): ``vehicles`` connections on one
  StreamLoop at 10 Hz for ``seconds``: acked/s, p50/p99 publish-to-ack, lost, duplicates; hazard fan-out to
  every vehicle watching the hazard's cells, publish → receive p99; and the baseline: ``js.publish`` awaiting
  each ack on one connection (``ratio_vs_baseline``);
- the ceiling: more vehicles (``--ceiling``) for ``--ceiling-seconds``, until acked/s falls below 95 % of offered;
  ``ceiling_rate_vehicles`` is the largest fleet acked at ≥ 95 % of its offered rate, ``ceiling_p99_vehicles``
  the largest that also kept p99 publish-to-ack ≤ ``--target-p99-ms``;
- replay: one vehicle's last 10 minutes (6,000 messages) read back through an ephemeral consumer;
- order: 4 parallel sink workers over 8 vehicles' interleaved telemetry, messages/s and per-vehicle order kept.
Benchmarks print ratios against a baseline measured in the same run; they are not timed tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from driveloop._stream_bench import default_processes, run_bench
from driveloop.cloud.broker import EmbeddedBroker, ServerSpec, ensure_streams, free_port
from driveloop.cloud.stream_sinks import ConsumerSpec, StreamMetrics, replay_vehicle, run_consumer, shard_of
from driveloop.contracts.stream import Telemetry, encode, telemetry_subject


async def _replay_and_order(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    now = time.time()
    for seq in range(6000):  # ten minutes at 10 Hz
        msg = Telemetry(vehicle_id="replay-v", seq=seq, t_s=seq * 0.1, wall_ts=now - 600 + seq * 0.1, x_m=seq * 3.0,
                        y_m=0.0, lane=1, speed_mps=30.0, accel_mps2=0.0, mode="model")
        await js.publish_async(telemetry_subject("replay-v"), encode(msg))
    await js.publish_async_completed()
    t0 = time.perf_counter()
    got = await replay_vehicle(js, "replay-v", now - 601)
    replay_s = time.perf_counter() - t0

    vehicles = [f"order-{i}" for i in range(8)]
    per = 2000
    for seq in range(per):
        for v in vehicles:
            m = Telemetry(vehicle_id=v, seq=seq, t_s=seq * 0.1, wall_ts=now, x_m=0.0, y_m=0.0, lane=1, speed_mps=30.0,
                          accel_mps2=0.0, mode="model")
            await js.publish_async(telemetry_subject(v), encode(m))
    await js.publish_async_completed()
    seen: dict[str, list[int]] = {v: [] for v in vehicles}

    def on_handled(worker: int, batch: list[Any]) -> None:
        for m in batch:
            if m.vehicle_id in seen:
                seen[m.vehicle_id].append(m.seq)

    stop = asyncio.Event()
    spec = ConsumerSpec("bench-order", "TELEMETRY", "tel.>", lambda batch: None, workers=4, batch=256)
    t0 = time.perf_counter()
    task = asyncio.create_task(run_consumer(js, spec, StreamMetrics(), stop, on_handled=on_handled))
    while sum(len(s) for s in seen.values()) < per * len(vehicles) and time.perf_counter() - t0 < 300:
        await asyncio.sleep(0.01)
    order_s = time.perf_counter() - t0
    stop.set()
    await task
    await nc.close()
    return {
        "replay_messages": len(got), "replay_s": replay_s, "replay_in_order": [m.seq for m in got] == list(range(6000)),
        "order_workers": 4, "order_shards_used": len({shard_of(v, 4) for v in vehicles}),
        "order_msgs_per_s": per * len(vehicles) / order_s,
        "order_kept": all(s == list(range(per)) for s in seen.values()),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vehicles", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sync", nargs="+", default=["always", "1s"])
    ap.add_argument("--ceiling", type=int, nargs="*", default=[1500, 2000, 3000])
    ap.add_argument("--ceiling-seconds", type=float, default=20.0)
    ap.add_argument("--target-p99-ms", type=float, default=50.0, help="the p99 publish-to-ack a ceiling row must keep")
    ap.add_argument("--hazards", type=int, default=20)
    ap.add_argument("--processes", type=int, default=None,
                    help="client processes the simulated fleet is sharded over (default: one per CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.processes = args.processes or default_processes(args.vehicles)

    out: dict[str, Any] = {"machine": f"{platform.node()} {os.cpu_count()} cpus",
                           "load_before": os.getloadavg(), "runs": [], "ceiling": []}
    for sync in args.sync:
        r = run_bench(args.vehicles, args.seconds, sync_interval=sync, hazards=args.hazards, processes=args.processes)
        out["runs"].append(r)
        if not args.json:
            print(json.dumps({k: r[k] for k in ("sync_interval", "vehicles", "processes", "acked_per_s", "offered_per_s",
                                                "p99_ack_ms", "lost", "duplicates", "hazard_p99_ms",
                                                "baseline_js_publish_per_s", "ratio_vs_baseline")}))
    for n in args.ceiling:
        r = run_bench(n, args.ceiling_seconds, sync_interval=args.sync[-1], hazards=0, baseline_s=0,
                      processes=args.processes)
        row = {k: r[k] for k in ("vehicles", "sync_interval", "processes", "acked_per_s", "offered_per_s", "p50_ack_ms",
                                 "p99_ack_ms", "max_behind_s", "lost", "duplicates")}
        row["rate_kept"] = r["acked_per_s"] >= 0.95 * r["offered_per_s"]
        row["p99_kept"] = row["rate_kept"] and r["p99_ack_ms"] is not None and r["p99_ack_ms"] <= args.target_p99_ms
        out["ceiling"].append(row)
        if not args.json:
            print(json.dumps(row))
        if not row["rate_kept"]:
            break
    first = out["runs"][-1] if out["runs"] else None
    rows = ([{"vehicles": first["vehicles"], "rate_kept": first["acked_per_s"] >= 0.95 * first["offered_per_s"],
              "p99_kept": (first["p99_ack_ms"] or 1e9) <= args.target_p99_ms}] if first else []) + out["ceiling"]
    out["ceiling_rate_vehicles"] = max((r["vehicles"] for r in rows if r["rate_kept"]), default=None)
    out["ceiling_p99_vehicles"] = max((r["vehicles"] for r in rows if r["rate_kept"] and r["p99_kept"]), default=None)
    with tempfile.TemporaryDirectory() as d:
        spec = ServerSpec(name="bench-replay", port=free_port(), http_port=free_port(), store_dir=Path(d) / "js")
        with EmbeddedBroker(spec) as b:
            out["replay_order"] = asyncio.run(_replay_and_order(b.url))
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
