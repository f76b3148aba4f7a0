"""Log path bench (issue 17): a fleet's structured logs into the cloud index, against a baseline in the same run.

    python bench/logs.py [--vehicles 64] [--rate 200] [--seconds 30] [--batch-s 1.0] [--processes 2]
                         [--threads 4] [--json]

- The cloud: the real ingest server (``driveloop cloud serve``, its own process) over a fresh data directory,
  its log index the default SQLite FTS5 file.
- The fleet: ``vehicles`` vehicles sharded over ``processes`` client processes (``core.shards``: one Python
  process cannot play 64 vehicles' logging and shipping at 12,800 lines/s beside the server). Each vehicle logs
  ``rate`` lines/s into its own on-disk spool (``edge/logspool.py``: ECS JSON lines, numbered, capped) on a fixed
  schedule, and a shipping thread per process sends every vehicle's spool every ``batch-s`` seconds over HTTP
  (``edge/logship.py``, ``threads`` senders), apart from the logging: a slow cloud grows the spools (the
  backlog), it does not slow the vehicles. Once a second one vehicle logs an AEB event with a unique word; a
  probe searches the index for it (``GET /v1/logs/search``) until found: event → searchable.
- Results: offered lines/s (what the vehicles spooled over the run), indexed lines/s (the server's
  ``driveloop_ingest_log_lines_total`` over the run and its drain, and its steady slope while the fleet logs),
  ``backlog_at_end`` (lines still in the spools when the logging stopped), lost (spooled − indexed − pending),
  CPU µs per line of the clients and of the server, p50/p95 AEB latency, and the baseline: the same lines
  validated and added straight to a LogIndex in one process, no HTTP, no spool (``ratio_vs_index_only``).
Targets: 64 x 200 = 12,800 lines/s offered and indexed with no growing backlog; AEB searchable within 2 s at
p95; nothing lost. Benchmarks print ratios against a baseline measured in the same run; they are not timed tests.
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
from driveloop.core.shards import run_shards, split
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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _generate(url: str, ids: list[str], tokens: dict[str, str], rate: int, seconds: float, batch_s: float,
              spool_dir: str, shard: int, shards: int, threads: int, nonce: str, sync: Any) -> dict[str, Any]:
    """One client process's share of the fleet: its vehicles log ``rate`` lines/s each into their own spools and
    ship them every ``batch_s``; at tick t the vehicle of shard ``t % shards`` logs the AEB event whose unique
    word is ``aebprobe<nonce>t<t>`` (the coordinator's probe searches for it). Module-level: it is pickled."""
    spools = {v: LogSpool(Path(spool_dir) / f"{v}.db", cap_bytes=256 * 2**20) for v in ids}
    shippers = {v: LogShipper(v, spools[v], HttpLogSink(url, tokens[v]), batch_lines=2000) for v in ids}
    rngs = {v: random.Random(v) for v in ids}
    events: dict[str, float] = {}  # unique word -> when the vehicle logged it
    pool = ThreadPoolExecutor(threads)
    spooled, behind_s = 0, 0.0
    done = threading.Event()

    def ship_loop() -> None:
        """Every ``batch_s`` every vehicle ships what its spool holds, apart from the logging (as on a vehicle:
        a slow cloud grows the spools, it does not slow the logging)."""
        while not done.is_set():
            t = time.time()
            list(pool.map(lambda v: shippers[v].ship(), ids))
            done.wait(max(0.0, batch_s - (time.time() - t)))

    shipper = threading.Thread(target=ship_loop, daemon=True)
    try:
        sync("start")
        cpu0 = time.process_time()
        t_start = time.time()
        shipper.start()
        per_s = max(1, round(1 / batch_s))  # one AEB event a second, fleet-wide
        for tick in range(max(1, round(seconds / batch_s))):
            spare = t_start + tick * batch_s - time.time()
            if spare > 0:
                time.sleep(spare)
            else:
                behind_s = max(behind_s, -spare)
            n = int(rate * batch_s)
            for v in ids:
                spools[v].append_many([_fields(v, spooled + k, rngs[v]) for k in range(n)])
                spooled += n
            if tick % per_s == 0 and (tick // per_s) % shards == shard:
                v = ids[(tick // per_s) % len(ids)]
                word = f"aebprobe{nonce}t{tick}"
                spools[v].append({**_fields(v, 0, rngs[v]), "log.level": "warning", "event.action": "aeb",
                                  "message": f"aeb activation {word}: ttc 1.1 s"})
                events[word] = time.time()
                spooled += 1
        offered_s = max(time.time() - t_start, seconds)  # the last tick's lines belong to its whole interval
        backlog = sum(s.stats().lines for s in spools.values())
        done.set()
        shipper.join()
        list(pool.map(lambda v: shippers[v].ship(), ids))  # drain
        pending = sum(s.stats().lines for s in spools.values())
        return {"spooled": spooled, "offered_s": offered_s, "drained_at": time.time(), "pending": pending,
                "backlog": backlog, "events": events, "behind_s": behind_s, "cpu_s": time.process_time() - cpu0}
    finally:
        done.set()
        pool.shutdown()
        for v in ids:
            shippers[v].sink.close()
            spools[v].close()


def run(vehicles: int, rate: int, seconds: float, batch_s: float, work: Path, processes: int = 2,
        threads: int = 4) -> dict[str, Any]:
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
        nonce = secrets.token_hex(3)
        found: dict[str, float] = {}
        started = threading.Event()
        stop = threading.Event()
        t_start = 0.0

        def probe() -> None:
            """Searches for each tick's AEB word from its tick on, until found (or 30 s after the fleet ends)."""
            started.wait()
            per_s = max(1, round(1 / batch_s))
            last = ((max(1, round(seconds / batch_s)) - 1) // per_s) * per_s
            words = {f"aebprobe{nonce}t{t}": t * batch_s for t in range(0, last + 1, per_s)}
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
                while len(found) < len(words):
                    now = time.time()
                    for word in [w for w, at in words.items() if w not in found and t_start + at <= now]:
                        r = c.get("/v1/logs/search", params={"q": word, "limit": 1})
                        if r.status_code == 200 and r.json()["lines"]:
                            found[word] = time.time()
                    if stop.is_set() and time.time() > stop_at + 30:
                        return
                    time.sleep(0.05)

        def before(point: str) -> None:
            nonlocal t_start
            if point == "start":  # every shard's spools are open: the clock starts with the barrier
                t_start = time.time() + 0.01
                started.set()

        samples: list[tuple[float, int]] = []  # (when, lines indexed so far): the server's steady rate

        def sample() -> None:
            started.wait()
            while not stop.is_set():
                samples.append((time.time(), _accepted(url)))
                stop.wait(0.5)

        stop_at = float("inf")
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        acc0 = _accepted(url)
        server_cpu0 = _cpu_s(server.pid)
        args = [(url, ids[first:first + size], {v: tokens[v] for v in ids[first:first + size]}, rate, seconds,
                 batch_s, str(work / "spools" / str(k)), k, processes, threads, nonce)
                for k, (first, size) in enumerate(split(vehicles, processes))]
        shards = run_shards(_generate, args, [("start", 600.0)], before=before,
                            what="log bench generator", result_timeout_s=600.0 + 10 * seconds)
        drained_s = max(r["drained_at"] for r in shards) - t_start
        offered_s = max(r["offered_s"] for r in shards)
        stop_at = time.time()
        stop.set()
        prober.join(timeout=60)
        sampler.join(timeout=60)
        # Steady state: from two shipping rounds in (the pipe is full) to the end of the logging.
        window = [(t, n) for t, n in samples if t_start + 2 * batch_s + 1 <= t <= t_start + offered_s]
        steady = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 2 else None
        indexed = _accepted(url) - acc0
        server_cpu = _cpu_s(server.pid) - server_cpu0
        client_cpu = sum(r["cpu_s"] for r in shards)
        spooled = sum(r["spooled"] for r in shards)
        pending = sum(r["pending"] for r in shards)
        events = {w: at for r in shards for w, at in r["events"].items()}
        lat = np.array([found[w] - events[w] for w in events if w in found])
        return {
            "vehicles": vehicles, "lines_per_vehicle_s": rate, "processes": processes, "seconds": round(offered_s, 1),
            "offered_lines_per_s": round(spooled / offered_s), "indexed_lines_per_s": round(indexed / drained_s),
            "indexed_steady_lines_per_s": None if steady is None else round(steady),
            "spooled": spooled, "indexed": indexed, "lost": spooled - indexed - pending, "pending": pending,
            "backlog_at_end": sum(r["backlog"] for r in shards), "max_behind_s": round(max(r["behind_s"] for r in shards), 2), "drain_s": round(drained_s - offered_s, 2),
            "client_cpu_us_per_line": round(client_cpu / spooled * 1e6, 1),
            "server_cpu_us_per_line": round(server_cpu / max(1, indexed) * 1e6, 1),
            "aeb_events": len(events), "aeb_found": len(set(found) & set(events)),
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
    ap.add_argument("--processes", type=int, default=2, help="client processes the vehicles are sharded over")
    ap.add_argument("--threads", type=int, default=4, help="sender threads per client process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="driveloop-logs-bench-") as tmp:
        work = Path(tmp)
        base = baseline(50_000, work)
        result = run(args.vehicles, args.rate, args.seconds, args.batch_s, work, args.processes, args.threads)
    result.update(baseline_index_only_lines_per_s=round(base),
                  ratio_vs_index_only=round(result["indexed_lines_per_s"] / base, 3),
                  target_lines_per_s=TARGET_LINES_PER_S, target_aeb_p95_s=TARGET_AEB_P95_S,
                  # kept up: the target offered, nothing lost, and no backlog beyond the two shipping rounds
                  # in flight at any moment (a server that falls behind grows it every second of the run)
                  meets_throughput=(result["offered_lines_per_s"] >= TARGET_LINES_PER_S and result["lost"] == 0
                                    and result["pending"] == 0
                                    and result["backlog_at_end"] <= 2 * args.vehicles * args.rate * args.batch_s),
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
