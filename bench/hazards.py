"""Hazard bench (issue 16): a vehicle's event → the hazard service → every vehicle whose road ahead is in the
relevance area, none outside, with N subscribed vehicles; against a baseline in the same run.

    python bench/hazards.py [--vehicles 1000] [--events 30] [--json]

Setup: the embedded nats-server with per-vehicle credentials, the hazard service (signing key, durable consumers),
``--vehicles`` VehicleStream connections on one StreamLoop, vehicle i at x = i x ``SPACING_M`` on road hw1, each
watching the cells ``edge.hazards.HORIZON_M`` ahead (as a vehicle does) and verifying what it gets through its own
HazardFilter. Then ``--events`` times, a reporting vehicle publishes a full-AEB event (a standing lead 80 m ahead) at
a random x; end to end = the event's wall time → the moment each vehicle's client hands the signed hazard over
(measured by the client's loop). ``expected`` = the vehicles watching at least one cell of the hazard's relevance
area; ``outside`` counts receipts by any other vehicle (must be 0).
Baseline: the same hazard bytes published straight on the same cells by a service connection (no event, no service
in the path): publish → receive at the same vehicles. ``ratio`` = end-to-end p99 / baseline p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from driveloop.cloud.broker import Credentials, EmbeddedBroker, ensure_streams
from driveloop.cloud.hazard_service import HazardService, hazard_dir
from driveloop.contracts.hazard import Hazard, HazardVerifier, encode_hazard
from driveloop.contracts.stream import VehicleEvent, hazard_subject
from driveloop.edge.hazards import HazardFilter
from driveloop.edge.stream_client import StreamLoop, VehicleStream

SPACING_M = 20.0  # 1,000 vehicles over 20 km of road (more when the events need it)
EVENT_STEP_M = 400.0  # events this far apart: each its own action (the service merges within 300 m)
GAP_M = 80.0  # the standing lead each event reports: the hazard's position is the event's x + this
ROAD = "hw1"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))], 3)


def _wait(cond: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


async def _raw_publish(url: str, user: str, password: str, data: bytes, cells: tuple[int, ...]) -> float:
    nc = await nats.connect(url, user=user, password=password)
    t0 = time.time()
    for cell in cells:
        await nc.publish(hazard_subject(ROAD, cell), data)
    await nc.flush()
    await nc.close()
    return t0


def run(vehicles: int, events: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="hazard-bench-"))
    ids = [f"b{i:04d}" for i in range(vehicles)] + ["reporter"]
    creds = Credentials(root / "nats")
    passwords = creds.issue_vehicles(ids)
    svc = creds.issue_service("hazards")
    creds.save()
    spacing = max(SPACING_M, (3500.0 + EVENT_STEP_M * events) / vehicles)
    out: dict[str, Any] = {"vehicles": vehicles, "events": events, "spacing_m": spacing}
    with EmbeddedBroker.embedded(root / "nats", creds.users) as broker:
        async def setup() -> None:
            nc = await nats.connect(broker.url, user="svc-hazards", password=svc)
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(setup())
        loop = StreamLoop("bench")
        streams = [VehicleStream(vid, broker.url, root / "spool", user=vid, password=passwords[vid], loop=loop)
                   for vid in ids]
        try:
            t0 = time.perf_counter()
            assert _wait(lambda: all(s.connected() for s in streams), 300), "vehicles did not connect"
            out["connect_s"] = round(time.perf_counter() - t0, 2)
            with HazardService(broker.url, hazard_dir(root / "cloud"), "svc-hazards", svc) as service:
                verifier = HazardVerifier([service.signer.public_bytes()])
                filters = [HazardFilter(verifier) for _ in range(vehicles)]
                watched: list[set[int]] = []
                for i in range(vehicles):
                    cells = filters[i].cells(i * spacing)
                    streams[i].watch_cells(ROAD, cells)
                    watched.append(set(cells))
                time.sleep(3.0)  # every subscription made
                out.update(_end_to_end(rng, events, vehicles, streams, filters, watched, service))
                out.update(_baseline(broker.url, svc, service, vehicles, streams, watched, out["_last"]))
                del out["_last"]
        finally:
            for s in streams:
                s.close()
            loop.close()
    out["ratio_p99_vs_baseline"] = (round(out["e2e_p99_ms"] / out["baseline_p99_ms"], 2)
                                    if out.get("e2e_p99_ms") and out.get("baseline_p99_ms") else None)
    return out


def _end_to_end(rng: random.Random, events: int, n: int, streams: list[VehicleStream], filters: list[HazardFilter],
                watched: list[set[int]], service: HazardService) -> dict[str, Any]:
    reporter = streams[-1]
    latencies: list[float] = []
    expected_total = received_total = outside = 0
    verdicts: dict[str, int] = {}
    last = None
    xs = [3000.0 + EVENT_STEP_M * k for k in range(events)]
    rng.shuffle(xs)
    for k, x in enumerate(xs):
        wall = time.time()
        reporter.publish(VehicleEvent(vehicle_id="reporter", seq=reporter.next_seq(), t_s=float(k), wall_ts=wall,
                                      road=ROAD, x_m=x, y_m=0.0, lane=1, speed_mps=28.0, kind="aeb_full",
                                      decel_mps2=9.0, detail={"gap_m": GAP_M, "lead_speed_mps": 0.0}))
        _wait(lambda: _row_at(service, x + GAP_M) is not None, 30)  # the service published it (and listed it)
        row = _row_at(service, x + GAP_M)
        assert row is not None, f"no hazard for the event at {x} m"
        seq, cells = row["action_id"]["sequence_number"], set(row["relevance"]["cells"])
        data = encode_hazard(Hazard.model_validate(row))  # the bytes the service published (ed25519 is deterministic)
        expected = {i for i in range(n) if watched[i] & cells}
        got: dict[int, float] = {}
        held: list[tuple[int, str, bytes, float]] = []

        def pump() -> bool:  # timing only: matching bytes is cheap, verifying is done after the clock stops
            for i in range(n):
                for subject, payload, at in streams[i].received():
                    held.append((i, subject, payload, at))
                    if payload == data:
                        got.setdefault(i, at)
            return expected <= set(got)

        _wait(pump, 60)
        time.sleep(0.2)
        pump()
        for i, subject, payload, at in held:  # every vehicle's own filter: signature, validity, replay
            verdict = filters[i].offer(subject, payload, at)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
        latencies += [(got[i] - wall) * 1e3 for i in expected if i in got]
        expected_total += len(expected)
        received_total += len(expected & set(got))
        outside += len(set(got) - expected)
        last = (seq, sorted(cells))
        time.sleep(0.1)
    return {"e2e_p50_ms": _pct(latencies, 50), "e2e_p99_ms": _pct(latencies, 99), "e2e_max_ms": _pct(latencies, 100),
            "expected": expected_total, "received": received_total, "outside": outside, "verdicts": verdicts,
            "_last": last}


def _row_at(service: HazardService, x_m: float) -> dict[str, Any] | None:
    return next((r for r in service.active_rows() if abs(r["x_m"] - x_m) < 1e-6), None)


def _baseline(url: str, svc: str, service: HazardService, n: int, streams: list[VehicleStream],
              watched: list[set[int]], last: tuple[int, list[int]] | None) -> dict[str, Any]:
    """The last hazard's bytes again, straight from a service connection to its cells: fan-out alone."""
    assert last is not None
    seq, cells = last
    rows = [r for r in service.active_rows() if r["action_id"]["sequence_number"] == seq]
    latencies: list[float] = []
    for k in range(10):
        hz = Hazard.model_validate(rows[0]).model_copy(update={"reference_time": time.time(), "sub_cause": k + 2})
        data = encode_hazard(service.signer.sign(hz))
        for s in streams:
            s.received()
        t0 = asyncio.run(_raw_publish(url, "svc-hazards", svc, data, tuple(cells)))
        expected = {i for i in range(n) if watched[i] & set(cells)}
        got: dict[int, float] = {}

        def pump() -> bool:
            for i in expected:
                for _, payload, at in streams[i].received():
                    if payload == data:
                        got.setdefault(i, at)
            return expected <= set(got)

        _wait(pump, 30)
        latencies += [(at - t0) * 1e3 for at in got.values()]
    return {"baseline_p50_ms": _pct(latencies, 50), "baseline_p99_ms": _pct(latencies, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vehicles", type=int, default=1000)
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.vehicles, args.events, args.seed)
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", load=os.getloadavg())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
