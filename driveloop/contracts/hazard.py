"""Road hazards pushed to vehicles (DESIGN.md: Stream): a message shaped like an ETSI DENM, signed by the cloud.

A :class:`Hazard` carries what a DENM's management, situation and location containers carry, in SI units:
the action id (originating station + sequence number) that identifies one event through its updates, the
detection and reference times, the validity and repetition interval, the termination (``None`` for a live
event, ``"cancellation"``/``"negation"`` when it is over), the DENM cause and sub-cause codes, the event
position (road, ``x_m``, lane), the traffic direction it concerns, and the relevance area: the stretch
*upstream* of the event in the traffic direction (where a vehicle is still coming towards it), as an x range
and the road cells (``contracts.stream.CELL_M``) it covers — the cells the hazard is published on. The
advisory says what a vehicle inside the area should do: an advisory speed and/or time gap (it may only make a
vehicle more careful: ``safety/advisory.py``).

Rules it keeps:
- Frozen, unknown fields refused, every number bounded and finite, at most ``MAX_MESSAGE_BYTES`` on the wire;
  the relevance cells must be exactly the cells of its x range (a hazard cannot be addressed elsewhere).
- Signed with ed25519 over :meth:`Hazard.canonical_bytes` (sorted-key compact JSON of everything but the
  signature); ``key_id`` is the sha256 of the raw public key. :class:`HazardSigner` (cloud) and
  :class:`HazardVerifier` (vehicle) are the only two places that touch keys.
- :func:`decode_hazard` checks the subject too: a hazard read on ``haz.<road>.<cell>`` must be for that road
  and list that cell. Every failure is a :class:`StreamError`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from driveloop.contracts.stream import (
    CELL_M,
    HAZARD_MAX_VALIDITY_S,
    MAX_CELLS,
    MAX_MESSAGE_BYTES,
    MAX_POS_M,
    MAX_TIME_S,
    ROAD_PATTERN,
    cell_of,
    hazard_cells,
    hazard_subject,
)
from driveloop.core.exceptions import StreamError

__all__ = [
    "CAUSES",
    "ActionId",
    "Direction",
    "Hazard",
    "HazardAdvisory",
    "HazardSigner",
    "HazardVerifier",
    "RelevanceArea",
    "Termination",
    "decode_hazard",
    "encode_hazard",
    "key_id_of",
    "relevance_area",
]

# DENM cause codes (ETSI EN 302 637-3 / TS 102 894-2) that driveloop issues.
CAUSES: dict[str, int] = {
    "trafficCondition": 1,
    "hazardousLocation-SurfaceCondition": 9,
    "adverseWeatherCondition-Visibility": 18,
    "dangerousEndOfQueue": 27,
    "stationaryVehicle": 94,
    "collisionRisk": 97,
}
STATION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_SEQUENCE = 2**32 - 1
MIN_REPETITION_S = 0.1
MAX_REPETITION_S = 60.0
MAX_AREA_M = MAX_CELLS * CELL_M / 4  # a relevance area spans at most a quarter of what a vehicle may watch

Direction = Literal["increasing", "decreasing"]  # the traffic direction along the road's x the hazard concerns
Termination = Literal["cancellation", "negation"]

_Time = Annotated[float, Field(ge=0.0, le=MAX_TIME_S, allow_inf_nan=False)]
_Pos = Annotated[float, Field(ge=-MAX_POS_M, le=MAX_POS_M, allow_inf_nan=False)]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActionId(_Wire):
    """One event through all its updates: the station that originates the DENM + its sequence number."""

    station_id: str = Field(pattern=STATION_PATTERN)
    sequence_number: int = Field(ge=0, le=MAX_SEQUENCE)


class RelevanceArea(_Wire):
    """Where a vehicle must hear of the hazard: ``from_x_m``..``to_x_m`` of ``road`` and the cells covering it."""

    road: str = Field(pattern=ROAD_PATTERN)
    from_x_m: _Pos
    to_x_m: _Pos
    cells: tuple[int, ...] = Field(min_length=1, max_length=MAX_CELLS)

    @model_validator(mode="after")
    def _consistent(self) -> RelevanceArea:
        if not self.from_x_m < self.to_x_m or self.to_x_m - self.from_x_m > MAX_AREA_M:
            raise ValueError(f"relevance area must run forward and span at most {MAX_AREA_M:g} m")
        if self.cells != tuple(range(cell_of(self.from_x_m), cell_of(self.to_x_m) + 1)):
            raise ValueError("relevance cells must be exactly the cells of its x range")
        return self

    def contains(self, x_m: float) -> bool:
        return self.from_x_m <= x_m <= self.to_x_m


class HazardAdvisory(_Wire):
    """What a vehicle in the relevance area should do before the event: drive at most ``speed_mps``, keep at
    least ``time_gap_s``."""

    speed_mps: float | None = Field(default=None, ge=0.0, le=70.0, allow_inf_nan=False)
    time_gap_s: float | None = Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something(self) -> HazardAdvisory:
        if self.speed_mps is None and self.time_gap_s is None:
            raise ValueError("an advisory needs a speed, a time gap or both")
        return self


class Hazard(_Wire):
    """A DENM-shaped, signed road hazard (see the module docstring)."""

    action_id: ActionId
    detection_time: _Time  # Unix s: when the event was detected (the first vehicle event behind it)
    reference_time: _Time  # Unix s: when this version was issued (updates and terminations advance it)
    validity_s: float = Field(gt=0.0, le=HAZARD_MAX_VALIDITY_S, allow_inf_nan=False)  # from reference_time
    repetition_interval_s: float | None = Field(default=None, ge=MIN_REPETITION_S, le=MAX_REPETITION_S,
                                                allow_inf_nan=False)
    termination: Termination | None = None
    cause: int = Field(ge=0, le=255)
    sub_cause: int = Field(default=0, ge=0, le=255)
    road: str = Field(pattern=ROAD_PATTERN)
    x_m: _Pos
    lane: int | None = Field(default=None, ge=-1, le=63)
    direction: Direction = "increasing"
    relevance: RelevanceArea
    advisory: HazardAdvisory
    key_id: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    signature: str = Field(default="", max_length=128)  # base64 of the 64-byte ed25519 signature

    @model_validator(mode="after")
    def _consistent(self) -> Hazard:
        if self.reference_time < self.detection_time:
            raise ValueError("reference_time cannot precede detection_time")
        if self.relevance.road != self.road:
            raise ValueError("relevance area must be on the hazard's road")
        if not self.relevance.contains(self.x_m):
            raise ValueError("the event must lie inside its relevance area")
        return self

    def canonical_bytes(self) -> bytes:
        """What is signed: every field but the signature, as sorted-key compact JSON (one byte string per hazard)."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def expires_at(self) -> float:
        return self.reference_time + self.validity_s

    def live(self, now_wall_s: float) -> bool:
        """Not terminated and still within its validity at ``now_wall_s``."""
        return self.termination is None and now_wall_s < self.expires_at()

    def upstream_distance_m(self, x_m: float) -> float | None:
        """How far ahead of a vehicle at ``x_m`` (driving in ``direction``) the event lies; None when the vehicle
        is outside the relevance area or already past the event."""
        if not self.relevance.contains(x_m):
            return None
        ahead = self.x_m - x_m if self.direction == "increasing" else x_m - self.x_m
        return ahead if ahead >= 0.0 else None


def relevance_area(road: str, x_m: float, direction: Direction, upstream_m: float, downstream_m: float) -> RelevanceArea:
    """The area of an event at ``x_m``: ``upstream_m`` before it in the traffic direction, ``downstream_m`` after."""
    if not (math.isfinite(upstream_m) and math.isfinite(downstream_m) and upstream_m >= 0 and downstream_m >= 0):
        raise StreamError("relevance distances must be finite and >= 0")
    lo, hi = (x_m - upstream_m, x_m + downstream_m) if direction == "increasing" else (x_m - downstream_m,
                                                                                       x_m + upstream_m)
    return RelevanceArea(road=road, from_x_m=lo, to_x_m=hi, cells=tuple(range(cell_of(lo), cell_of(hi) + 1)))


# -- signing --------------------------------------------------------------------------------------------------------
def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: how a hazard names the key that signed it."""
    return hashlib.sha256(_raw_public(key)).hexdigest()


class HazardSigner:
    """The cloud's side: signs hazards with its ed25519 key (``cloud.hazards`` keeps the key on disk)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    def public_bytes(self) -> bytes:
        """The raw public key a vehicle is given (32 bytes)."""
        return _raw_public(self.public_key)

    def sign(self, hazard: Hazard) -> Hazard:
        """The hazard with this key's id and signature (any earlier signature replaced)."""
        unsigned = hazard.model_copy(update={"key_id": self.key_id, "signature": ""})
        signature = self._key.sign(unsigned.canonical_bytes())
        return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


class HazardVerifier:
    """The vehicle's side: the cloud's public key(s) it trusts; ``verify`` says whether a hazard is theirs."""

    def __init__(self, public_keys: list[bytes]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for raw in public_keys:
            try:
                key = Ed25519PublicKey.from_public_bytes(bytes(raw))
            except ValueError as e:
                raise StreamError(f"not an ed25519 public key ({len(raw)} bytes): {e}") from e
            self._keys[key_id_of(key)] = key
        if not self._keys:
            raise StreamError("a hazard verifier needs at least one trusted key")

    def verify(self, hazard: Hazard) -> bool:
        """True only for a hazard signed by a trusted key over exactly its canonical bytes."""
        key = self._keys.get(hazard.key_id)
        if key is None or not hazard.signature:
            return False
        try:
            signature = base64.b64decode(hazard.signature, validate=True)
            key.verify(signature, hazard.canonical_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True


# -- wire -----------------------------------------------------------------------------------------------------------
def encode_hazard(hazard: Hazard) -> bytes:
    """Compact JSON; StreamError beyond ``MAX_MESSAGE_BYTES``."""
    data = hazard.model_dump_json().encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise StreamError(f"hazard of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode_hazard(data: bytes, subject: str | None = None) -> Hazard:
    """Parse and validate a hazard; with ``subject`` (``haz.<road>.<cell>``) it must be addressed there: one
    of the cells it is published on (``hazard_cells``: its area and the watch horizon before it)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StreamError("hazard payload must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise StreamError(f"hazard of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        hazard = Hazard.model_validate_json(bytes(data))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise StreamError(f"malformed hazard: {where}: {first.get('msg', 'invalid')}"[:300]) from None
    if subject is not None and subject not in {hazard_subject(hazard.road, c)
                                               for c in hazard_cells(hazard.relevance.cells, hazard.direction)}:
        raise StreamError(f"hazard on {subject!r:.100} is not addressed to that cell")
    return hazard
