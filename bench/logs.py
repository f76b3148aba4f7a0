"""Log path bench (issue 17): a fleet's structured logs into the cloud index, against a baseline in the same run.

    python bench/logs.py [--vehicles 64] [--rate 200] [--seconds 30] [--batch-s 1.0] [--json]

- The cloud: the real ingest server (``driveloop cloud serve``, its own process) over a fresh data directory,
  its log index the default SQLite FTS5 file.
- The fleet: ``vehicles`` vehicles in this process, each logging ``rate`` lines/s into its own on-disk spool
  (``edge/logspool.py``: ECS JSON lines, numbered, capped) and shipping it every ``batch-s`` seconds over HTTP
  (``edge/logship.py``, 8 sender threads), for ``seconds``. Once a second one vehicle logs an AEB event with a
  unique word; a probe searches the index for it (``GET /v1/logs/search``) until found: event → searchable.
- Results: offered and indexed lines/s (from the server's ``driveloop_ingest_log_lines_total``), lost lines
  (spooled minus indexed at the end), p50/p95 AEB latency, and the baseline: the same lines validated and
  added straight to a LogIndex in one process, no HTTP, no spool (``ratio_vs_index_only``).
Targets: 64 x 200 = 12,800 lines/s indexed; AEB searchable within 2 s at p95; nothing lost.
Benchmarks print ratios against a baseline measured in the same run; they are not timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from driveloop.cloud.logindex import LogIndex
from driveloop.contracts.logline import LogLine
from driveloop.edge.logship import HttpLogSink, LogShipper
from driveloop.edge.logspool import LogSpool

TARGET_LINES_PER_S = 12_800
TARGET_AEB_P95_S = 2.0
MESSAGES = ("model v{v} answered in {ms:.1f} ms", "lane keeping: offset {off:+.2f} m", "lead at {gap:.1f} m, "
            "closing {rel:.1f} m/s", "segment closed: {n} ticks", "uploader: {n} bytes queued")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(vehicle: str, i: int, rng: random.Random) -> dict[str, Any]:
    msg = rng.choice(MESSAGES).format(v=3, ms=rng.uniform(2, 9), off=rng.uniform(-1, 1), gap=rng.uniform(5, 80),
                                      rel=rng.uniform(-5, 5), n=rng.randint(1, 20000))
    return {"@timestamp": _now_iso(), "log.level": "debug" if i % 4 == 0 else "info", "log.logger": "driveloop.edge",
            "service.name": "vehicle", "message": msg, "vehicle.id": vehicle, "model.version": "3",
            "trace.id": "0" * 31 + "1", "span.id": "0" * 15 + "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepted(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r'driveloop_ingest_log_lines_total\{outcome="accepted"\} ([0-9.e+]+)', text)
    return int(float(m.group(1))) if m else 0


def baseline(n: int, tmp: Path) -> float:
    """Lines/s of validation + LogIndex.add alone (one process, batches of 200, no HTTP, no spool)."""
    rng = random.Random(1)
    lines = [LogLine.model_validate({**_fields(f"b{i % 64:03d}", i, rng), "event.sequence": i}) for i in range(n)]
    raw = [json.dumps(x.to_json()) for x in lines]
    index = LogIndex(f"sqlite:///{tmp / 'baseline.db'}")
    t0 = time.perf_counter()
    for k in range(0, n, 200):
        index.add([LogLine.model_validate_json(t) for t in raw[k:k + 200]])
    dt = time.perf_counter() - t0
    index.close()
    return n / dt


def run(vehicles: int, rate: int, seconds: float, batch_s: float, work: Path) -> dict[str, Any]:
    home = work / "home"
    admin = secrets.token_urlsafe(24)
    port = _free_port()
    env = {**os.environ, "DRIVELOOP_HOME": str(home), "DRIVELOOP_CLOUD_ADMIN_TOKEN": admin}
    exe = shutil.which("driveloop")
    cmd = [exe] if exe else [sys.executable, "-c", "from driveloop.cli import main; main()"]
    server = subprocess.Popen([*cmd, "cloud", "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        ids = [f"veh{i:03d}" for i in range(vehicles)]
        tokens = {}
        for v in ids:  # the CLI registers each vehicle in the server's catalog
            out = subprocess.run([*cmd, "cloud", "vehicles", "add", v, "--json"], env=env, capture_output=True,
                                 text=True, check=True)
            tokens[v] = json.loads(out.stdout)["token"]
        spools = {v: LogSpool(work / "spools" / f"{v}.db", cap_bytes=256 * 2**20) for v in ids}
        shippers = {v: LogShipper(v, spools[v], HttpLogSink(url, tokens[v]), batch_lines=2000) for v in ids}
        rngs = {v: random.Random(i) for i, v in enumerate(ids)}
        events: dict[str, float] = {}  # unique word -> when the vehicle logged it
        found: dict[str, float] = {}
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
                while not stop.is_set() or len(found) < len(events):
                    for word in [w for w in list(events) if w not in found]:
                        r = c.get("/v1/logs/search", params={"q": word, "limit": 1})
                        if r.status_code == 200 and r.json()["lines"]:
                            found[word] = time.time()
                    if stop.is_set() and time.time() > stop_at + 30:
                        return
                    time.sleep(0.05)

        stop_at = float("inf")
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        pool = ThreadPoolExecutor(8)
        spooled = 0
        acc0 = _accepted(url)
        t_start = time.time()
        tick = 0
        while time.time() - t_start < seconds:
            tick_t = t_start + tick * batch_s
            time.sleep(max(0.0, tick_t - time.time()))
            n = int(rate * batch_s)
            for v in ids:
                spools[v].append_many([_fields(v, spooled + k, rngs[v]) for k in range(n)])
                spooled += n
            if tick % max(1, int(round(1 / batch_s))) == 0:  # one AEB event a second, from a random vehicle
                v = ids[tick % len(ids)]
                word = f"aebprobe{secrets.token_hex(4)}"
                spools[v].append({**_fields(v, 0, rngs[v]), "log.level": "warning", "event.action": "aeb",
                                  "message": f"aeb activation {word}: ttc 1.1 s"})
                events[word] = time.time()
                spooled += 1
            list(pool.map(lambda v: shippers[v].ship(), ids))  # every vehicle ships its batch, 8 at a time
            tick += 1
        offered_s = time.time() - t_start
        list(pool.map(lambda v: shippers[v].ship(), ids))  # drain
        drained_s = time.time() - t_start
        stop_at = time.time()
        stop.set()
        prober.join(timeout=60)
        indexed = _accepted(url) - acc0
        pending = sum(s.stats().lines for s in spools.values())
        lat = np.array([found[w] - events[w] for w in events if w in found])
        return {
            "vehicles": vehicles, "lines_per_vehicle_s": rate, "seconds": round(offered_s, 1),
            "offered_lines_per_s": round(spooled / offered_s), "indexed_lines_per_s": round(indexed / drained_s),
            "spooled": spooled, "indexed": indexed, "lost": spooled - indexed - pending, "pending": pending,
            "aeb_events": len(events), "aeb_found": len(found),
            "aeb_p50_s": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "aeb_p95_s": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicles", type=int, default=64)
    ap.add_argument("--rate", type=int, default=200, help="lines per vehicle per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch-s", type=float, default=1.0, help="how often each vehicle ships its spool")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="driveloop-logs-bench-") as tmp:
        work = Path(tmp)
        base = baseline(50_000, work)
        result = run(args.vehicles, args.rate, args.seconds, args.batch_s, work)
    result.update(baseline_index_only_lines_per_s=round(base),
                  ratio_vs_index_only=round(result["indexed_lines_per_s"] / base, 3),
                  target_lines_per_s=TARGET_LINES_PER_S, target_aeb_p95_s=TARGET_AEB_P95_S,
                  meets_throughput=result["indexed_lines_per_s"] >= TARGET_LINES_PER_S,
                  meets_aeb_latency=result["aeb_p95_s"] is not None and result["aeb_p95_s"] <= TARGET_AEB_P95_S,
                  machine=f"{platform.machine()} {os.cpu_count()} cores", load_before=[round(x, 2) for x in load_before],
                  load_after=[round(x, 2) for x in os.getloadavg()])
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
