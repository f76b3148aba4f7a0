"""The vehicle's hazard filter: every reason to drop a hazard, relevance, cells to watch, and the advisory."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.contracts.hazard import (
    ActionId,
    Hazard,
    HazardAdvisory,
    HazardSigner,
    HazardVerifier,
    encode_hazard,
    relevance_area,
)
from driveloop.contracts.stream import CELL_M, cell_of, hazard_subject
from driveloop.edge.hazards import HORIZON_M, MARGIN_M, MAX_CLOCK_SKEW_S, HazardFilter, p99
from driveloop.safety import AdvisoryConfig
from driveloop.safety.advisory import allowed_speed_mps

NOW = 1_800_000_000.0
CLOUD = HazardSigner(Ed25519PrivateKey.generate())
ATTACKER = HazardSigner(Ed25519PrivateKey.generate())
SUBJECT = hazard_subject("hw1", cell_of(5000.0))


def hazard(seq: int = 1, x: float = 6000.0, ref: float = NOW, **kw: object) -> Hazard:
    fields: dict[str, object] = dict(
        action_id=ActionId(station_id="driveloop-cloud", sequence_number=seq), detection_time=ref - 0.05,
        reference_time=ref, validity_s=600.0, cause=27, road="hw1", x_m=x,
        relevance=relevance_area("hw1", x, "increasing", 2000.0, 100.0),
        advisory=HazardAdvisory(speed_mps=13.9, time_gap_s=3.0))
    fields.update(kw)
    return Hazard(**fields)  # type: ignore[arg-type]


def fresh() -> HazardFilter:
    return HazardFilter(HazardVerifier([CLOUD.public_bytes()]))


def offer(f: HazardFilter, h: Hazard, at: float = NOW + 0.1, subject: str = SUBJECT, signer: HazardSigner | None = CLOUD
          ) -> str:
    return f.offer(subject, encode_hazard(signer.sign(h) if signer is not None else h), at)


DROPS = [
    # name, the hazard, who signs it, when it arrives, the verdict
    ("unsigned", hazard(), None, NOW + 0.1, "unsigned"),
    ("forged: another key", hazard(), ATTACKER, NOW + 0.1, "bad_signature"),
    ("expired", hazard(), CLOUD, NOW + 600.0, "expired"),
    ("issued in the future", hazard(ref=NOW + MAX_CLOCK_SKEW_S + 60), CLOUD, NOW, "future"),
    ("for the other direction", hazard(direction="decreasing",
                                       relevance=relevance_area("hw1", 6000.0, "decreasing", 2000.0, 100.0)),
     CLOUD, NOW + 0.1, "other_direction"),
]


@pytest.mark.parametrize(("name", "h", "signer", "at", "verdict"), DROPS, ids=[d[0] for d in DROPS])
def test_each_bad_hazard_is_dropped_and_counted(name: str, h: Hazard, signer: HazardSigner | None, at: float,
                                                verdict: str) -> None:
    f = fresh()
    subject = hazard_subject("hw1", h.relevance.cells[0])
    assert offer(f, h, at, subject, signer) == verdict
    assert f.counts == {verdict: 1}
    assert f.active(NOW) == [] and f.advisory(5000.0, NOW) is None


def test_a_signature_that_no_longer_matches_its_fields_is_dropped() -> None:
    f = fresh()
    tampered = CLOUD.sign(hazard()).model_copy(update={"advisory": HazardAdvisory(speed_mps=40.0)})
    assert f.offer(SUBJECT, encode_hazard(tampered), NOW + 0.1) == "bad_signature"


def test_malformed_or_misaddressed_messages_are_dropped() -> None:
    f = fresh()
    assert f.offer(SUBJECT, b"\x00garbage", NOW) == "malformed"
    assert offer(f, hazard(), subject=hazard_subject("hw1", 40)) == "malformed"  # not one of its cells
    assert offer(f, hazard(), subject=hazard_subject("hw9", cell_of(5000.0))) == "malformed"
    assert f.counts == {"malformed": 3}


def test_replays_and_repetitions_are_not_news_a_newer_version_is() -> None:
    f = fresh()
    h = hazard()
    assert offer(f, h) == "accepted"
    assert offer(f, h) == "replayed"  # the same version again (a repetition, or the copy on another cell)
    assert offer(f, h.model_copy(update={"reference_time": NOW - 5, "detection_time": NOW - 6})) == "replayed"
    moved = hazard(x=5900.0, ref=NOW + 1.0)
    assert offer(f, moved, at=NOW + 1.1) == "accepted"
    assert [a.x_m for a in f.active(NOW + 1.2)] == [5900.0]
    assert f.counts == {"accepted": 2, "replayed": 2}


def test_a_cancellation_ends_the_action_for_good() -> None:
    f = fresh()
    assert offer(f, hazard()) == "accepted"
    assert f.advisory(5000.0, NOW + 0.2) is not None
    cancel = hazard(ref=NOW + 2.0).model_copy(update={"termination": "cancellation"})
    assert offer(f, cancel, at=NOW + 2.1) == "terminated"
    assert f.active(NOW + 2.2) == [] and f.advisory(5000.0, NOW + 2.2) is None
    assert offer(f, hazard(ref=NOW + 3.0), at=NOW + 3.1) == "cancelled_action"  # a later version of an ended one
    assert offer(f, hazard()) == "cancelled_action"  # a replay of the old live version cannot revive it


def test_a_held_hazard_expires() -> None:
    f = fresh()
    assert offer(f, hazard()) == "accepted"
    assert len(f.active(NOW + 599.0)) == 1
    assert f.active(NOW + 600.0) == [] and f.advisory(5000.0, NOW + 600.0) is None


def test_relevance_inside_the_area_before_the_event_only() -> None:
    f = fresh()
    offer(f, hazard())
    assert f.advisory(3999.0, NOW) is None  # upstream of the area: not (yet) concerned
    assert f.advisory(4000.0, NOW) is not None
    assert f.advisory(6000.0, NOW) is not None
    assert f.advisory(6000.1, NOW) is None  # past the event


def test_the_advisory_is_reached_a_margin_before_the_event() -> None:
    f = fresh()
    offer(f, hazard())
    adv = f.advisory(5000.0, NOW)
    assert adv is not None
    assert (adv.distance_m, adv.speed_mps, adv.time_gap_s) == (1000.0 - MARGIN_M, 13.9, 3.0)
    near = f.advisory(6000.0 - MARGIN_M / 2, NOW)
    assert near is not None and near.distance_m == 0.0


def test_of_several_hazards_the_tightest_envelope_and_the_longest_gap_win() -> None:
    f = fresh()
    cfg = AdvisoryConfig()
    offer(f, hazard(seq=1, x=6000.0, advisory=HazardAdvisory(speed_mps=13.9, time_gap_s=2.0)))
    offer(f, hazard(seq=2, x=5600.0, advisory=HazardAdvisory(speed_mps=25.0)))
    offer(f, hazard(seq=3, x=5800.0, advisory=HazardAdvisory(time_gap_s=4.0)))
    adv = f.advisory(5000.0, NOW)
    assert adv is not None and adv.time_gap_s == 4.0
    envelope_1 = allowed_speed_mps(13.9, 1000.0 - MARGIN_M, cfg)
    envelope_2 = allowed_speed_mps(25.0, 600.0 - MARGIN_M, cfg)
    assert envelope_2 < envelope_1  # the fixture: the nearer, faster advice binds here
    assert (adv.speed_mps, adv.distance_m) == (25.0, 600.0 - MARGIN_M)
    gap_only = fresh()
    offer(gap_only, hazard(advisory=HazardAdvisory(time_gap_s=2.5)))
    only = gap_only.advisory(5000.0, NOW)
    assert only is not None and (only.speed_mps, only.time_gap_s) == (None, 2.5)


def test_a_vehicle_subscribes_to_its_own_cell_and_hears_of_its_road_ahead() -> None:
    f = fresh()
    assert f.cells(1000.0) == [int(1000.0 // CELL_M)] and f.cells(CELL_M) == [1] and f.cells(CELL_M - 0.01) == [0]
    assert f.road_ahead(1000.0) == list(range(cell_of(1000.0), cell_of(1000.0 + HORIZON_M) + 1))
    back = HazardFilter(HazardVerifier([CLOUD.public_bytes()]), direction="decreasing")
    assert back.cells(5000.0) == [cell_of(5000.0)]
    assert back.road_ahead(5000.0)[0] == cell_of(5000.0) and back.road_ahead(5000.0)[-1] == cell_of(5000.0 - HORIZON_M)


# (name, cell offset from the area's first cell in the traffic direction, verdict): the hazard is addressed to its
# area's cells and the HORIZON_M before them, nowhere else
ADDRESSES = [("the horizon's first cell", -int(HORIZON_M // CELL_M), "accepted"),
             ("one cell before the horizon", -int(HORIZON_M // CELL_M) - 1, "malformed"),
             ("the area's first cell", 0, "accepted"), ("the area's last cell", -1, "accepted"),
             ("one cell past the area", -2, "malformed")]  # -1, -2: len(cells) - 1 and len(cells)


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize(("name", "offset", "verdict"), ADDRESSES, ids=[a[0] for a in ADDRESSES])
def test_a_hazard_is_taken_on_exactly_the_cells_it_is_published_on(name: str, offset: int, verdict: str,
                                                                   direction: str) -> None:
    h = hazard(direction=direction, relevance=relevance_area("hw1", 6000.0, direction, 2000.0, 100.0))
    n = len(h.relevance.cells)
    offset = {-1: n - 1, -2: n}.get(offset, offset)
    first = h.relevance.cells[0] if direction == "increasing" else h.relevance.cells[-1]
    cell = first + offset if direction == "increasing" else first - offset
    f = HazardFilter(HazardVerifier([CLOUD.public_bytes()]), direction=direction)  # type: ignore[arg-type]
    assert offer(f, h, subject=hazard_subject("hw1", cell)) == verdict


def test_latency_counts_only_for_hazards_issued_while_the_vehicle_watched() -> None:
    f = fresh()
    f.watching({SUBJECT}, NOW - 10.0)
    offer(f, hazard(seq=1), at=NOW + 0.020)  # detected at NOW - 0.05: 70 ms
    f2 = fresh()
    f2.watching({SUBJECT}, NOW + 5.0)  # started watching after the event: a late joiner, no latency sample
    offer(f2, hazard(seq=1), at=NOW + 5.1)
    assert f.latencies_ms == [pytest.approx(70.0)] and f2.latencies_ms == []
    offer(f, hazard(seq=1, ref=NOW + 1.0), at=NOW + 1.1)  # an update: not a first receipt
    assert len(f.latencies_ms) == 1


def test_p99_is_the_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0
