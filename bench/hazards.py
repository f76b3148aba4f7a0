"""Hazard bench (issue 16): a vehicle's event → the hazard service → every vehicle whose road ahead is in the
relevance area, none outside, with N subscribed vehicles; against a baseline in the same run.

    python bench/hazards.py [--vehicles 1000] [--events 30] [--processes 2] [--warmup 1] [--json]

Setup: the embedded nats-server with per-vehicle credentials, the hazard service (signing key, durable consumers),
``--vehicles`` VehicleStream connections sharded over ``--processes`` client processes (``driveloop._stream_bench``'s
shards, one StreamLoop thread each: one Python thread cannot serve a thousand vehicles' subscriptions, and a real
fleet has one client per vehicle), vehicle i at x = i x spacing on road hw1, each subscribed to the cell it is in
(as a driving vehicle: the service publishes each hazard on its relevance cells and the ``edge.hazards.HORIZON_M``
before them, ``contracts.stream.hazard_cells``). Then ``--events`` times, a reporting vehicle publishes a
full-AEB event (a standing lead 80 m ahead) at a random x; end to end = the event's wall time → the moment each
vehicle's client hands the signed hazard over (stamped by the client's loop in the vehicle's process). After the
clock stops, every receipt goes through its vehicle's own HazardFilter (signature, validity, replay: ``verdicts``).
``expected`` = the vehicles whose road ahead (their cell through ``HORIZON_M`` further) meets the hazard's
relevance cells, worked out apart from the publication rule; ``outside`` counts receipts by any other vehicle
(must be 0). ``server_msgs_out_per_hazard``: messages the nats-server sent out per measured hazard (its ``varz``
``out_msgs``; every copy on the wire, what the clients then parse), against ``expected_per_hazard``.
Baseline: the last hazard re-signed under new action numbers, published straight on the service's cells by a service
connection (no event, no service in the path): publish → receive at the same vehicles. ``ratio`` = end-to-end p99
/ baseline p99. ``--warmup`` events (1) go first and are reported apart (``warmup_*``): the first hazard after
the service and the vehicles' clients started pays one-time costs; ``e2e_*`` is the steady state. Every process
freezes its start-up heap once it serves (``core.heap``), as ``driveloop drive --hazards on`` does: a full garbage
collection walking 500 connections' objects stopped a client process 100-415 ms, on the first events.
Run from the repository root with ``PYTHONPATH=.``.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats

from driveloop._stream_bench import hazard_delivery, run_fleet, shard_plans, vehicle_ids
from driveloop.cloud.broker import Credentials, EmbeddedBroker, ensure_streams
from driveloop.cloud.hazard_service import HazardService, hazard_dir
from driveloop.contracts.hazard import ActionId, Hazard, encode_hazard
from driveloop.contracts.stream import VehicleEvent, hazard_cells, hazard_subject
from driveloop.core.heap import freeze_long_lived
from driveloop.edge.stream_client import VehicleStream

SPACING_M = 20.0  # 1,000 vehicles over 20 km of road (more when the events need it)
EVENT_STEP_M = 400.0  # events this far apart: each its own action (the service merges within 300 m)
GAP_M = 80.0  # the standing lead each event reports: the hazard's position is the event's x + this
EVENT_GAP_S = 0.3  # between events: each hazard's fan-out is over before the next event (none overlap)
BASELINE_SEQ = 1_000_000  # baseline hazards' action numbers: apart from the service's
ROAD = "hw1"
PREFIX = "b"

Sent = list[tuple[int, float, tuple[int, ...]]]  # (action sequence number, start wall time, relevance cells)


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


def run(vehicles: int, events: int, seed: int, processes: int = 2, warmup: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="hazard-bench-"))
    spacing = max(SPACING_M, (3500.0 + EVENT_STEP_M * (events + warmup)) / vehicles)
    creds = Credentials(root / "nats")
    passwords = creds.issue_vehicles([*vehicle_ids(PREFIX, 0, vehicles), "reporter"])
    svc = creds.issue_service("hazards")
    creds.save()
    out: dict[str, Any] = {"vehicles": vehicles, "events": events, "warmup_events": warmup, "processes": processes,
                           "spacing_m": spacing}
    with EmbeddedBroker.embedded(root / "nats", creds.users) as broker:
        async def setup() -> None:
            nc = await nats.connect(broker.url, user="svc-hazards", password=svc)
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(setup())
        with HazardService(broker.url, hazard_dir(root / "cloud"), "svc-hazards", svc) as service:
            reporter = VehicleStream("reporter", broker.url, root / "spool", user="reporter",
                                     password=passwords["reporter"])
            try:
                assert _wait(reporter.connected, 60), "the reporting vehicle did not connect"
                plans = [replace(p, passwords={v: passwords[v] for v in p.ids()})
                         for p in shard_plans(broker.url, vehicles, processes, root / "spool", hazards=True,
                                              prefix=PREFIX, spacing_m=spacing, road=ROAD,
                                              trusted_keys=(service.signer.public_bytes(),))]
                e2e: Sent = []
                base: Sent = []

                warm: Sent = []
                wire: list[int] = []  # the server's out_msgs before and after the measured events

                def publish() -> None:  # every shard's vehicles watch their cells now
                    freeze_long_lived()  # the service's process, started, as `drive --hazards on` does (core.heap)
                    sent = _events(rng, events, reporter, service, warmup,
                                   mark=lambda: wire.append(broker.monitor("varz")["out_msgs"]))
                    wire.append(broker.monitor("varz")["out_msgs"])
                    warm.extend(sent[:warmup])
                    e2e.extend(sent[warmup:])
                    base.extend(_baseline(broker.url, svc, service, e2e[-1][0]))

                shards = run_fleet(plans, publish)
            finally:
                reporter.close()
    verdicts: dict[str, int] = {}
    for r in shards:
        for k, v in r["verdicts"].items():
            verdicts[k] = verdicts.get(k, 0) + v
    out.update({f"e2e_{k}": v for k, v in hazard_delivery(shards, e2e).items()})
    out.update({f"baseline_{k}": v for k, v in hazard_delivery(shards, base).items()})
    out.update({f"warmup_{k}": v for k, v in hazard_delivery(shards, warm).items()})
    # the slowest events' last receipt: one slow event (a stall of the service or a client) vs a slow fan-out
    per_event = [(round(hazard_delivery(shards, [ev])["max_ms"] or 0.0, 1), k) for k, ev in enumerate(e2e)]
    out["e2e_slowest_events"] = [{"event": k, "max_ms": ms} for ms, k in sorted(per_event, reverse=True)[:5]]
    out["verdicts"] = verdicts
    if len(wire) == 2 and e2e:
        out["server_msgs_out_per_hazard"] = round((wire[1] - wire[0]) / len(e2e), 1)
        out["expected_per_hazard"] = round(out["e2e_expected"] / len(e2e), 1)
    out["ratio_p99_vs_baseline"] = (round(out["e2e_p99_ms"] / out["baseline_p99_ms"], 2)
                                    if out.get("e2e_p99_ms") and out.get("baseline_p99_ms") else None)
    return out


def _events(rng: random.Random, events: int, reporter: VehicleStream, service: HazardService, warmup: int = 0,
            mark: Any = None) -> Sent:
    """``warmup`` + ``events`` full-AEB events from the reporting vehicle, one at a time: (the hazard's action
    number, the event's wall time, its relevance cells) each, once the service has published it. The first
    ``warmup`` go first, on the road beyond the others: the first hazard after the service and the vehicles
    started pays one-time costs (first signature, first decode and dispatch on each connection), which the
    caller reports apart from the steady state. ``mark()`` is called once the warm-up events are out."""
    sent: Sent = []
    xs = [3000.0 + EVENT_STEP_M * k for k in range(events + warmup)]
    warm, xs = xs[events:], xs[:events]
    rng.shuffle(xs)
    for k, x in enumerate(warm + xs):
        if k == len(warm) and mark is not None:
            mark()
        wall = time.time()
        reporter.publish(VehicleEvent(vehicle_id="reporter", seq=reporter.next_seq(), t_s=float(k), wall_ts=wall,
                                      road=ROAD, x_m=x, y_m=0.0, lane=1, speed_mps=28.0, kind="aeb_full",
                                      decel_mps2=9.0, detail={"gap_m": GAP_M, "lead_speed_mps": 0.0}))
        _wait(lambda x=x: _row_at(service, x + GAP_M) is not None, 30)  # the service published it (and listed it)
        row = _row_at(service, x + GAP_M)
        assert row is not None, f"no hazard for the event at {x} m"
        sent.append((row["action_id"]["sequence_number"], wall, tuple(row["relevance"]["cells"])))
        time.sleep(EVENT_GAP_S)
    return sent


def _row_at(service: HazardService, x_m: float) -> dict[str, Any] | None:
    return next((r for r in service.active_rows() if abs(r["x_m"] - x_m) < 1e-6), None)


def _baseline(url: str, svc: str, service: HazardService, seq: int, count: int = 10) -> Sent:
    """Hazard ``seq`` re-signed under new action numbers, straight from a service connection to its cells:
    the fan-out alone."""
    row = next(r for r in service.active_rows() if r["action_id"]["sequence_number"] == seq)
    template = Hazard.model_validate(row)
    sent: Sent = []
    for k in range(count):
        action = ActionId(station_id=template.action_id.station_id, sequence_number=BASELINE_SEQ + k)
        hz = template.model_copy(update={"action_id": action, "reference_time": time.time()})
        data = encode_hazard(service.signer.sign(hz))
        cells = tuple(template.relevance.cells)
        on = hazard_cells(cells, template.direction)  # where the service publishes it
        sent.append((BASELINE_SEQ + k, asyncio.run(_raw_publish(url, "svc-hazards", svc, data, on)), cells))
        time.sleep(EVENT_GAP_S)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vehicles", type=int, default=1000)
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=2, help="client processes the subscribed vehicles are sharded over")
    ap.add_argument("--warmup", type=int, default=1,
                    help="events sent first and reported apart (warmup_*): the first hazard after a start")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.vehicles, args.events, args.seed, args.processes, args.warmup)
    result.update(machine=f"{platform.machine()} {os.cpu_count()} cores", load=os.getloadavg())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
