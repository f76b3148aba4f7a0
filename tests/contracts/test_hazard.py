"""The hazard contract: DENM-shaped fields validated, relevance cells exact, signatures over canonical bytes."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.contracts.hazard import (
    CAUSES,
    ActionId,
    Hazard,
    HazardAdvisory,
    HazardSigner,
    HazardVerifier,
    RelevanceArea,
    decode_hazard,
    encode_hazard,
    key_id_of,
    relevance_area,
)
from driveloop.contracts.stream import CELL_M, MAX_MESSAGE_BYTES, WATCH_CELLS, cell_of
from driveloop.core.exceptions import StreamError

NOW = 1_800_000_000.0


def hazard(**kw: object) -> Hazard:
    fields: dict[str, object] = dict(
        action_id=ActionId(station_id="driveloop-cloud", sequence_number=7), detection_time=NOW - 1.0,
        reference_time=NOW, validity_s=600.0, repetition_interval_s=1.0, cause=CAUSES["dangerousEndOfQueue"],
        sub_cause=1, road="hw1", x_m=6000.0, lane=1, relevance=relevance_area("hw1", 6000.0, "increasing", 2000.0, 100.0),
        advisory=HazardAdvisory(speed_mps=13.9, time_gap_s=3.0))
    fields.update(kw)
    return Hazard(**fields)  # type: ignore[arg-type]


SIGNER = HazardSigner(Ed25519PrivateKey.generate())


def test_relevance_area_runs_upstream_of_the_event_and_names_its_cells() -> None:
    inc = relevance_area("hw1", 6000.0, "increasing", 2000.0, 100.0)
    assert (inc.from_x_m, inc.to_x_m) == (4000.0, 6100.0)
    assert inc.cells == tuple(range(cell_of(4000.0), cell_of(6100.0) + 1)) == tuple(range(16, 25))
    dec = relevance_area("hw1", 6000.0, "decreasing", 2000.0, 100.0)
    assert (dec.from_x_m, dec.to_x_m) == (5900.0, 8000.0)
    assert dec.cells[0] == cell_of(5900.0) and dec.cells[-1] == cell_of(8000.0)
    with pytest.raises(StreamError):
        relevance_area("hw1", 0.0, "increasing", -1.0, 0.0)


BAD_AREAS = [
    ("backwards", {"from_x_m": 100.0, "to_x_m": 50.0, "cells": (0,)}),
    ("a cell missing", {"from_x_m": 0.0, "to_x_m": 2 * CELL_M + 1, "cells": (0, 1)}),
    ("a foreign cell", {"from_x_m": 0.0, "to_x_m": 10.0, "cells": (0, 9)}),
    ("no cells", {"from_x_m": 0.0, "to_x_m": 10.0, "cells": ()}),
    ("too long", {"from_x_m": 0.0, "to_x_m": 30_000.0, "cells": tuple(range(0, 121))}),
]


@pytest.mark.parametrize(("name", "kw"), BAD_AREAS, ids=[b[0] for b in BAD_AREAS])
def test_a_relevance_area_that_does_not_add_up_is_refused(name: str, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RelevanceArea(road="hw1", **kw)  # type: ignore[arg-type]


BAD_HAZARDS = [
    ("extra field", {"bogus": 1}),
    ("validity beyond the stream's age", {"validity_s": 901.0}),
    ("zero validity", {"validity_s": 0.0}),
    ("nan position", {"x_m": float("nan")}),
    ("event outside its area", {"x_m": 9000.0}),
    ("area on another road", {"relevance": relevance_area("hw2", 6000.0, "increasing", 2000.0, 100.0)}),
    ("reference before detection", {"reference_time": NOW - 10.0}),
    ("unknown termination", {"termination": "maybe"}),
    ("cause beyond a byte", {"cause": 256}),
    ("repetition too fast", {"repetition_interval_s": 0.01}),
    ("bad station", {"action_id": {"station_id": "../x", "sequence_number": 1}}),
    ("bad key id", {"key_id": "abc"}),
    ("road with a dot", {"road": "hw.1"}),
]


@pytest.mark.parametrize(("name", "kw"), BAD_HAZARDS, ids=[b[0] for b in BAD_HAZARDS])
def test_a_malformed_hazard_is_refused(name: str, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        hazard(**kw)


def test_an_advisory_needs_something_to_advise() -> None:
    with pytest.raises(ValueError, match="speed, a time gap or both"):
        HazardAdvisory()
    with pytest.raises(ValueError):
        HazardAdvisory(speed_mps=-1.0)


def test_signing_round_trip_and_what_breaks_a_signature() -> None:
    signed = SIGNER.sign(hazard())
    assert signed.key_id == key_id_of(SIGNER.public_key) == SIGNER.key_id
    verifier = HazardVerifier([SIGNER.public_bytes()])
    assert verifier.verify(signed)
    assert not verifier.verify(hazard())  # unsigned
    assert not verifier.verify(signed.model_copy(update={"x_m": 5999.0}))  # a field changed after signing
    assert not verifier.verify(signed.model_copy(update={"termination": "cancellation"}))
    forged = HazardSigner(Ed25519PrivateKey.generate()).sign(hazard())
    assert not verifier.verify(forged)  # another key
    assert not verifier.verify(forged.model_copy(update={"key_id": SIGNER.key_id}))  # claiming our key id
    assert not verifier.verify(signed.model_copy(update={"signature": "not base64!"}))
    assert not verifier.verify(signed.model_copy(update={"signature": base64.b64encode(b"x" * 64).decode()}))


def test_canonical_bytes_are_sorted_compact_and_leave_the_signature_out() -> None:
    signed = SIGNER.sign(hazard())
    body = json.loads(signed.canonical_bytes())
    assert "signature" not in body and body["key_id"] == SIGNER.key_id
    assert signed.canonical_bytes() == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert signed.canonical_bytes() == signed.model_copy(update={"signature": ""}).canonical_bytes()


def test_a_verifier_needs_real_keys() -> None:
    with pytest.raises(StreamError, match="at least one"):
        HazardVerifier([])
    with pytest.raises(StreamError, match="not an ed25519 public key"):
        HazardVerifier([b"short"])


def test_wire_round_trip_and_the_subject_must_be_one_of_its_cells() -> None:
    signed = SIGNER.sign(hazard())
    data = encode_hazard(signed)
    assert len(data) < MAX_MESSAGE_BYTES
    assert decode_hazard(data, "haz.hw1.16") == signed == decode_hazard(data)
    with pytest.raises(StreamError, match="not addressed to that cell"):
        decode_hazard(data, "haz.hw1.30")
    # Published on the area and the watch horizon before it (the traffic comes from lower x): no further.
    first = min(signed.relevance.cells)
    assert decode_hazard(data, f"haz.hw1.{first - WATCH_CELLS}") == signed
    with pytest.raises(StreamError, match="not addressed to that cell"):
        decode_hazard(data, f"haz.hw1.{first - WATCH_CELLS - 1}")
    with pytest.raises(StreamError, match="not addressed to that cell"):
        decode_hazard(data, "haz.hw2.20")
    with pytest.raises(StreamError, match="malformed hazard"):
        decode_hazard(b"{not json")
    with pytest.raises(StreamError, match="malformed hazard"):
        decode_hazard(data.replace(b'"road":"hw1"', b'"road":"hw1","extra":1', 1))
    with pytest.raises(StreamError, match="exceeds"):
        decode_hazard(b" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(StreamError, match="bytes"):
        decode_hazard("text")  # type: ignore[arg-type]


def test_live_and_the_distance_ahead() -> None:
    h = hazard()
    assert h.live(NOW + 599.0) and not h.live(NOW + 600.0)
    assert not h.model_copy(update={"termination": "cancellation"}).live(NOW)
    assert h.upstream_distance_m(5000.0) == 1000.0
    assert h.upstream_distance_m(6000.0) == 0.0
    assert h.upstream_distance_m(6050.0) is None  # past the event, still in the area's downstream end
    assert h.upstream_distance_m(3000.0) is None  # not yet in the area
    dec = hazard(direction="decreasing", relevance=relevance_area("hw1", 6000.0, "decreasing", 2000.0, 100.0))
    assert dec.upstream_distance_m(7000.0) == 1000.0 and dec.upstream_distance_m(5950.0) is None
