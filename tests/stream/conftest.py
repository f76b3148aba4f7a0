"""Real nats-server processes on loopback ports for the stream tests, each stopped by its pid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from driveloop.cloud.broker import Credentials, EmbeddedBroker, ensure_streams
from driveloop.contracts.stream import Telemetry, VehicleEvent


def tel(vid: str, seq: int, x_m: float = 0.0) -> Telemetry:
    return Telemetry(vehicle_id=vid, seq=seq, t_s=seq * 0.1, wall_ts=time.time(), x_m=x_m, y_m=0.0, lane=1,
                     speed_mps=30.0, accel_mps2=0.0, mode="model")


def evt(vid: str, seq: int, kind: str = "aeb", t_s: float | None = None) -> VehicleEvent:
    return VehicleEvent(vehicle_id=vid, seq=seq, t_s=seq * 0.1 if t_s is None else t_s, wall_ts=time.time(),
                        x_m=100.0, y_m=0.0, lane=1, speed_mps=20.0, kind=kind, decel_mps2=6.0)


async def _ensure(url: str, user: str | None = None, password: str | None = None, replicas: int = 1,
                  dedup_s: float | None = None) -> None:
    import nats

    from driveloop.contracts.stream import STREAMS

    nc = await nats.connect(url.split(","), user=user, password=password)
    specs = STREAMS if dedup_s is None else {k: v.model_copy(update={"duplicate_window_s": dedup_s})
                                            for k, v in STREAMS.items()}
    await ensure_streams(nc.jetstream(), replicas=replicas, specs=specs)
    await nc.close()


def ensure(url: str, **kw: object) -> None:
    asyncio.run(_ensure(url, **kw))  # type: ignore[arg-type]


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """An embedded broker without users, streams created."""
    b = EmbeddedBroker.embedded(tmp_path / "nats")
    try:
        b.start()
        ensure(b.url)
        yield b
    finally:
        b.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, dict[str, str], str]]:
    """A broker with vehicles v1, v.2 and a service user: (broker, vehicle passwords, service password)."""
    creds = Credentials(tmp_path / "nats")
    passwords = creds.issue_vehicles(["v1", "v.2"])
    service = creds.issue_service("test")
    creds.save()
    b = EmbeddedBroker.embedded(tmp_path / "nats", creds.users)
    try:
        b.start()
        ensure(b.url, user="svc-test", password=service)
        yield b, passwords, service
    finally:
        b.stop()
