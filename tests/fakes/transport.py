"""Upload-side fakes and fixtures: an in-memory UploadTransport with injectable failures, a real
HttpTransport that drops its connection mid-chunk on cue, and real segments to upload.

``FakeTransport`` keeps the protocol's rules (offsets, sha256 check on the last byte, ``exists`` for
known bytes) so uploader tests exercise the same decisions as against the server, without one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import numpy as np

from driveloop.edge.recorder import Recorder
from driveloop.contracts.segment import TickRecord
from driveloop.edge.spool import Spool
from driveloop.contracts.upload import OFFSET_HEADER, UploadStatus
from driveloop.edge.transport import HttpTransport
from driveloop.core.exceptions import UploadError, UploadRejectedError


class InjectedDrop(Exception):
    """Raised inside a request body to abort the connection mid-chunk."""


def synthetic_tick(i: int, rng: np.random.Generator, dt_s: float = 0.1, fallback: bool = False) -> TickRecord:
    """One plausible tick: random sensors (so segments do not compress to nothing), a model action."""
    occupancy = (rng.random((16, 32)) < 0.1).astype(np.float32)
    speeds = rng.normal(0.0, 3.0, (16, 32)).astype(np.float32) * occupancy
    return TickRecord(
        t_s=round(i * dt_s, 6), tick=i,
        kinematics=rng.normal(0.0, 5.0, 36).astype(np.float32),
        lidar=np.stack([rng.uniform(0.0, 80.0, 32), rng.normal(0.0, 2.0, 32)]).astype(np.float32),
        grid=np.stack([occupancy, speeds]),
        model_action=[float(rng.normal(0, 1)), float(rng.normal(0, 0.05))], model_confidence=0.9,
        model_latency_ms=2.0, model_valid=True,
        applied_accel_mps2=-6.0 if fallback else 0.5, applied_steering_rad=0.0,
        source="fallback" if fallback else "model", activation=fallback, ttc_s=1.0 if fallback else None,
        state={"speed_mps": 25.0, "crashed": False}, expert_action=[0.0, 0.0],
    )  # fmt: skip


def record_synthetic_segments(spool: Spool, vehicle: str, n_segments: int, ticks_per_segment: int = 20,
                              seed: int = 0, event_segments: tuple[int, ...] = ()) -> list[Path]:
    """Record ``n_segments`` real MCAP segments into ``spool`` with the real Recorder; the segments
    whose index is in ``event_segments`` contain a fallback activation (an event segment). Returns
    the vehicle's closed segment paths, oldest first."""
    rng = np.random.default_rng(seed)
    dt_s = 0.1
    rec = Recorder(spool, vehicle, scenario="highway", seed=seed, model_version="1",
                   segment_max_s=ticks_per_segment * dt_s)
    with rec:
        for i in range(n_segments * ticks_per_segment):
            seg = i // ticks_per_segment
            rec.record(synthetic_tick(i, rng, dt_s, fallback=seg in event_segments and i % ticks_per_segment == 5))
    mine = [e for e in spool.closed_segments() if e.vehicle == vehicle]  # paths now (after promotions)
    return [e.path for e in sorted(mine, key=lambda e: e.opened_ns)]


@dataclass
class _FakeUpload:
    id: str
    sha256: str
    size: int
    data: bytearray = field(default_factory=bytearray)
    state: str = "open"


class FakeTransport:
    """In-memory cloud. Failure injection: ``fail_calls`` (the next N calls raise UploadError before
    reaching the "server"), ``cut_at`` (cumulative byte positions at which a chunk is cut: the prefix
    arrives, then the call raises UploadError), ``reject`` (sha256 → HTTP status refused on start)."""

    def __init__(self, cut_at: list[int] | None = None) -> None:
        self.uploads: dict[str, _FakeUpload] = {}
        self.cataloged: dict[str, bytes] = {}
        self.cut_at = sorted(cut_at or [])
        self.fail_calls = 0
        self.reject: dict[str, int] = {}
        self.bytes_received = 0
        self.bytes_offered = 0
        self.calls: list[str] = []
        self.campaign_list: list[dict[str, Any]] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_calls > 0:
            self.fail_calls -= 1
            raise UploadError(f"injected failure in {name}")

    def _status(self, up: _FakeUpload) -> UploadStatus:
        return UploadStatus(up.id, up.sha256, up.size, len(up.data), up.state, cataloged=up.state == "done")

    def start(self, sha256: str, size: int, name: str) -> UploadStatus:
        self._call("start")
        if sha256 in self.reject:
            raise UploadRejectedError(f"injected refusal of {name}", status=self.reject[sha256])
        if sha256 in self.cataloged:
            return UploadStatus(None, sha256, size, size, "exists", cataloged=True)
        for up in self.uploads.values():
            if up.sha256 == sha256 and up.state == "open":
                return self._status(up)
        up = _FakeUpload(uuid.uuid4().hex, sha256, size)
        self.uploads[up.id] = up
        return self._status(up)

    def offset(self, upload_id: str) -> UploadStatus:
        self._call("offset")
        if upload_id not in self.uploads:
            raise UploadRejectedError(f"unknown upload {upload_id}", status=404)
        return self._status(self.uploads[upload_id])

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus:
        self._call("send_chunk")
        up = self.uploads.get(upload_id)
        if up is None:
            raise UploadRejectedError(f"unknown upload {upload_id}", status=404)
        if up.state == "done":
            return self._status(up)
        if offset != len(up.data):
            raise UploadRejectedError("offset conflict", status=409, offset=len(up.data))
        cut = next((p for p in self.cut_at if self.bytes_offered <= p < self.bytes_offered + len(data)), None)
        if cut is not None:
            self.cut_at.remove(cut)
            data = data[: cut - self.bytes_offered]
        self.bytes_offered += len(data)
        self.bytes_received += len(data)
        up.data += data
        if cut is not None:
            raise UploadError("injected connection drop mid-chunk")
        if len(up.data) == up.size:
            if hashlib.sha256(up.data).hexdigest() != up.sha256:
                up.state = "failed"
                raise UploadRejectedError("sha256 mismatch", status=422)
            up.state = "done"
            self.cataloged[up.sha256] = bytes(up.data)
        return self._status(up)

    def campaigns(self) -> list[dict[str, Any]]:
        self._call("campaigns")
        return list(self.campaign_list)

    def close(self) -> None:
        pass


class FlakyHttpTransport(HttpTransport):
    """The real HTTP transport, but at each position of ``cut_at`` (cumulative bytes handed to
    send_chunk) the request body is cut: the prefix really goes over the socket, then the connection
    is aborted mid-body and UploadError is raised, as a dropped link would."""

    def __init__(self, base_url: str, token: str, cut_at: list[int]) -> None:
        super().__init__(base_url, token)
        self.cut_at = sorted(cut_at)
        self.bytes_offered = 0
        self.interruptions = 0

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus:
        start = self.bytes_offered
        cut = next((p for p in self.cut_at if start <= p < start + len(data)), None)
        if cut is None:
            self.bytes_offered += len(data)
            return super().send_chunk(upload_id, offset, data)
        self.cut_at.remove(cut)
        prefix = data[: cut - start]
        self.bytes_offered += len(prefix)

        def body() -> Iterator[bytes]:
            if prefix:
                yield prefix
            self._drop()

        try:
            self._client.request("PATCH", f"{self._base}/v1/uploads/{upload_id}", content=body(),
                                 headers={**self._headers, OFFSET_HEADER: str(offset)})
        except (InjectedDrop, httpx.TransportError):
            pass
        self.interruptions += 1
        raise UploadError(f"injected connection drop after {len(prefix)} bytes of a chunk")

    def _drop(self) -> NoReturn:
        """How the link goes down at a cut, once the prefix is on the socket."""
        raise InjectedDrop


class DyingHttpTransport(FlakyHttpTransport):
    """The uploader's process is SIGKILLed mid-chunk, once ``kill_at`` bytes were handed to send_chunk
    and the prefix of that chunk is on the socket: a crash at one exact byte, not whenever a poll lands."""

    def __init__(self, base_url: str, token: str, kill_at: int) -> None:
        super().__init__(base_url, token, [kill_at])

    def _drop(self) -> NoReturn:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL is delivered before kill() returns")
