"""Per-vehicle ingest quotas: what one vehicle token may hold open and send.

A stolen or runaway vehicle token must not fill the staging disk or the uplink (50 open uploads of
64 MiB each used to be accepted). The rules, checked after authentication, per vehicle:

| quota | counts | checked | when full |
|---|---|---|---|
| ``max_open_uploads`` | the vehicle's open uploads | a *new* upload is declared | 429, ``Retry-After`` until its oldest open upload goes stale (at most ``max_retry_after_s``) |
| ``max_staged_bytes`` | declared sizes of its open uploads + the new one | a *new* upload is declared | as above |
| ``max_bytes_per_hour`` | body bytes received (a token bucket refilling continuously) | every chunk | 429, ``Retry-After`` until the bucket holds the chunk |
| ``stale_upload_s`` | time since an open upload last received bytes | on declarations, at most once per ``expiry_period_s`` | the upload expires: partial bytes deleted, state failed |

Resuming an upload the vehicle already holds is never refused (it is counted already), so a vehicle
at its limit can always finish what it started. The byte bucket admits a chunk when it holds the
chunk's declared length (1 byte when streamed without one) and is charged what actually arrived, so
concurrent chunks overshoot it by at most ``max_open_uploads`` chunks. Buckets live in memory: a
restarted server forgives the last hour. Decisions are functions of their inputs (``now_s`` passed in).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from driveloop.core.exceptions import ConfigError, QuotaExceededError

__all__ = ["ByteBudget", "OpenUpload", "QuotaConfig", "check_new_upload"]


@dataclass(frozen=True)
class QuotaConfig:
    """Per-vehicle limits; ``None`` switches one off (the embedded local cloud trusts its own vehicles)."""

    max_open_uploads: int | None = 4
    max_staged_bytes: int | None = 256 * 2**20  # four segments of the 64 MiB maximum
    max_bytes_per_hour: int | None = 2 * 2**30  # a vehicle records ~200 MB/h; 10x headroom for backlogs
    stale_upload_s: float | None = 86_400.0  # a vehicle silent for a day starts its upload over
    max_retry_after_s: int = 600

    def __post_init__(self) -> None:
        for name in ("max_open_uploads", "max_staged_bytes", "max_bytes_per_hour", "stale_upload_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"quota {name} must be > 0 or None, got {value}")
        if self.max_retry_after_s < 1:
            raise ConfigError(f"max_retry_after_s must be >= 1, got {self.max_retry_after_s}")

    @classmethod
    def unlimited(cls) -> QuotaConfig:
        return cls(None, None, None, None)

    @property
    def expiry_period_s(self) -> float:
        """How often declarations sweep for stale uploads: often enough to honour ``stale_upload_s``
        within a few percent, rarely enough to cost nothing."""
        return min(300.0, (self.stale_upload_s or math.inf) / 20)


@dataclass(frozen=True)
class OpenUpload:
    """What the quota needs of one of the vehicle's open uploads."""

    size: int
    updated_at_s: float


def _retry_after(quota: QuotaConfig, held: Sequence[OpenUpload], now_s: float) -> int:
    if quota.stale_upload_s is None or not held:
        return quota.max_retry_after_s
    frees_at = min(u.updated_at_s for u in held) + quota.stale_upload_s
    return int(min(max(1.0, math.ceil(frees_at - now_s)), quota.max_retry_after_s))


def check_new_upload(quota: QuotaConfig, held: Sequence[OpenUpload], size: int, now_s: float) -> None:
    """Raise QuotaExceededError if a vehicle holding ``held`` may not open one more upload of ``size``."""
    rules = (
        ("open uploads", quota.max_open_uploads, len(held) + 1),
        ("staged bytes", quota.max_staged_bytes, sum(u.size for u in held) + size),
    )
    for what, limit, wanted in rules:
        if limit is not None and wanted > limit:
            raise QuotaExceededError(f"quota of {limit} {what} per vehicle reached: finish or wait for "
                                     "open uploads", _retry_after(quota, held, now_s))


class ByteBudget:
    """Token buckets of body bytes, one per vehicle: capacity and refill are ``max_bytes_per_hour``."""

    def __init__(self, max_bytes_per_hour: int | None) -> None:
        self.capacity = max_bytes_per_hour
        self._buckets: dict[str, tuple[float, float]] = {}  # vehicle → (bytes available, at_s)
        self._lock = threading.Lock()

    def _level(self, vehicle: str, now_s: float) -> float:
        assert self.capacity is not None
        level, at_s = self._buckets.get(vehicle, (float(self.capacity), now_s))
        return min(float(self.capacity), level + max(0.0, now_s - at_s) * self.capacity / 3600.0)

    def admit(self, vehicle: str, want: int, now_s: float) -> None:
        """Raise QuotaExceededError unless the bucket holds ``want`` bytes (capped at its capacity)."""
        if self.capacity is None:
            return
        with self._lock:
            level = self._level(vehicle, now_s)
        need = min(max(want, 1), self.capacity)
        if level < need:
            wait = math.ceil((need - level) * 3600.0 / self.capacity)
            raise QuotaExceededError(f"quota of {self.capacity} bytes per hour per vehicle reached", wait)

    def charge(self, vehicle: str, received: int, now_s: float) -> None:
        """Take what arrived from the bucket (it may go below zero by the last chunk)."""
        if self.capacity is None or received <= 0:
            return
        with self._lock:
            self._buckets[vehicle] = (self._level(vehicle, now_s) - received, now_s)
