"""Stream wire contracts: what crosses in is validated, subjects are exact."""

from __future__ import annotations

import pytest

from driveloop.contracts.stream import (
    CELL_M,
    MAX_MESSAGE_BYTES,
    WATCH_CELLS,
    WATCH_HORIZON_M,
    cell_of,
    cells_ahead,
    decode_event,
    decode_telemetry,
    encode,
    event_subject,
    hazard_cells,
    hazard_subject,
    msg_id,
    telemetry_subject,
    vehicle_of_subject,
)
from driveloop.core.exceptions import StreamError
from tests.stream.conftest import evt, tel


def test_round_trip_and_subjects() -> None:
    t = tel("v.1", 7, x_m=12.5)
    assert decode_telemetry(encode(t), "tel.v~1") == t
    e = evt("v.1", 8)
    assert decode_event(encode(e), "evt.v~1.aeb") == e
    assert telemetry_subject("v.1") == "tel.v~1" and event_subject("v.1", "fcw") == "evt.v~1.fcw"
    assert vehicle_of_subject("evt.v~1.aeb") == "v.1" and vehicle_of_subject("tel.a") == "a"
    assert msg_id("v.1", 8) == "v.1:8"
    assert hazard_subject("hw1", -2) == "haz.hw1.-2"


BAD = [
    ("not json", b"{nope", "malformed"),
    ("unknown field", encode(tel("v1", 1))[:-1] + b',"x":1}', "Extra inputs"),
    ("negative seq", encode(tel("v1", 1)).replace(b'"seq":1', b'"seq":-1'), "seq"),
    ("nan speed", encode(tel("v1", 1)).replace(b'"speed_mps":30.0', b'"speed_mps":NaN'), "malformed"),
    ("bad vehicle id", encode(tel("v1", 1)).replace(b'"v1"', b'"../x"'), "vehicle_id"),
    ("oversized", b" " * (MAX_MESSAGE_BYTES + 1), "exceeds"),
]


@pytest.mark.parametrize("name,data,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_telemetry_is_a_stream_error(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(StreamError, match=needle):
        decode_telemetry(data)


def test_subject_must_name_the_body_vehicle() -> None:
    with pytest.raises(StreamError, match="does not match"):
        decode_telemetry(encode(tel("v1", 1)), "tel.v2")
    with pytest.raises(StreamError, match="does not match"):
        decode_event(encode(evt("v1", 1, "aeb")), "evt.v1.fcw")


def test_dotted_vehicle_ids_cannot_alias_another_vehicle() -> None:
    # vehicle "a" may publish evt.a.>; vehicle "a.b"'s events live under evt.a~b.*, never under evt.a.
    assert event_subject("a.b", "aeb") == "evt.a~b.aeb"
    with pytest.raises(StreamError):
        vehicle_of_subject("evt.a.b.aeb")


def test_cells() -> None:
    assert cell_of(0.0) == 0 and cell_of(CELL_M - 0.01) == 0 and cell_of(CELL_M) == 1 and cell_of(-1.0) == -1
    assert cells_ahead(CELL_M * 2 - 1, CELL_M * 2) == [1, 2, 3]
    with pytest.raises(StreamError):
        cells_ahead(0.0, 1e9)


# (name, the event's x, upstream m, downstream m): relevance areas that start and end inside, on and off cell edges
AREAS = [("mid-cell", 6010.0, 2000.0, 100.0), ("on edges", 6000.0, 2000.0, 250.0), ("short", 700.0, 120.0, 10.0),
         ("below zero", 900.0, 2000.0, 100.0)]


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize(("name", "x", "up", "down"), AREAS, ids=[a[0] for a in AREAS])
def test_one_subscription_reaches_exactly_the_vehicles_whose_road_ahead_meets_the_area(
        name: str, x: float, up: float, down: float, direction: str) -> None:
    from driveloop.contracts.hazard import relevance_area

    area = relevance_area("hw1", x, direction, up, down)  # type: ignore[arg-type]
    published = set(hazard_cells(area.cells, direction))
    reached = 0
    for k in range(-4000, 4000):  # a vehicle every 3 m from 12 km before to 12 km after, cell edges included
        at = x + 3.0 * k
        ahead = cells_ahead(at, WATCH_HORIZON_M) if direction == "increasing" else cells_ahead(at - WATCH_HORIZON_M,
                                                                                                 WATCH_HORIZON_M)
        must = bool(set(ahead) & set(area.cells))  # what the vehicle must hear of, from the road alone
        assert (cell_of(at) in published) == must, (at, must)
        reached += must
    assert reached > 0 and len(published) == len(area.cells) + WATCH_CELLS
    assert WATCH_HORIZON_M == WATCH_CELLS * CELL_M  # the equivalence needs a whole number of cells


def test_hazard_cells_refuse_what_is_not_an_area() -> None:
    with pytest.raises(StreamError, match="direction"):
        hazard_cells((3, 4), "sideways")
    with pytest.raises(StreamError, match="at least one cell"):
        hazard_cells((), "increasing")


def test_event_detail_is_bounded() -> None:
    with pytest.raises(ValueError):
        evt("v1", 1).model_validate({**evt("v1", 1).model_dump(), "detail": {f"k{i}": i for i in range(17)}})
    big = evt("v1", 1).model_copy(update={"detail": {f"k{i}": "x" * 128 for i in range(16)}})
    assert len(encode(big)) < MAX_MESSAGE_BYTES


@pytest.mark.parametrize("kind", ["intervention", "collision"])
def test_the_shift_detectors_events_round_trip_with_their_class(kind: str) -> None:
    """What a vehicle publishes for the cloud's shift detector: its kind's own subject, the class it happened in."""
    e = evt("v.1", 7, kind).model_copy(update={"scenario": "fog"})
    subject = event_subject("v.1", kind)
    assert subject == f"evt.v~1.{kind}" and vehicle_of_subject(subject) == "v.1"
    back = decode_event(encode(e), subject)
    assert back == e and back.scenario == "fog"
    with pytest.raises(StreamError, match="does not match"):
        decode_event(encode(e), event_subject("v.1", "aeb"))
