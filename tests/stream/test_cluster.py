"""A 3-node JetStream cluster on loopback, R3 streams: kill -9 of one node mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats

from driveloop.cloud.broker import Cluster
from driveloop.cloud.stream_sinks import replay_vehicle
from driveloop.edge.stream_client import VehicleStream
from tests.stream.conftest import ensure, pid_alive, tel


def test_r3_stream_survives_a_killed_node(tmp_path: Path) -> None:
    with Cluster(tmp_path / "cluster", size=3) as cluster:
        url = ",".join(cluster.urls)
        ensure(url, replicas=3)
        vs = VehicleStream("v1", url, tmp_path / "spool", ack_timeout_s=2.0)
        victim = cluster.nodes[0]
        try:
            total = 1200
            for i in range(total):
                vs.publish(tel("v1", vs.next_seq()))
                if i == 400:
                    pid = victim.pid
                    victim.kill()  # kill -9 of one node (possibly the one the vehicle is connected to)
                    assert pid is not None and not pid_alive(pid)
                if i % 40 == 0:
                    time.sleep(0.02)
            assert vs.flush(120), vs.stats()
        finally:
            vs.close()

        async def stored() -> tuple[list[int], int]:
            nc = await nats.connect([n.url for n in cluster.nodes[1:]])
            js = nc.jetstream()
            seqs = [m.seq for m in await replay_vehicle(js, "v1", 0.0)]
            replicas = (await js.stream_info("TELEMETRY")).config.num_replicas
            await nc.close()
            return seqs, replicas

        for node in cluster.nodes[1:]:
            node.wait_ready()  # the survivors agree on a meta leader again
        for attempt in range(10):  # consumer creation may time out while stream leaders move
            try:
                seqs, replicas = asyncio.run(stored())
                break
            except nats.errors.TimeoutError:
                time.sleep(1.0)
        else:
            raise AssertionError("the surviving nodes never answered")
        assert replicas == 3
        assert sorted(seqs) == list(range(total)) and len(seqs) == total  # nothing lost, nothing twice
    for node in cluster.nodes:
        assert not node.running()
