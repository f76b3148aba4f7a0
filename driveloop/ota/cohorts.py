"""Rollout cohorts from a stable hash of the vehicle id.

A vehicle's *position* is ``sha256(salt + vehicle_id)`` read as a number in [0, 1). A stage that
exposes fraction ``f`` of the fleet exposes exactly the vehicles with position < f, so cohorts are
nested: a vehicle in the 1 % canary stays in at 10 %, 50 % and 100 %, and growing a rollout never
swaps one vehicle for another. The same id always lands in the same place, on every server, in every
replay — no table of assignments has to be stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

from driveloop.core.exceptions import ConfigError

_SCALE = float(1 << 64)

__all__ = ["cohort_position", "in_cohort", "cohort_members", "cohort_sizes", "label"]


@lru_cache(maxsize=262_144)
def cohort_position(vehicle_id: str, salt: str = "") -> float:
    """Stable position of a vehicle in [0, 1): the first 8 bytes of sha256, big-endian, / 2**64."""
    if not vehicle_id:
        raise ConfigError("vehicle_id must be non-empty")
    digest = hashlib.sha256(f"{salt}{vehicle_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"cohort fraction must be in [0, 1], got {fraction}")


def in_cohort(vehicle_id: str, fraction: float, salt: str = "") -> bool:
    """True when the vehicle belongs to the first ``fraction`` of the fleet (1.0 → everyone)."""
    _check_fraction(fraction)
    return fraction >= 1.0 or cohort_position(vehicle_id, salt) < fraction


def cohort_members(vehicle_ids: Iterable[str], fraction: float, salt: str = "") -> list[str]:
    """The vehicles a stage of ``fraction`` exposes, in input order."""
    _check_fraction(fraction)
    return [v for v in vehicle_ids if fraction >= 1.0 or cohort_position(v, salt) < fraction]


def cohort_sizes(vehicle_ids: Iterable[str], fractions: Iterable[float], salt: str = "") -> dict[float, int]:
    """How many of ``vehicle_ids`` each fraction exposes (computed with one hash per vehicle)."""
    fracs = sorted(set(fractions))
    for f in fracs:
        _check_fraction(f)
    positions = [cohort_position(v, salt) for v in vehicle_ids]
    return {f: sum(1 for p in positions if f >= 1.0 or p < f) for f in fracs}


def label(in_treatment: bool, shadow: bool) -> str:
    """The cohort label used in metrics and the dashboard."""
    if not in_treatment:
        return "control"
    return "shadow" if shadow else "canary"
